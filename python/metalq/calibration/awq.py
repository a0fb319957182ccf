"""AWQ (activation-aware weight quantization, Lin et al. 2023): input channels that carry large activations
are scaled up before quantization, so their weights get finer steps, and the inverse scale is folded into
the op that produces those inputs (a norm's weight, or the rows of a preceding linear). The float function
is unchanged; only where the rounding error lands moves.

For each group of linears reading one foldable input, the scale is ``s = a ** alpha`` (``a``: each input
channel's RMS over the calibration data, the root of the Hessian's diagonal), normalised to a geometric
mean of one, with ``alpha`` from a grid on ``[0, 1]`` minimising the group's output error
``tr(dW H dW^T)`` under round-to-nearest (``alpha = 0`` is plain rounding). The codes are then chosen by the
clip search, weighted by the scaled activations.
"""
from __future__ import annotations

import copy
from dataclasses import dataclass

import torch
from torch import nn
from tqdm.auto import tqdm

from .codes import codes_for, group_params

# (producer, consumers) relative to one parent module: the producer's output is the consumers' only input.
# Llama-style blocks (Llama, Mistral, Qwen2/3, ...): the pre-norms feed only the projections (the residual
# stream bypasses them), attention is linear in V, and the MLP multiplies by up_proj's output. BERT-style
# blocks: only V -> attention output (their LayerNorms also feed the residual, so nothing folds into them).
FOLDS = (
    ("input_layernorm", ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj")),
    ("post_attention_layernorm", ("mlp.gate_proj", "mlp.up_proj")),
    ("self_attn.v_proj", ("self_attn.o_proj",)),
    ("mlp.up_proj", ("mlp.down_proj",)),
    ("attention.self.value", ("attention.output.dense",)),
)
ALPHAS = tuple(i / 20 for i in range(21))
_SEARCH_ROWS = 1024  # rows of each consumer the alpha search measures (evenly spaced): bounded cost per step


@dataclass
class Fold:
    """One input scale: the consumers' columns are multiplied by ``scale``, the producer's output divided."""

    producer: str
    consumers: tuple[str, ...]
    scale: torch.Tensor  # (in_features,) float32


def find_folds(model: nn.Module, consumers: dict[str, nn.Linear]) -> list[tuple[str, tuple[str, ...]]]:
    """The ``(producer, consumers)`` of :data:`FOLDS` present in ``model`` whose consumers are all in
    ``consumers`` (name -> linear) with one input width that the producer's output matches, and whose
    producer really divides its output by a scale folded into it."""
    modules = dict(model.named_modules())
    found = []
    for parent in modules:
        prefix = f"{parent}." if parent else ""
        for producer, names in FOLDS:
            producer, names = prefix + producer, tuple(prefix + name for name in names)
            if producer not in modules or not all(name in consumers for name in names):
                continue
            width = {consumers[name].in_features for name in names}
            if len(width) == 1 and _output_width(modules[producer]) in width and _folds_exactly(modules[producer]):
                found.append((producer, names))
    return found


def _output_width(module: nn.Module):
    if isinstance(module, nn.Linear):
        return module.out_features
    weight = getattr(module, "weight", None)
    return weight.shape[0] if isinstance(weight, torch.Tensor) and weight.dim() == 1 else None


def search_scale(weights: list[torch.Tensor], hessian: torch.Tensor, bits: int, group_size: int) -> torch.Tensor:
    """The input scale (``(in_features,)``) of least summed output error over ``weights`` (each ``(out, in)``),
    which all read inputs of second moment ``hessian``."""
    hessian = hessian.float()
    magnitude = hessian.diagonal().clamp_min(0).sqrt().clamp_min(1e-8)
    sampled = [w[torch.linspace(0, w.shape[0] - 1, min(w.shape[0], _SEARCH_ROWS)).long()].float() for w in weights]
    best, best_error = torch.ones_like(magnitude), None
    for alpha in ALPHAS:
        scale = magnitude.pow(alpha)
        scale = scale / (scale.max() * scale.min()).sqrt()
        error = sum(_output_error(w, scale, hessian, bits, group_size) for w in sampled)
        if best_error is None or error < best_error:
            best, best_error = scale, error
    return best


def _output_error(w: torch.Tensor, scale: torch.Tensor, hessian: torch.Tensor, bits: int, group_size: int) -> float:
    scaled = (w * scale).view(w.shape[0], -1, group_size)
    low, high = scaled.amin(-1), scaled.amax(-1)
    s, b = group_params(low, high, bits, w.dtype)
    dequantized = codes_for(scaled, s, b, bits) * s.unsqueeze(-1) + b.unsqueeze(-1)
    delta = dequantized.view_as(w) / scale - w
    return float(((delta @ hessian) * delta).sum())


def scaled_copies(model: nn.Module, folds: list[Fold]) -> dict[str, nn.Module]:
    """Float copies of every producer and consumer with the folds applied (``model`` is not modified):
    consumers' weight columns times the scale, producers' outputs divided by it. A module both consumer and
    producer (V) gets both."""
    copies: dict[str, nn.Module] = {}

    def copy_of(name):
        if name not in copies:
            copies[name] = copy.deepcopy(model.get_submodule(name))
        return copies[name]

    with torch.no_grad():
        for fold in folds:
            for name in fold.consumers:
                weight = copy_of(name).weight
                weight.copy_(weight * fold.scale.to(weight))
            _divide_output(copy_of(fold.producer), fold.scale)
    return copies


def _divide_output(module: nn.Module, scale: torch.Tensor) -> None:
    """In place: a linear's rows and bias, or a norm's weight and bias, divided by ``scale``."""
    inverse = (1 / scale).to(module.weight)
    module.weight.copy_(module.weight * (inverse.unsqueeze(1) if module.weight.dim() == 2 else inverse))
    if getattr(module, "bias", None) is not None:
        module.bias.copy_(module.bias * inverse)


def _folds_exactly(module: nn.Module) -> bool:
    """Whether dividing ``module``'s parameters by a scale divides its output by it, on a probe input: true
    of linears by construction, checked for norms (one computing ``x * (1 + weight)``, as Gemma's, is not)."""
    if isinstance(module, nn.Linear):
        return True
    parameter = module.weight
    width = parameter.shape[0]
    generator = torch.Generator().manual_seed(0)
    probe = torch.randn(4, width, generator=generator).to(parameter)
    scale = torch.linspace(0.5, 2.0, width).to(parameter)
    with torch.no_grad():
        scaled = copy.deepcopy(module)
        _divide_output(scaled, scale)
        try:
            expected = module(probe) / scale
            return torch.allclose(scaled(probe), expected, rtol=1e-3, atol=1e-5 * float(expected.abs().max()))
        except (RuntimeError, TypeError, ValueError):
            return False


def apply_awq(model: nn.Module, layers: dict[str, nn.Linear], hessians: dict, formats: dict):
    """AWQ over ``layers`` (name -> linear, with inputs of second moment ``hessians[id(linear)]``, to be
    quantized at ``formats[name]`` = ``(bits, group_size)``).

    Returns:
        ``(copies, hessians)``: the scaled float copies of every producer and consumer by name (quantize the
        consumers from these; swap the rest in as they are) and the Hessians with the consumers' keyed to
        their scaled inputs ``x / s``.
    """
    folds = []
    for producer, consumers in tqdm(find_folds(model, layers), desc="awq scales", unit="fold", leave=False):
        bits, group_size = formats[consumers[0]]
        weights = [layers[name].weight.detach() for name in consumers]
        folds.append(Fold(producer, consumers, search_scale(weights, hessians[id(layers[consumers[0]])], bits,
                                                            group_size)))
    scaled_hessians = dict(hessians)
    for fold in folds:
        inverse = 1 / fold.scale
        for name in fold.consumers:
            key = id(layers[name])
            scaled_hessians[key] = hessians[key] * inverse.unsqueeze(0) * inverse.unsqueeze(1)
    return scaled_copies(model, folds), scaled_hessians


__all__ = ["FOLDS", "Fold", "find_folds", "search_scale", "scaled_copies", "apply_awq"]
