"""GPTQ (Frantar et al., 2022): round one column at a time, pushing each column's rounding error onto the
columns not yet rounded, weighted by the inverse Hessian ``H = X^T X`` of the layer's calibration inputs.

Grouped to metalq's format: a group's scale and bias are chosen (by the clip search, on the weights as the
earlier columns' corrections left them) when the sweep reaches its first column, then its columns are
rounded in order. Columns run in their natural order, so every group is contiguous as the format needs.
"""
from __future__ import annotations

import torch

from .clip import clip_search

DAMPING = 0.01  # fraction of the mean diagonal added to H, as the paper's 1%
BLOCK_COLUMNS = 128  # columns updated eagerly; the rest of the matrix receives their errors in one product


def inverse_hessian_factor(hessian: torch.Tensor, damping: float = DAMPING) -> torch.Tensor:
    """The upper Cholesky factor of ``(H + damping * mean(diag H) * I)^-1`` (float64 inside); columns
    never seen (zero diagonal) get a unit diagonal."""
    h = hessian.double().clone()
    dead = torch.diag(h) == 0
    h[dead, dead] = 1.0
    h.diagonal().add_(damping * torch.diag(h).mean())
    inverse = torch.cholesky_inverse(torch.linalg.cholesky(h))
    return torch.linalg.cholesky(inverse, upper=True).float()


def gptq_quantize(w: torch.Tensor, hessian: torch.Tensor, bits: int, group_size: int, dtype=None,
                  damping: float = DAMPING):
    """``(codes, scales, biases)`` of ``w`` (``(rows, cols)``) by GPTQ with the input Hessian ``hessian``
    (``(cols, cols)``); shapes and dtypes as :func:`metalq.calibration.clip.clip_search`."""
    dtype = dtype or w.dtype
    rows, cols = w.shape
    block_columns = max(group_size, BLOCK_COLUMNS - BLOCK_COLUMNS % group_size)
    weight = w.detach().float().clone()
    dead = torch.diag(hessian) == 0
    weight[:, dead] = 0.0
    factor = inverse_hessian_factor(hessian, damping).to(weight.device)
    importance = torch.diag(hessian).float().to(weight.device)
    codes = torch.empty_like(weight)
    scales = torch.empty(rows, cols // group_size, dtype=torch.float32, device=weight.device)
    biases = torch.empty_like(scales)
    for start in range(0, cols, block_columns):
        stop = min(start + block_columns, cols)
        block = weight[:, start:stop].clone()
        errors = torch.zeros_like(block)
        block_factor = factor[start:stop, start:stop]
        for i in range(stop - start):
            column = start + i
            if column % group_size == 0:
                group = column // group_size
                _, scale, bias = clip_search(block[:, i:i + group_size], bits, group_size,
                                             importance[column:column + group_size], dtype)
                scales[:, group], biases[:, group] = scale[:, 0], bias[:, 0]
            scale, bias = scales[:, column // group_size], biases[:, column // group_size]
            q = torch.round((block[:, i] - bias) / scale).clamp(0, (1 << bits) - 1)
            codes[:, column] = q
            error = (block[:, i] - (q * scale + bias)) / block_factor[i, i]
            block[:, i:] -= error.unsqueeze(1) * block_factor[i, i:].unsqueeze(0)
            errors[:, i] = error
        weight[:, stop:] -= errors @ factor[start:stop, stop:]
    return codes, scales, biases
