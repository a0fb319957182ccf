"""First run on a Mac: are metalq's Metal kernels right, and how fast are they on MPS?

1. Correctness: ``affine_quantize`` / ``affine_dequantize`` on MPS against the CPU ops (bit-exact
   expected: both follow MLX's rules with the same roundings), then ``affine_qmm_t`` / ``affine_qmm_n``
   on MPS against the CPU op on the same operands, for small shapes that reach each kernel path.
   Any mismatch is printed and makes the script exit with status 1 before timing.
2. Speed: for each (dtype, M) the median time of ``affine_qmm_t`` on MPS against ``F.linear`` with the
   dense weight in that dtype on MPS (and ``mx.quantized_matmul`` on MLX's GPU when mlx is installed),
   with ``torch.mps.synchronize()`` around the timed loop (5 warm-up calls, then ``--reps`` timed).
   GB/s counts the weight bytes each call must read (packed weight + scales + biases for metalq,
   the dense matrix for F.linear); ``%bw`` compares metalq's GB/s with ``--bandwidth-gbs``, the chip's
   memory bandwidth (e.g. M1 68, M2 100, M3 Pro 150, M2 Max 400, M2 Ultra 800).

Example:
    python benchmarks/bench_mps.py --bandwidth-gbs 100 --M 1 4 32 512 --bits 4 --dtypes float16 bfloat16
"""
from __future__ import annotations

import argparse
import csv
import platform
import statistics
import sys
import time

import torch
import torch.nn.functional as F

DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}
# Normwise max error of the MPS matmul against the CPU op: both round to the output dtype and may
# sum in different orders.
TOLERANCE = {torch.float32: 1e-4, torch.float16: 3e-3, torch.bfloat16: 2e-2}
CHECK_SHAPES = [  # (M, K, N): single rows, a few rows, many rows, batched-looking odd N
    (1, 256, 128), (2, 512, 96), (5, 128, 67), (8, 1024, 256), (33, 256, 160), (128, 512, 512)]


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--M", type=int, nargs="+", default=[1, 8, 32, 512], help="rows of x (tokens)")
    p.add_argument("--K", type=int, default=4096, help="input features (quantized axis)")
    p.add_argument("--N", type=int, default=14336, help="output features")
    p.add_argument("--bits", type=int, nargs="+", default=[4, 8])
    p.add_argument("--group-size", type=int, default=64)
    p.add_argument("--dtypes", nargs="+", default=["float16", "bfloat16"], choices=sorted(DTYPES))
    p.add_argument("--bandwidth-gbs", type=float, default=None, help="the chip's memory bandwidth, GB/s")
    p.add_argument("--reps", type=int, default=100, help="timed calls per op")
    p.add_argument("--skip-check", action="store_true", help="time without the correctness pass")
    p.add_argument("--csv", help="also write the table to this CSV file")
    return p.parse_args(argv)


def relative_error(got, ref):
    got, ref = got.float().cpu(), ref.float().cpu()
    return float((got - ref).abs().max() / ref.abs().max().clamp_min(1e-30))


def check(metalq, bits_list, group_size) -> bool:
    """Every op on MPS against the CPU op; prints one line per case, returns True when all pass."""
    ok = True
    g = torch.Generator().manual_seed(0)
    mps = lambda tensors: [t.to("mps") for t in tensors]  # noqa: E731
    for dtype in DTYPES.values():
        for bits in bits_list:
            for M, K, N in CHECK_SHAPES:
                x = torch.randn(M, K, generator=g).to(dtype)
                results = {}
                # qmm_t multiplies by W (N, K) quantized along K; qmm_n by W (K, N) quantized along N.
                for name, op, w_shape in (("qmm_t", metalq.affine_qmm_t, (N, K)), ("qmm_n", metalq.affine_qmm_n, (K, N))):
                    if w_shape[1] % group_size:
                        continue
                    w = torch.randn(w_shape, generator=g).to(dtype)
                    q = metalq.affine_quantize(w, group_size, bits)
                    if name == "qmm_t":
                        got = metalq.affine_quantize(w.to("mps"), group_size, bits)
                        results["quantize"] = all(torch.equal(a, b.cpu()) for a, b in zip(q, got))
                        got = metalq.affine_dequantize(*mps(q), group_size, bits).cpu()
                        results["dequantize"] = torch.equal(metalq.affine_dequantize(*q, group_size, bits), got)
                    ref, got = op(x, *q, group_size, bits), op(x.to("mps"), *mps(q), group_size, bits)
                    err = relative_error(got, ref)
                    results[f"{name} err={err:.1e}"] = (got.dtype == ref.dtype and got.shape == ref.shape
                                                        and err <= TOLERANCE[dtype])
                bad = [k for k, v in results.items() if not v]
                ok &= not bad
                print(f"  {'FAIL' if bad else 'ok  '} {str(dtype)[6:]:9} bits={bits} M={M:<4} K={K:<5} N={N:<4} "
                      + ("failed: " + ", ".join(bad) if bad else "  ".join(results)))
    return ok


