"""How fast is metalq's CPU ``affine_qmm_t`` against dense, PyTorch's weight-only int kernels and MLX?

For each (dtype, bits) one random float weight W (N, K) is quantized, then for each M the script
times, in one process and in alternating rounds (see ``_timing.measure``):

* ``metalq``: ``metalq.affine_qmm_t(x, wq, scales, biases, group_size, bits)``;
* ``dense``: ``F.linear(x, W)`` with the float weight in x's dtype;
* ``pt-int``: PyTorch's own weight-only CPU kernels where one exists for that bit width:
  4-bit ``aten._weight_int4pack_mm_for_cpu`` on the *same* quantized values (MLX's
  ``s*q + b`` is ``s*(q-8) + (b+8s)``, PyTorch's scales_and_zeros layout; it accepts float32
  activations as well as bfloat16), and 8-bit
  ``aten._weight_int8pack_mm``, which only knows per-channel symmetric int8, so it gets its own
  per-row quantization of W (same weight bytes, one scale per row instead of two per group);
* ``mlx``: ``mx.quantized_matmul`` on ``mx.quantize`` of the same W (CPU stream, ``mx.eval``).
  MLX's CPU kernel accumulates in the activation dtype, so its bfloat16 results miss the tolerance.

Before timing, each output is checked against a plain-PyTorch oracle (unpack the bits, dequantize to
float32, ``x @ W.T``): the ``err`` column is metalq's ``max|y - ref| / max|ref|``, and a ``!`` marks
any result, metalq's or a baseline's, outside the dtype's tolerance.

Ratios are metalq time / other time: below 1 means metalq is faster. GB/s is metalq's weight traffic
(packed weight + scales + biases bytes) per median call. ``floor`` is the memory floor: the bytes of
w, scales, biases and x over the streaming read bandwidth measured at the start of the run (a buffer
twice the last-level cache, ``_timing.stream_read_bandwidth``); ``/floor`` is metalq's time as a
multiple of it. Weights that fit the last-level cache can beat the floor when called repeatedly.

Example:
    python benchmarks/bench_qmm.py --M 1 8 --bits 4 --dtypes bfloat16 --csv out.csv
"""
from __future__ import annotations

import argparse
import csv
import gc
import sys

import numpy as np
import torch
import torch.nn.functional as F

import metalq
from _timing import DTYPES, TOLERANCE, add_common_arguments, measure, start_run, stream_read_bandwidth, timed_call

try:
    import mlx.core as mx
except ImportError:
    mx = None


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--M", type=int, nargs="+", default=[1, 8, 128], help="rows of x (tokens)")
    p.add_argument("--K", type=int, default=4096, help="input features (quantized axis)")
    p.add_argument("--N", type=int, default=14336, help="output features")
    p.add_argument("--max-call", type=float, default=2.5,
                   help="skip a baseline whose call, extrapolated linearly in M from the previous M, would exceed this many s")
    add_common_arguments(p, budget=0.5)
    return p.parse_args(argv)


def reference_q(wq, bits, chunk=1024):
    """Plain-PyTorch oracle for the packing: each row read as an LSB-first bitstream, as int32 values."""
    if sys.byteorder != "little":
        raise SystemExit("the byte view of the uint32 words assumes a little-endian host")
    rows, K = wq.shape[0], wq.shape[1] * 32 // bits
    out = torch.empty(rows, K, dtype=torch.int32)
    shifts = torch.arange(8, dtype=torch.uint8)
    place = 2 ** torch.arange(bits, dtype=torch.int32)
    for r0 in range(0, rows, chunk):
        r1 = min(rows, r0 + chunk)
        stream = (wq[r0:r1].contiguous().view(torch.uint8).unsqueeze(-1) >> shifts) & 1
        out[r0:r1] = (stream.reshape(r1 - r0, K, bits).to(torch.int32) * place).sum(-1)
    return out


def reference_dequantize(q, scales, biases, group_size, offset=0):
    """``scales * (q - offset) + biases`` in float32, one (scale, bias) per ``group_size`` values of a row."""
    s = scales.float().repeat_interleave(group_size, dim=-1)
    b = biases.float().repeat_interleave(group_size, dim=-1)
    return (q - offset) * s + b


def rel_err(y, ref):
    return ((y.float() - ref).abs().max() / ref.abs().max().clamp_min(1e-30)).item()


def to_mx(t, dtype):
    """torch -> mlx through float32 numpy (numpy has no bfloat16), then cast to ``dtype``."""
    return mx.array(t.float().numpy()).astype(getattr(mx, str(dtype).split(".")[-1]))


def mlx_qmm(x_mx, q_mx, group_size, bits):
    """``mx.quantized_matmul`` evaluated (MLX is lazy), so a timed call includes the work."""
    y = mx.quantized_matmul(x_mx, *q_mx, transpose=True, group_size=group_size, bits=bits)
    mx.eval(y)
    return y


TORCH_INT4_GROUP_SIZES = (32, 64, 128, 256)  # what _weight_int4pack_mm_for_cpu accepts
MLX_GROUP_SIZES = (32, 64, 128)  # MLX's affine group sizes (metalq's 16 is its own)


