"""Clip search: per group, the shrink of the range ``[min, max]`` that minimises the (weighted) error.

Rounding to nearest over the full range spends levels on rare outliers; shrinking the range by a ratio
``r`` clips them and refines every other value. Each group keeps the ratio of least
``sum_k h_k (w_k - dequantized_k)^2``: with ``h = 1`` the weight error (data-free), with ``h = diag(X^T X)``
from calibration activations the expected output error of that column's contribution.
"""
from __future__ import annotations

from typing import Optional

import torch

from .codes import codes_for, group_params

SHRINK_RATIOS = tuple(1.0 - 0.025 * i for i in range(21))  # 1.0 down to 0.5
_ROWS_PER_STEP = 4096  # rows searched at once: bounded memory for any layer


def clip_search(w: torch.Tensor, bits: int, group_size: int, importance: Optional[torch.Tensor] = None,
                dtype: Optional[torch.dtype] = None):
    """``(codes, scales, biases)`` of ``w`` (``(rows, cols)``) with the best shrink per group.

    Args:
        w: the float weight; importance: ``(cols,)`` non-negative weights of each column's squared error
            (``None``: plain weight error); dtype: storage dtype of the scales (default ``w.dtype``).

    Returns:
        codes ``(rows, cols)`` float32 integers, scales and biases ``(rows, cols / group_size)`` float32 (already
        rounded to ``dtype``).
    """
    dtype = dtype or w.dtype
    rows, cols = w.shape
    groups = cols // group_size
    weights = torch.ones(cols) if importance is None else importance.float().clamp_min(0)
    weights = weights.to(w.device).view(groups, group_size)
    codes = torch.empty(rows, cols, dtype=torch.float32, device=w.device)
    scales = torch.empty(rows, groups, dtype=torch.float32, device=w.device)
    biases = torch.empty_like(scales)
    for start in range(0, rows, _ROWS_PER_STEP):
        part = w[start:start + _ROWS_PER_STEP].float().view(-1, groups, group_size)
        low, high = part.amin(-1), part.amax(-1)
        best = None
        for ratio in SHRINK_RATIOS:
            scale, bias = group_params(low * ratio, high * ratio, bits, dtype)
            q = codes_for(part, scale, bias, bits)
            error = ((q * scale.unsqueeze(-1) + bias.unsqueeze(-1) - part).pow(2) * weights).sum(-1)
            if best is None:
                best = [error, q, scale, bias]
                continue
            better = error < best[0]
            best[0] = torch.where(better, error, best[0])
            best[1] = torch.where(better.unsqueeze(-1), q, best[1])
            best[2] = torch.where(better, scale, best[2])
            best[3] = torch.where(better, bias, best[3])
        stop = start + part.shape[0]
        codes[start:stop] = best[1].reshape(-1, cols)
        scales[start:stop], biases[start:stop] = best[2], best[3]
    return codes, scales, biases
