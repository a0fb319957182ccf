"""Mixed precision: a format ``(bits, group_size)`` per layer that meets a bits-per-weight budget.

Sensitivity: each layer's relative output error for a format, ``sum_k H_kk ||dW_k||^2 / sum_k H_kk ||W_k||^2``
(the diagonal of its input Hessian weighting each column), with the clip search's codes. Layers start at their
cheapest format; bits then go, one upgrade at a time, where they remove the most error per bit spent.
"""
from __future__ import annotations

import torch

from ..config import axis_multiple
from .clip import clip_search


def bits_per_weight(bits: int, group_size: int) -> float:
    """Storage per weight: the code plus a 16-bit scale and a 16-bit bias per group."""
    return bits + 32 / group_size


def relative_error(weight: torch.Tensor, importance: torch.Tensor, bits: int, group_size: int) -> float:
    codes, scales, biases = clip_search(weight, bits, group_size, importance)
    w = weight.float().view(weight.shape[0], -1, group_size)
    approx = codes.view_as(w) * scales.unsqueeze(-1) + biases.unsqueeze(-1)
    h = importance.float().view(1, -1, group_size)
    return float(((approx - w).pow(2) * h).sum() / (w.pow(2) * h).sum().clamp_min(1e-30))


def choose_formats(layers: dict, bpw: float, candidates: list[tuple[int, int]]) -> dict[str, tuple[int, int]]:
    """``{name: (bits, group_size)}`` for ``layers`` (``{name: (weight, importance)}``, importance: the mean
    squared input per column, the input Hessian's diagonal) within ``bpw`` bits per weight on average
    (weighted by each layer's size)."""
    frontiers, sizes = {}, {}
    for name, (weight, importance) in layers.items():
        fitting = [c for c in candidates if weight.shape[1] % axis_multiple(*c) == 0]
        if not fitting:
            raise ValueError(f"calibrate: no candidate format fits {name} (in_features={weight.shape[1]})")
        scored = sorted((bits_per_weight(*c), relative_error(weight.detach(), importance, *c), c) for c in fitting)
        frontier = []
        for cost, error, fmt in scored:  # keep only formats better than every cheaper one
            if not frontier or error < frontier[-1][1]:
                frontier.append((cost, error, fmt))
        frontiers[name], sizes[name] = frontier, weight.numel()
    total = sum(sizes.values())
    budget = bpw * total
    chosen = dict.fromkeys(frontiers, 0)
    spent = sum(frontiers[name][0][0] * sizes[name] for name in frontiers)
    if spent > budget + 1e-9:
        raise ValueError(f"calibrate: bpw={bpw} is below the cheapest candidate formats ({spent / total:.3f} bits "
                         "per weight)")
    while True:
        best = None
        for name, at in chosen.items():
            if at + 1 == len(frontiers[name]):
                continue
            (cost, error, _), (next_cost, next_error, _) = frontiers[name][at], frontiers[name][at + 1]
            extra = (next_cost - cost) * sizes[name]
            if spent + extra > budget + 1e-9:
                continue
            gain = (error - next_error) * sizes[name] / extra  # relative error weighted by the layer's size
            if best is None or gain > best[0]:
                best = (gain, name, extra)
        if best is None:
            return {name: frontiers[name][at][2] for name, at in chosen.items()}
        chosen[best[1]] += 1
        spent += best[2]