def pytorch_int_baseline(w, wq, scales, biases, dtype, group_size, bits):
    """(fn(x), its dequantized weight in float32) for PyTorch's own kernel at this format, or None."""
    if bits == 4 and group_size in TORCH_INT4_GROUP_SIZES:
        # torch's int4 format dequantizes (q - 8) * scale + zero with [K/gs, N, 2] (scale, zero) pairs.
        q = reference_q(wq, 4)
        packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(q, 2)
        s32, b32 = scales.float(), biases.float()
        sz = torch.stack([s32.t(), (b32 + 8 * s32).t()], dim=-1).contiguous().to(dtype)
        ref_w = reference_dequantize(q, sz[..., 0].t(), sz[..., 1].t(), group_size, offset=8)
        return (lambda x: torch.ops.aten._weight_int4pack_mm_for_cpu(x, packed, group_size, sz)), ref_w
    if bits == 8:
        # Only per-channel symmetric int8 exists; quantize W per row to the same byte count.
        w32 = w.float()
        row_scale = w32.abs().amax(dim=1).clamp_min(1e-12) / 127
        q8 = torch.round(w32 / row_scale[:, None]).clamp(-127, 127).to(torch.int8)
        row_scale = row_scale.to(dtype)
        ref_w = q8.float() * row_scale.float()[:, None]
        return (lambda x: torch.ops.aten._weight_int8pack_mm(x, q8, row_scale)), ref_w
    return None


