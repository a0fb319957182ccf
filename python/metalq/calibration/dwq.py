"""DWQ-style distillation: the codes stay as a quantizer chose them; every MetalLinear's scales and biases are
trained (float32 masters, Adam) so the quantized model's outputs match the float model's on the calibration data.

Targets are the float model's outputs, computed before any layer is swapped: for models with ``logits`` the
teacher's top-k log-probabilities and the rest's total (the KL divergence of those k + 1 outcomes; mlx-lm's DWQ
takes it over the full vocabulary), otherwise the
output tensor (``sentence_embedding``, ``last_hidden_state`` or a plain tensor) matched by mean squared error.
"""
from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Callable

import torch
from torch import nn
from tqdm.auto import tqdm

from ..linear import MetalLinear

TOP_K = 64  # teacher log-probabilities kept per position (and the rest's total): bounded memory for any vocabulary
_LOG_ZERO = -1e4
EPOCHS = 2
LEARNING_RATE = 3e-4  # relative: each layer's step is this times its mean |scale|


def output_tensor(output: Any) -> tuple[str, torch.Tensor]:
    """``(kind, tensor)`` of a model output: ``("logits", ...)`` or ``("hidden", ...)``."""
    if isinstance(output, torch.Tensor):
        return "hidden", output
    logits = output.get("logits") if isinstance(output, Mapping) else getattr(output, "logits", None)
    if logits is not None:
        return "logits", logits
    for key in ("sentence_embedding", "last_hidden_state"):
        value = output.get(key) if isinstance(output, Mapping) else getattr(output, key, None)
        if value is not None:
            return "hidden", value
    raise TypeError(f"calibrate(method='dwq'): no logits, sentence_embedding or last_hidden_state in the model's "
                    f"output ({type(output).__name__}); pass forward= returning a tensor")


def teacher_targets(model: nn.Module, batches: list, forward: Callable) -> list:
    """The float model's targets for each batch, before quantization."""
    targets = []
    with torch.no_grad():
        for batch in tqdm(batches, desc="dwq targets", unit="batch", leave=False):
            kind, tensor = output_tensor(forward(model, batch))
            if kind == "logits":
                log_probs = torch.log_softmax(tensor.float(), dim=-1)
                top = log_probs.topk(min(TOP_K, log_probs.shape[-1]), dim=-1)
                targets.append((kind, _with_rest(log_probs, top.values, top.indices), top.indices))
            else:
                targets.append((kind, tensor.float().detach(), None))
    return targets


def _with_rest(log_probs: torch.Tensor, top: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
    """``top`` log-probabilities with one more entry: the log-probability of every other token together.
    Without it a KL over the top k alone is lowered by a student sharper than the teacher."""
    rest = torch.logsumexp(log_probs.scatter(-1, indices, float("-inf")), dim=-1, keepdim=True)
    return torch.cat([top, rest], dim=-1)


def distillation_loss(output: Any, target) -> torch.Tensor:
    kind, values, indices = target
    _, tensor = output_tensor(output)
    if kind == "logits":
        log_probs = torch.log_softmax(tensor.float(), dim=-1)
        student = _with_rest(log_probs, log_probs.gather(-1, indices), indices)
        values, student = values.clamp_min(_LOG_ZERO), student.clamp_min(_LOG_ZERO)  # 0 * log 0 = 0
        return (values.exp() * (values - student)).sum(-1).mean()
    return (tensor.float() - values).pow(2).mean() / values.pow(2).mean().clamp_min(1e-30)


def learn_scales_and_biases(model: nn.Module, batches: list, targets: list, forward: Callable,
                            epochs: int = EPOCHS, learning_rate: float = LEARNING_RATE) -> list[float]:
    """Train every MetalLinear's ``scales``/``qbiases`` of ``model`` (affine) on ``batches`` towards ``targets``;
    returns the mean loss of each epoch. Scales and biases are rounded back to their dtype at the end."""
    layers = [m for m in model.modules() if isinstance(m, MetalLinear) and m.mode == "affine"]
    stored = [(layer, layer.scales.dtype) for layer in layers]
    groups = []
    for layer in layers:
        layer.scales = layer.scales.detach().float().requires_grad_()
        layer.qbiases = layer.qbiases.detach().float().requires_grad_()
        step = learning_rate * float(layer.scales.detach().abs().mean())
        groups.append({"params": [layer.scales, layer.qbiases], "lr": step})
    frozen = [p for p in model.parameters() if p.requires_grad]
    for parameter in frozen:
        parameter.requires_grad_(False)
    optimizer = torch.optim.Adam(groups)
    history = []
    try:
        for epoch in range(epochs):
            total = 0.0
            for batch, target in tqdm(list(zip(batches, targets)), desc=f"dwq epoch {epoch + 1}/{epochs}",
                                      unit="batch", leave=False):
                optimizer.zero_grad()
                loss = distillation_loss(forward(model, batch), target)
                loss.backward()
                optimizer.step()
                total += loss.item()
            history.append(total / len(batches))
    finally:
        for parameter in frozen:
            parameter.requires_grad_(True)
        for layer, dtype in stored:
            layer.scales = layer.scales.detach().to(dtype)
            layer.qbiases = layer.qbiases.detach().to(dtype)
    return history
