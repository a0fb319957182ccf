"""How fast is metalq's CPU ``affine_gather_qmm`` for a mixture-of-experts decode step, against what a user
would otherwise run?

One MoE projection (default: 64 experts, each an ``N x K = 1408 x 2048`` weight, top-8 routing; the expert
size of DeepSeek-V2-Lite / Qwen1.5-MoE, the expert count and top-k of OLMoE) is applied to ``tokens`` decode
tokens (M = 1 each) with random routing. In one process, in alternating rounds (``_timing.measure``):

* ``gather``: ``metalq.affine_gather_qmm(x, wq, s, b, rhs_indices=experts)`` with x ``(tokens, 1, 1, K)`` and
  experts ``(tokens, top_k)``, as mlx-lm's ``SwitchGLU`` calls ``gather_qmm``;
* ``qmm-loop``: the per-expert loop on the same packed weights: for every expert in use, the tokens routed
  to it through ``metalq.affine_qmm_t``, written back with ``index_copy_``;
* ``dense-loop``: the same loop with ``F.linear`` on the float weights in x's dtype;
* ``grouped``: ``torch._grouped_mm`` on the float weights, tokens sorted by expert (the sort included);
* ``mlx``: ``mx.gather_qmm`` on the same packed weights (CPU stream, ``mx.eval``).

Every output is first checked against a float32 oracle (the dequantized experts, one product per token and
expert): ``err`` is gather's ``max|y - ref| / max|ref|``; ``!`` marks any op outside the dtype's tolerance.
Ratios are gather time / other time: below 1 means ``affine_gather_qmm`` is faster. GB/s is gather's packed
weight traffic (the experts in use: packed weight + scales + biases) per median call.

Example:
    python benchmarks/bench_gather.py --tokens 1 16 64 --dtypes bfloat16
"""
from __future__ import annotations

import argparse
import csv

import numpy as np
import torch
import torch.nn.functional as F

import metalq
from _timing import DTYPES, TOLERANCE, add_common_arguments, measure, start_run, timed_call

try:
    import mlx.core as mx
except ImportError:
    mx = None


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--tokens", type=int, nargs="+", default=[1, 16, 64], help="decode tokens per step (M = 1 each)")
    p.add_argument("--experts", type=int, default=64)
    p.add_argument("--top-k", type=int, default=8)
    p.add_argument("--K", type=int, default=2048, help="input features (hidden size, the quantized axis)")
    p.add_argument("--N", type=int, default=1408, help="output features per expert (expert intermediate size)")
    add_common_arguments(p, budget=0.5)
    p.set_defaults(bits=[4])
    return p.parse_args(argv)