def main(argv=None):
    args = parse_args(argv)
    gs, K, N = args.group_size, args.K, args.N
    use_mlx = start_run(args, "metalq affine_qmm_t (y = x @ dequant(W).T) on CPU", mx)
    if use_mlx and gs not in MLX_GROUP_SIZES:
        print(f"# mlx         not compared: MLX has no affine group size {gs}")
        use_mlx = False
    print(f"# config      K={K} N={N} group_size={gs} bits={args.bits} M={args.M} dtypes={args.dtypes}; "
          f"median of up to {args.reps} calls, {args.budget:g} s budget per op")
    bandwidth = stream_read_bandwidth(args.clock)
    print(f"# floor       streaming read of a buffer beyond the last-level cache: {bandwidth / 1e9:.1f} GB/s")
    print(f"# columns     ms = median {args.clock} time per call; ratios = metalq ms / other ms (<1: metalq faster);")
    print("#             floor = (w + scales + biases + x bytes) / streaming read bandwidth; /floor = metalq / floor")
    print("#             GB/s = metalq packed weight+scales+biases bytes / time; err = metalq max|y-ref|/max|ref|")
    print("#             vs a float32 oracle; '!' = outside tolerance; '~' = fewer than 3 timed calls; '-' = n/a;")
    print("#             skip = not timed, see the notes below the table")
    print("#             pt-int = torch int4pack_mm_for_cpu (4-bit, same quantized values) or")
    print("#             int8pack_mm (8-bit, per-channel int8 of W: same weight bytes, different quantizer)")
    cols = (f"{'M':>4} {'K':>5} {'N':>6} {'bits':>4} {'gs':>3} {'dtype':>8} | {'metalq':>8} {'dense':>8} {'pt-int':>8} "
            f"{'mlx':>8} | {'floor':>7} {'/floor':>6} {'/dense':>7} {'/pt-int':>7} {'/mlx':>7} | {'GB/s':>6} {'err':>8}")
    print(cols)
    print("-" * len(cols))

    rows = []
    bad = []
    skipped = []
    mlx_same_format = []
    torch.manual_seed(args.seed)
    w_base = torch.randn(N, K) / K ** 0.5
    for dname in args.dtypes:
        dtype = DTYPES[dname]
        w = w_base.to(dtype)
        for bits in args.bits:
            wq, scales, biases = metalq.affine_quantize(w, gs, bits)
            w_ref = reference_dequantize(reference_q(wq, bits), scales, biases, gs)
            weight_bytes = wq.nbytes + scales.nbytes + biases.nbytes
            baseline = pytorch_int_baseline(w, wq, scales, biases, dtype, gs, bits)
            if use_mlx:
                w_mx = to_mx(w, dtype)
                q_mx = mx.quantize(w_mx, group_size=gs, bits=bits)
                mx.eval(q_mx)
                mlx_same_format.append(
                    np.array_equal(np.array(q_mx[0]), wq.view(torch.int32).numpy().view(np.uint32))
                    and torch.equal(torch.from_numpy(np.array(q_mx[1].astype(mx.float32))), scales.float())
                    and torch.equal(torch.from_numpy(np.array(q_mx[2].astype(mx.float32))), biases.float())
                )
                del w_mx
            last = {}  # op -> (M, ms) of the previous M, to skip calls predicted to exceed --max-call
            for M in sorted(args.M):
                x = torch.randn(M, K).to(dtype)
                x_mx = to_mx(x, dtype) if use_mlx else None
                fns = {
                    "metalq": lambda: metalq.affine_qmm_t(x, wq, scales, biases, gs, bits),
                    "dense": lambda: F.linear(x, w),
                }
                refs = {"metalq": w_ref, "dense": w}
                if baseline is not None:
                    fns["pt-int"] = lambda: baseline[0](x)
                    refs["pt-int"] = baseline[1]
                if use_mlx:
                    fns["mlx"] = lambda: mlx_qmm(x_mx, q_mx, gs, bits)
                    refs["mlx"] = w_ref
                skip = set()
                for k, (m0, ms0) in last.items():
                    if k in fns and k != "metalq" and ms0 * M / m0 > 1e3 * args.max_call:
                        skip.add(k)
                        skipped.append(f"M={M} bits={bits} {dname} {k}: skipped, ~{ms0 * M / m0 / 1e3:.0f} s per call "
                                       f"extrapolated from {ms0:.0f} ms at M={m0} (--max-call {args.max_call:g})")
                fns = {k: fn for k, fn in fns.items() if k not in skip}

                # One untimed call per op, checked against a float32 oracle for its own weight.
                checks, first = {}, {}
                for k, fn in fns.items():
                    y, *first[k] = timed_call(fn)
                    if k == "mlx":
                        y = torch.from_numpy(np.array(y.astype(mx.float32)))
                    checks[k] = rel_err(y, x.float() @ refs[k].float().t())
                err = checks["metalq"]
                flagged = {k for k, e in checks.items() if not e <= TOLERANCE[dtype]}
                for k in sorted(flagged):
                    bad.append(f"! M={M} bits={bits} {dname} {k}: err {checks[k]:.2e} > {TOLERANCE[dtype]:.0e}")
                t = measure(fns, reps=args.reps, warmup=args.warmup, budget_s=args.budget, clock=args.clock,
                            first=first)
                last.update({k: (M, v.median_ms) for k, v in t.items()})
                mq = t["metalq"].median_ms

                def cell(k, width=8):
                    if k not in t:
                        return f"{'skip' if k in skip else '-':>{width}}"
                    mark = ("!" if k in flagged else "") + ("~" if t[k].few else "")
                    return f"{mark + format(t[k].median_ms, '.3f' if t[k].median_ms < 100 else '.1f'):>{width}}"

                def ratio(k, width):
                    return f"{format(mq / t[k].median_ms, '.3g' if mq >= 0.1 * t[k].median_ms else '.2g'):>{width}}" if k in t else f"{'-':>{width}}"

                gbps = weight_bytes / (mq * 1e-3) / 1e9
                floor_ms = 1e3 * (weight_bytes + x.nbytes) / bandwidth
                print(f"{M:>4} {K:>5} {N:>6} {bits:>4} {gs:>3} {dname:>8} | {cell('metalq')} {cell('dense')} "
                      f"{cell('pt-int')} {cell('mlx')} | {floor_ms:>7.3f} {mq / floor_ms:>6.2f} {ratio('dense', 7)} {ratio('pt-int', 7)} {ratio('mlx', 7)} | "
                      f"{format(gbps, '.3g'):>6} {('!' if 'metalq' in flagged else '') + format(err, '.1e'):>8}", flush=True)
                row = {"M": M, "K": K, "N": N, "bits": bits, "group_size": gs, "dtype": dname,
                       "weight_bytes": weight_bytes, "metalq_gbps": round(gbps, 2),
                       "floor_ms": round(floor_ms, 4), "metalq_per_floor": round(mq / floor_ms, 3)}
                for k in ("metalq", "dense", "pt-int", "mlx"):
                    key = k.replace("-", "_")
                    row[f"{key}_ms"] = round(t[k].median_ms, 4) if k in t else ""
                    row[f"{key}_calls"] = t[k].samples if k in t else ""
                    row[f"{key}_cpu_util"] = round(t[k].cpu_util, 2) if k in t else ""
                    row[f"{key}_err"] = f"{checks[k]:.3e}" if k in checks else ""
                rows.append(row)
                del x, x_mx, y, fns, refs
            del wq, scales, biases, w_ref, baseline
            if use_mlx:
                del q_mx
                mx.clear_cache()
            gc.collect()
        del w
        gc.collect()

    if use_mlx:
        print(f"# mx.quantize output bit-identical to metalq.affine_quantize: "
              f"{sum(mlx_same_format)}/{len(mlx_same_format)} (dtype, bits) weights")
    util = {k: [r[f"{k}_cpu_util"] for r in rows if r[f"{k}_cpu_util"] != ""] for k in ("metalq", "dense", "pt_int", "mlx")}
    print("# mean CPU time / wall time (threads kept busy): "
          + ", ".join(f"{k} {sum(v) / len(v):.2f}" for k, v in util.items() if v))
    for line in skipped + bad:
        print(f"# {line}")
    if args.csv:
        with open(args.csv, "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=list(rows[0]))
            writer.writeheader()
            writer.writerows(rows)
        print(f"# wrote {len(rows)} rows to {args.csv}")
    return 1 if any(" metalq:" in line for line in bad) else 0


if __name__ == "__main__":
    sys.exit(main())
