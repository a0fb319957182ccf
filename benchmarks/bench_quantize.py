"""How fast do metalq's CPU ``affine_quantize`` / ``affine_dequantize`` run against ``mx.quantize`` / ``mx.dequantize``?

One random float weight W (N, K), quantized along K (the layout of ``nn.Linear.weight`` and of
``bench_qmm.py``'s weight), is quantized and dequantized by both libraries, timed in alternating
rounds (see ``_timing.measure``). Throughput is GB/s of float data: the input W for quantize, the
output W for dequantize, both ``N * K * itemsize`` bytes. Ratios are metalq time / MLX time (below 1:
metalq faster).

Both results are compared with MLX's before timing: ``same`` says whether the packed words, scales and
biases (quantize) or the dequantized matrix (dequantize) are bit-identical.

Example:
    python benchmarks/bench_quantize.py --bits 4 --dtypes bfloat16 --csv out.csv
"""
from __future__ import annotations

import argparse
import csv
import gc
import sys

import numpy as np
import torch

import metalq
from _timing import DTYPES, add_common_arguments, measure, start_run

try:
    import mlx.core as mx
except ImportError:
    mx = None



def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--K", type=int, default=4096, help="columns of W (quantized axis)")
    p.add_argument("--N", type=int, default=14336, help="rows of W")
    add_common_arguments(p, budget=1.0)
    return p.parse_args(argv)


def to_numpy(a) -> np.ndarray:
    """An mlx array as numpy, through float32 for floating types (numpy has no bfloat16)."""
    return np.array(a) if a.dtype == mx.uint32 else np.array(a.astype(mx.float32))


def main(argv=None):
    args = parse_args(argv)
    gs, K, N = args.group_size, args.K, args.N
    use_mlx = start_run(args, "metalq affine_quantize / affine_dequantize on CPU", mx)
    print(f"# config      W ({N}, {K}) quantized along K, group_size={gs} bits={args.bits} dtypes={args.dtypes}; "
          f"median of up to {args.reps} calls, {args.budget:g} s budget per op")
    print(f"# columns     ms = median {args.clock} time per call; GB/s = float W bytes (input of quantize, output of")
    print("#             dequantize) / time; ratio = metalq ms / mlx ms (<1: metalq faster); same = bit-identical")
    print("#             to MLX; '~' = fewer than 3 timed calls")
    cols = (f"{'op':>10} {'N':>6} {'K':>5} {'bits':>4} {'gs':>3} {'dtype':>8} | {'metalq ms':>9} {'mlx ms':>9} | "
            f"{'metalq GB/s':>11} {'mlx GB/s':>8} | {'ratio':>6} {'same':>5}")
    print(cols)
    print("-" * len(cols))

    rows = []
    differs = 0
    torch.manual_seed(args.seed)
    w_base = torch.randn(N, K) / K ** 0.5
    for dname in args.dtypes:
        dtype = DTYPES[dname]
        w = w_base.to(dtype)
        float_bytes = w.nbytes
        w_mx = mx.array(w.float().numpy()).astype(getattr(mx, dname)) if use_mlx else None
        for bits in args.bits:
            wq, scales, biases = metalq.affine_quantize(w, gs, bits)
            q_mx = None
            if use_mlx:
                q_mx = mx.quantize(w_mx, group_size=gs, bits=bits)
                mx.eval(q_mx)
            ours = (wq.view(torch.int32).numpy().view(np.uint32), scales.float().numpy(), biases.float().numpy())
            cases = {
                "quantize": (
                    {"metalq": lambda: metalq.affine_quantize(w, gs, bits)},
                    {"mlx": lambda: mx.eval(mx.quantize(w_mx, group_size=gs, bits=bits))},
                    lambda: all(np.array_equal(a, to_numpy(b)) for a, b in zip(ours, q_mx)),
                ),
                "dequantize": (
                    {"metalq": lambda: metalq.affine_dequantize(wq, scales, biases, gs, bits)},
                    {"mlx": lambda: mx.eval(mx.dequantize(*q_mx, group_size=gs, bits=bits))},
                    lambda: np.array_equal(
                        metalq.affine_dequantize(wq, scales, biases, gs, bits).float().numpy(),
                        to_numpy(mx.dequantize(*q_mx, group_size=gs, bits=bits)),
                    ),
                ),
            }
            for op, (ours_fn, mlx_fn, same_fn) in cases.items():
                fns = dict(ours_fn, **(mlx_fn if use_mlx else {}))
                same = same_fn() if use_mlx else None
                differs += same is False
                t = measure(fns, reps=args.reps, warmup=args.warmup, budget_s=args.budget, clock=args.clock)

                def ms(k):
                    if k not in t:
                        return f"{'-':>9}"
                    return f"{('~' if t[k].few else '') + format(t[k].median_ms, '.2f'):>9}"

                def gbps(k, width):
                    return f"{float_bytes / (t[k].median_ms * 1e-3) / 1e9:>{width}.2f}" if k in t else f"{'-':>{width}}"

                ratio = t["metalq"].median_ms / t["mlx"].median_ms if "mlx" in t else None
                print(f"{op:>10} {N:>6} {K:>5} {bits:>4} {gs:>3} {dname:>8} | {ms('metalq')} {ms('mlx')} | "
                      f"{gbps('metalq', 11)} {gbps('mlx', 8)} | "
                      f"{'-' if ratio is None else format(ratio, '.3g'):>6} "
                      f"{'-' if same is None else ('yes' if same else 'NO'):>5}", flush=True)
                row = {"op": op, "N": N, "K": K, "bits": bits, "group_size": gs, "dtype": dname,
                       "float_bytes": float_bytes, "same_as_mlx": same}
                for k in ("metalq", "mlx"):
                    row[f"{k}_ms"] = round(t[k].median_ms, 4) if k in t else ""
                    row[f"{k}_calls"] = t[k].samples if k in t else ""
                    row[f"{k}_cpu_util"] = round(t[k].cpu_util, 2) if k in t else ""
                rows.append(row)
                del fns, t
            del wq, scales, biases, q_mx, ours, cases
            gc.collect()
        del w, w_mx
        if use_mlx:
            mx.clear_cache()
        gc.collect()

    util = {k: [r[f"{k}_cpu_util"] for r in rows if r[f"{k}_cpu_util"] != ""] for k in ("metalq", "mlx")}
    print("# mean CPU time / wall time (threads kept busy): "
          + ", ".join(f"{k} {sum(v) / len(v):.2f}" for k, v in util.items() if v))
    if args.csv:
        with open(args.csv, "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=list(rows[0]))
            writer.writeheader()
            writer.writerows(rows)
        print(f"# wrote {len(rows)} rows to {args.csv}")
    return 1 if differs else 0


if __name__ == "__main__":
    sys.exit(main())
