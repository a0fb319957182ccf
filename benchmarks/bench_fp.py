"""How fast are metalq's floating-point modes (mxfp4, nvfp4, mxfp8) on CPU against dense and affine 4-bit?

For each dtype and M, one random float weight W (N, K) is quantized in every mode; then, in one process
and in alternating rounds (``_timing.measure``), the script times ``F.linear(x, W)`` (``dense``),
``metalq.affine_qmm_t`` at 4 bits / group 64 (``affine4``), ``metalq.fp_qmm_t`` in each fp mode, and with
MLX installed ``mx.quantized_matmul`` in the same mode (CPU stream). Before timing, each metalq output is
checked against float64 ``x @ dequantize(W).T``; ``err`` is ``max|y - ref| / max|ref|``.

Ratios: ``/dense`` and ``/affine4`` are the mode's time over dense's and affine4's (below 1: faster);
``/mlx`` is metalq over MLX in the same mode.

Example:
    python benchmarks/bench_fp.py --M 1 128 --dtypes bfloat16
"""
from __future__ import annotations

import argparse

import numpy as np
import torch
import torch.nn.functional as F

import metalq
from _timing import DTYPES, add_common_arguments, measure, start_run, timed_call

try:
    import mlx.core as mx
except ImportError:
    mx = None

MODES = ("mxfp4", "nvfp4", "mxfp8")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--M", type=int, nargs="+", default=[1, 128], help="rows of x (tokens)")
    p.add_argument("--K", type=int, default=4096, help="input features (quantized axis)")
    p.add_argument("--N", type=int, default=4096, help="output features")
    add_common_arguments(p, budget=0.5)
    return p.parse_args(argv)


def to_mlx(t: torch.Tensor):
    if t.dtype == torch.bfloat16:
        return mx.array(t.float().numpy()).astype(mx.bfloat16)
    if t.dtype == torch.uint32:
        return mx.array(t.view(torch.int32).numpy()).view(mx.uint32)
    return mx.array(t.numpy())


def main(argv=None):
    args = parse_args(argv)
    use_mlx = start_run(args, "metalq fp modes vs dense and affine 4-bit, CPU fp_qmm_t (x @ W.T)", mx)
    gen = torch.Generator().manual_seed(args.seed)
    w32 = torch.randn(args.N, args.K, generator=gen) / args.K**0.5
    print(f"N={args.N} K={args.K}; times are medians in ms")
    print(f"{'dtype':9} {'M':>4} {'mode':7} {'ms':>9} {'/dense':>7} {'/affine4':>8} {'/mlx':>6} {'err':>8}")
    for dtype_name in args.dtypes:
        dtype = DTYPES[dtype_name]
        w = w32.to(dtype)
        affine = metalq.affine_quantize(w, 64, 4)
        packed = {mode: metalq.fp_quantize(w, mode) for mode in MODES}
        for M in args.M:
            x = torch.randn(M, args.K, generator=gen).to(dtype)
            fns = {"dense": lambda: F.linear(x, w), "affine4": lambda: metalq.affine_qmm_t(x, *affine, 64, 4)}
            errors = {}
            for mode, (wq, s) in packed.items():
                fns[mode] = lambda wq=wq, s=s, mode=mode: metalq.fp_qmm_t(x, wq, s, mode)
                ref = x.double() @ metalq.fp_dequantize(wq, s, mode, dtype=torch.float32).double().t()
                y, _, _ = timed_call(fns[mode])
                errors[mode] = ((y.double() - ref).abs().max() / ref.abs().max()).item()
                if use_mlx:
                    xm, wm, sm = to_mlx(x), to_mlx(wq), to_mlx(s)
                    fns[f"mlx-{mode}"] = lambda xm=xm, wm=wm, sm=sm, mode=mode: mx.eval(
                        mx.quantized_matmul(xm, wm, sm, transpose=True, mode=mode))
            times = measure(fns, reps=args.reps, warmup=args.warmup, budget_s=args.budget, clock=args.clock)
            for name in ("dense", "affine4", *MODES):
                t = times[name].median_ms
                mlx_ratio = f"{t / times['mlx-' + name].median_ms:6.2f}" if use_mlx and name in MODES else "     -"
                err = f"{errors[name]:8.1e}" if name in errors else "       -"
                print(f"{dtype_name:9} {M:4d} {name:7} {t:9.3f} {t / times['dense'].median_ms:7.2f} "
                      f"{t / times['affine4'].median_ms:8.2f} {mlx_ratio} {err}")


if __name__ == "__main__":
    main()