def time_mps(fn, reps: int) -> float:
    """Median ms per call: 5 warm-up calls, then `reps` calls each bracketed by synchronize()."""
    for _ in range(5):
        fn()
    torch.mps.synchronize()
    samples = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        torch.mps.synchronize()
        samples.append(time.perf_counter() - t0)
    return statistics.median(samples) * 1e3


def time_mlx(mx, fn, reps: int) -> float:
    for _ in range(5):
        mx.eval(fn())
    samples = []
    for _ in range(reps):
        t0 = time.perf_counter()
        mx.eval(fn())
        samples.append(time.perf_counter() - t0)
    return statistics.median(samples) * 1e3


def bench(metalq, args, mx):
    cols = ["dtype", "bits", "M", "K", "N", "metalq_ms", "linear_ms", "speedup", "metalq_GBs", "linear_GBs"]
    if args.bandwidth_gbs:
        cols.append("pct_bw")
    if mx is not None:
        cols += ["mlx_ms", "vs_mlx"]
    print("  ".join(f"{c:>10}" for c in cols))
    rows = []
    g = torch.Generator().manual_seed(1)
    for dtype_name in args.dtypes:
        dtype = DTYPES[dtype_name]
        w = torch.randn(args.N, args.K, generator=g).to(dtype)
        w_mps = w.to("mps")
        for bits in args.bits:
            wq, scales, biases = (t.to("mps") for t in metalq.affine_quantize(w, args.group_size, bits))
            q_bytes = sum(t.numel() * t.element_size() for t in (wq, scales, biases))
            dense_bytes = w.numel() * w.element_size()
            if mx is not None:
                mw = mx.array(w.float().numpy()).astype(getattr(mx, dtype_name))
                mq = mx.quantize(mw, group_size=args.group_size, bits=bits)
            for M in args.M:
                x = torch.randn(M, args.K, generator=g).to(dtype).to("mps")
                t_q = time_mps(lambda: metalq.affine_qmm_t(x, wq, scales, biases, args.group_size, bits), args.reps)
                t_d = time_mps(lambda: F.linear(x, w_mps), args.reps)
                row = {"dtype": dtype_name, "bits": bits, "M": M, "K": args.K, "N": args.N,
                       "metalq_ms": t_q, "linear_ms": t_d, "speedup": t_d / t_q,
                       "metalq_GBs": q_bytes / t_q / 1e6, "linear_GBs": dense_bytes / t_d / 1e6}
                if args.bandwidth_gbs:
                    row["pct_bw"] = 100 * row["metalq_GBs"] / args.bandwidth_gbs
                if mx is not None:
                    mxx = mx.array(x.float().cpu().numpy()).astype(getattr(mx, dtype_name))
                    t_m = time_mlx(mx, lambda: mx.quantized_matmul(mxx, *mq, transpose=True,
                                                                   group_size=args.group_size, bits=bits), args.reps)
                    row.update(mlx_ms=t_m, vs_mlx=t_m / t_q)
                rows.append(row)
                print("  ".join(f"{row[c]:>10.3f}" if isinstance(row[c], float) else f"{row[c]:>10}" for c in cols))
    if args.csv:
        with open(args.csv, "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=cols)
            writer.writeheader()
            writer.writerows(rows)


def main(argv=None) -> int:
    args = parse_args(argv)
    if sys.platform != "darwin" or not torch.backends.mps.is_available():
        print("bench_mps.py needs a Mac with Apple silicon and PyTorch's MPS backend "
              f"(this is {platform.system()} {platform.machine()}, torch.backends.mps.is_available() = "
              f"{torch.backends.mps.is_available()}). For CPU numbers run benchmarks/bench_qmm.py.")
        return 2
    import metalq

    try:
        import mlx.core as mx
    except ImportError:
        mx = None
    print(f"# metalq on MPS | macOS {platform.mac_ver()[0]} {platform.machine()} | torch {torch.__version__} | "
          f"mlx {mx.__version__ if mx is not None else 'not installed'} | group_size {args.group_size}")
    if not args.skip_check:
        print("# correctness: MPS against the CPU ops")
        if not check(metalq, args.bits, args.group_size):
            print("MPS results differ from the CPU ops: not timing. Please report the lines marked FAIL.")
            return 1
    print(f"# speed: median of {args.reps} calls; speedup = F.linear ms / metalq ms; vs_mlx = mlx ms / metalq ms")
    bench(metalq, args, mx)
    return 0


if __name__ == "__main__":
    sys.exit(main())
