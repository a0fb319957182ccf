"""MetalLinear: an ``nn.Linear`` whose weight is stored MLX-quantized, in transformers' Metal layout."""
from __future__ import annotations

from typing import Optional, Union

import torch
from torch import nn

from .config import axis_multiple, resolve_format
from .ops import affine_dequantize, affine_qmm_t, affine_quantize, fp_dequantize, fp_qmm_t, fp_quantize


def register_packed_buffers(module: nn.Module, owner: str, rows: Union[int, tuple[int, ...]], cols: tuple[str, int],
                            bits: Optional[int], group_size: Optional[int], dtype, device, mode: str = "affine") -> None:
    """Validates the format and gives ``module`` the frozen buffers of packed ``rows x cols[1]`` matrices:
    ``weight`` uint32 ``(*rows, cols*bits/32)`` and ``scales`` ``(*rows, cols/group_size)`` (uint8 in the
    floating-point modes), in affine mode also ``qbiases``; plus ``module.bits``, ``module.group_size`` and
    ``module.mode`` (``None`` bits / group size take the mode's defaults). ``rows`` is an int, or a shape for
    a stack of matrices; ``cols`` is ``(argument name, value)`` for the error message."""
    bits, group_size = resolve_format(owner, bits, group_size, mode)
    name, n = cols
    multiple = axis_multiple(bits, group_size)
    if n % multiple:
        words = "" if multiple == group_size else f" and {name} * bits={bits} by 32 (whole uint32 words), so by {multiple}"
        raise ValueError(f"{owner}: {name}={n} must be divisible by group_size={group_size}{words}")
    module.bits, module.group_size, module.mode = bits, group_size, mode
    rows = (rows,) if isinstance(rows, int) else tuple(rows)
    groups = (*rows, n // group_size)
    module.register_buffer("weight", torch.zeros(*rows, n * bits // 32, dtype=torch.uint32, device=device))
    if mode != "affine":
        module.register_buffer("scales", torch.zeros(groups, dtype=torch.uint8, device=device))
        return
    module.register_buffer("scales", torch.zeros(groups, dtype=dtype, device=device))
    module.register_buffer("qbiases", torch.zeros(groups, dtype=dtype, device=device))


class MetalLinear(nn.Module):
    """``y = x @ dequantize(weight).T + bias`` with a low-bit weight that is never materialised.

    The state_dict is transformers' Metal layout, so its checkpoints load unchanged:
    ``weight`` uint32 ``(out_features, in_features*bits/32)`` packed along in_features,
    ``scales`` and ``qbiases`` ``(out_features, in_features/group_size)`` in a float dtype, and an
    optional float ``bias``. In the floating-point modes (``mode="mxfp4"``, ``"nvfp4"``, ``"mxfp8"``)
    ``scales`` is uint8 and there is no ``qbiases``. The quantized tensors are frozen buffers (they follow ``.to()``, meta-device
    construction and ``load_state_dict(assign=True)``); ``bias`` is a parameter, and gradients reach the
    input, so adapters such as LoRA train on top of a frozen quantized base.

    Args:
        in_features, out_features: as ``nn.Linear``; ``in_features`` must be divisible by ``group_size``.
        bias: whether to hold a float bias.
        bits, group_size, mode: the quantization format (see :class:`metalq.MetalConfig`).
        dtype: float dtype of ``scales``, ``qbiases`` and ``bias`` (default: torch's default dtype); in the
            floating-point modes the dtype :meth:`dequantize` produces.
        device: where to allocate; ``"meta"`` builds a shell for ``load_state_dict(..., assign=True)``.

    Example:
        >>> layer = MetalLinear.from_linear(nn.Linear(4096, 4096), bits=4, group_size=64)
        >>> y = layer(torch.randn(2, 4096))
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool = True,
        bits: Optional[int] = None,
        group_size: Optional[int] = None,
        dtype: Optional[torch.dtype] = None,
        device=None,
        mode: str = "affine",
    ):
        super().__init__()
        register_packed_buffers(self, "MetalLinear", out_features, ("in_features", in_features), bits, group_size,
                                dtype, device, mode)
        self.in_features, self.out_features = in_features, out_features
        self.float_dtype = dtype or torch.get_default_dtype()
        self.bias = nn.Parameter(torch.zeros(out_features, dtype=dtype, device=device)) if bias else None

    @classmethod
    def from_linear(
        cls, linear: nn.Linear, bits: Optional[int] = None, group_size: Optional[int] = None, mode: str = "affine"
    ) -> "MetalLinear":
        """Quantize ``linear.weight`` (bit-identical to ``mx.quantize``); affine scales keep the weight's dtype."""
        weight = linear.weight.detach()
        layer = cls(
            linear.in_features,
            linear.out_features,
            bias=linear.bias is not None,
            bits=bits,
            group_size=group_size,
            dtype=weight.dtype,
            device="meta",  # the buffers are replaced just below; skip allocating them twice
            mode=mode,
        )
        if mode == "affine":
            layer.weight, layer.scales, layer.qbiases = affine_quantize(weight, layer.group_size, layer.bits)
        else:
            layer.weight, layer.scales = fp_quantize(weight, mode)
        if linear.bias is not None:
            layer.bias = nn.Parameter(linear.bias.detach().clone(), requires_grad=linear.bias.requires_grad)
        return layer

    def dequantize(self) -> nn.Linear:
        """A float ``nn.Linear`` holding the dequantized weight, on the device of ``scales``, in their dtype
        (affine) or in ``float_dtype`` (the floating-point modes)."""
        if self.mode == "affine":
            weight = affine_dequantize(self.weight, self.scales, self.qbiases, self.group_size, self.bits)
        else:
            weight = fp_dequantize(self.weight, self.scales, self.mode, dtype=self.float_dtype)
        linear = nn.Linear(
            self.in_features,
            self.out_features,
            bias=self.bias is not None,
            dtype=weight.dtype,
            device="meta",  # parameters are assigned just below
        )
        linear.weight = nn.Parameter(weight)
        if self.bias is not None:
            linear.bias = nn.Parameter(self.bias.detach().clone(), requires_grad=self.bias.requires_grad)
        return linear

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.mode != "affine":
            y = fp_qmm_t(x, self.weight, self.scales, self.mode)
        else:
            # the kernel takes scales and biases in the activation dtype, as transformers' MetalLinear passes them
            y = affine_qmm_t(
                x, self.weight, self.scales.to(x.dtype), self.qbiases.to(x.dtype), self.group_size, self.bits
            )
        if self.bias is None:
            return y
        bias = self.bias.to(y.dtype)
        if torch.is_grad_enabled() and (y.requires_grad or bias.requires_grad):
            return y + bias
        return y.add_(bias)  # y is this call's own: no second (M, N) allocation and pass

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
            f"bits={self.bits}, group_size={self.group_size}" + ("" if self.mode == "affine" else f", mode={self.mode}")
        )
