"""Affine group parameters and codes for a chosen range, and the MetalLinear they make.

Every method here picks, per group, the range ``[low, high]`` the codes cover (clip search) or the codes
themselves (GPTQ); the parameters then follow MLX's own rule (metalq.reference.affine_quantize), so the output
is an ordinary MLX affine checkpoint.
"""
from __future__ import annotations

import torch
from torch import nn

from ..linear import MetalLinear
from ..ops import pack
from ..reference import affine_group_params

def group_params(low: torch.Tensor, high: torch.Tensor, bits: int, dtype: torch.dtype):
    """``(scale, bias)`` of groups whose values span ``[low, high]``, by MLX's rule
    (:func:`metalq.reference.affine_group_params`), rounded to the storage ``dtype`` and returned in float32."""
    scale, bias = affine_group_params(low.float(), high.float(), bits)
    return scale.to(dtype).float(), bias.to(dtype).float()


def codes_for(w: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor, bits: int) -> torch.Tensor:
    """The nearest codes of ``w`` (``(..., group_size)``) for per-group ``scale``/``bias`` (``(...,)``), float32."""
    return torch.round((w - bias.unsqueeze(-1)) / scale.unsqueeze(-1)).clamp(0, (1 << bits) - 1)


def metal_linear_from_codes(linear: nn.Linear, codes: torch.Tensor, scales: torch.Tensor, biases: torch.Tensor,
                            bits: int, group_size: int) -> MetalLinear:
    """A MetalLinear holding ``codes`` (``(out, in)``, integral float), ``scales``/``biases`` (``(out, groups)``)
    in the layer's dtype, and the layer's bias."""
    dtype = linear.weight.dtype
    layer = MetalLinear(linear.in_features, linear.out_features, bias=linear.bias is not None, bits=bits,
                        group_size=group_size, dtype=dtype, device="meta")
    device = linear.weight.device
    layer.weight = pack(codes.to(device=device, dtype=torch.uint8), bits)
    layer.scales = scales.to(device=device, dtype=dtype)
    layer.qbiases = biases.to(device=device, dtype=dtype)
    if linear.bias is not None:
        layer.bias = nn.Parameter(linear.bias.detach().clone(), requires_grad=linear.bias.requires_grad)
    return layer