def per_expert_loop(linear):
    """y[t, j] = linear(e, x[t]) for the experts e = experts[t, j]: one call per expert in use."""

    def run(x, experts):
        tokens, top_k = experts.shape
        flat = experts.reshape(-1)
        x2 = x.reshape(tokens, -1)
        out = None
        for e in flat.unique().tolist():
            slots = (flat == e).nonzero().squeeze(1)
            y = linear(e, x2.index_select(0, slots // top_k))
            out = out if out is not None else y.new_empty(flat.numel(), y.shape[-1])
            out.index_copy_(0, slots, y)
        return out.view(tokens, top_k, 1, -1)

    return run


def grouped_mm(w_t, experts_count):
    """torch._grouped_mm over the tokens sorted by expert; w_t is (E, K, N)."""

    def run(x, experts):
        tokens, top_k = experts.shape
        flat = experts.reshape(-1)
        order = flat.argsort(stable=True)
        offs = torch.bincount(flat, minlength=experts_count).cumsum(0).to(torch.int32)
        y = torch._grouped_mm(x.reshape(tokens, -1)[order // top_k], w_t, offs=offs)
        return torch.empty_like(y).index_copy_(0, order, y).view(tokens, top_k, 1, -1)

    return run


def to_mx(t, dtype=None):
    if t.dtype == torch.uint32:
        return mx.array(t.view(torch.int32).numpy().view(np.uint32))
    if not t.is_floating_point():
        return mx.array(t.numpy())
    return mx.array(t.float().numpy()).astype(getattr(mx, str(dtype or t.dtype).split(".")[-1]))


def main(argv=None):
    args = parse_args(argv)
    gs, K, N, E, top_k = args.group_size, args.K, args.N, args.experts, args.top_k
    use_mlx = start_run(args, "metalq affine_gather_qmm (MoE decode: y[t, j] = x[t] @ dequant(W[e[t, j]]).T) on CPU", mx)
    print(f"# config      experts={E} top_k={top_k} K={K} N={N} group_size={gs} bits={args.bits} tokens={args.tokens} "
          f"dtypes={args.dtypes}; median of up to {args.reps} calls, {args.budget:g} s budget per op")
    print("# columns     ms = median time per call; ratios = gather ms / other ms (<1: gather faster); GB/s = the")
    print("#             active experts' packed bytes / gather time; err = gather max|y-ref|/max|ref| vs a float32")
    print("#             oracle; '!' = outside tolerance; '~' = fewer than 3 timed calls; '-' = n/a")
    names = ["gather", "qmm-loop", "dense-loop", "grouped"] + (["mlx"] if use_mlx else [])
    cols = (f"{'tokens':>6} {'active':>6} {'bits':>4} {'dtype':>8} | " + " ".join(f"{n:>10}" for n in names)
            + " | " + " ".join(f"{'/' + n:>11}" for n in names[1:]) + f" | {'GB/s':>6} {'err':>8}")
    print(cols)
    print("-" * len(cols))
    rows, bad = [], []
    gen = torch.Generator().manual_seed(args.seed)
    w_base = torch.randn(E, N, K, generator=gen) / K**0.5
    for dname in args.dtypes:
        dtype = DTYPES[dname]
        w = w_base.to(dtype)
        for bits in args.bits:
            wq, s, b = metalq.affine_quantize(w, gs, bits)
            w_ref = metalq.affine_dequantize(wq, s, b, gs, bits).float()
            expert_bytes = (wq.nbytes + s.nbytes + b.nbytes) // E
            q_mx = tuple(to_mx(t) for t in (wq, s, b)) if use_mlx else None
            for tokens in args.tokens:
                x = torch.randn(tokens, 1, 1, K, generator=gen).to(dtype)
                # top-k distinct experts per token, uniformly at random
                experts = torch.rand(tokens, E, generator=gen).argsort(dim=1)[:, :top_k]
                fns = {
                    "gather": lambda: metalq.affine_gather_qmm(x, wq, s, b, rhs_indices=experts, group_size=gs,
                                                               bits=bits),
                    "qmm-loop": lambda: per_expert_loop(
                        lambda e, xe: metalq.affine_qmm_t(xe, wq[e], s[e], b[e], gs, bits))(x, experts),
                    "dense-loop": lambda: per_expert_loop(lambda e, xe: F.linear(xe, w[e]))(x, experts),
                    "grouped": lambda: grouped_mm(w.transpose(1, 2), E)(x, experts),
                }
                if use_mlx:
                    x_mx, e_mx = to_mx(x, dtype), to_mx(experts)

                    def mlx_gather():
                        y = mx.gather_qmm(x_mx, *q_mx, rhs_indices=e_mx, transpose=True, group_size=gs, bits=bits)
                        mx.eval(y)
                        return y

                    fns["mlx"] = mlx_gather
                refs = {k: per_expert_loop(lambda e, xe, wk=wk: xe.float() @ wk[e].float().t())(x, experts)
                        for k, wk in (("quantized", w_ref), ("dense", w))}
                checks, first = {}, {}
                for k, fn in fns.items():
                    y, *first[k] = timed_call(fn)
                    if k == "mlx":
                        y = torch.from_numpy(np.array(y.astype(mx.float32)))
                    ref = refs["dense" if k in ("dense-loop", "grouped") else "quantized"]
                    checks[k] = ((y.float() - ref).abs().max() / ref.abs().max()).item()
                    if not checks[k] <= TOLERANCE[dtype]:
                        bad.append(f"! tokens={tokens} bits={bits} {dname} {k}: err {checks[k]:.2e}")
                t = measure(fns, reps=args.reps, warmup=args.warmup, budget_s=args.budget, clock=args.clock,
                            first=first)
                active = experts.unique().numel()
                g = t["gather"].median_ms
                def cell(k):
                    flag = ("~" if t[k].few else " ") + ("!" if not checks[k] <= TOLERANCE[dtype] else "")
                    return f"{t[k].median_ms:>9.3f}{flag}"

                print(f"{tokens:>6} {active:>6} {bits:>4} {dname:>8} | " + " ".join(f"{cell(k):>10}" for k in names)
                      + " | " + " ".join(f"{g / t[k].median_ms:>11.2f}" for k in names[1:])
                      + f" | {active * expert_bytes / g / 1e6:>6.1f} {checks['gather']:>8.1e}")
                rows.append({"tokens": tokens, "active": active, "bits": bits, "dtype": dname,
                             **{f"{k}_ms": t[k].median_ms for k in names}, **{f"{k}_n": t[k].samples for k in names},
                             "err": checks["gather"]})
    for line in bad:
        print(line)
    if args.csv:
        with open(args.csv, "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=list(rows[0]))
            writer.writeheader()
            writer.writerows(rows)


if __name__ == "__main__":
    main()
