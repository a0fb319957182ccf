"""PEFT's LoRA layer on a quantized base: ``y = base(x) + scaling * B(A(dropout(x)))``, the base never dequantized.

One class serves every quantized linear metalq runs: :class:`metalq.MetalLinear` (any bits, group size and
mode) and transformers' own ``MetalLinear`` (its packed tensor named ``weight`` or, on transformers' main branch, ``qweight``).
Training uses PEFT's forward unchanged: the base layer's autograd sends gradients to ``x`` only.

Merging cannot add the delta into a packed weight, so it builds a new base layer: the dequantized weight plus
the delta, either re-quantized in the base's own format (the default, as PEFT's HQQ and bitsandbytes layers
do) or kept float. The original base is kept until the adapter leaves, so ``unmerge`` restores it exactly.
"""
from __future__ import annotations

import copy
from typing import Any, Optional

import torch
from peft.tuners.lora import layer as lora_layer
from peft.tuners.tuners_utils import check_adapters_to_merge
from torch import nn

from ..embedding import MetalEmbedding, MetalTiedHead
from ..linear import MetalLinear
from ..moe import MetalExperts, MetalSwitchLinear
from ..ops import affine_dequantize, affine_quantize, fp_dequantize, fp_quantize

MERGE_TARGETS = ("quantized", "float")


def transformers_metal_linear() -> Optional[type]:
    """transformers' ``MetalLinear`` class, or None when transformers (or its Metal integration) is absent."""
    try:
        from transformers.integrations.metal_quantization import MetalLinear as TransformersMetalLinear
    except ImportError:
        return None
    return TransformersMetalLinear


def quantized_linear_types() -> tuple[type, ...]:
    """The quantized linear layers LoRA wraps: metalq's, and transformers' when it is installed."""
    foreign = transformers_metal_linear()
    return (MetalLinear,) + ((foreign,) if foreign is not None else ())


# Quantized modules of metalq's that LoRA does not wrap, with what to do instead.
UNSUPPORTED = {
    MetalEmbedding: "LoRA on a quantized embedding is not supported; keep the embedding float "
                    "(metalq.quantize_ without embeddings=True) or leave it out of target_modules",
    MetalTiedHead: "LoRA on an output head that reads a quantized embedding's table is not supported (the "
                   "table is the embedding's too); keep the embedding float or leave the head out of target_modules",
    MetalExperts: "LoRA on fused mixture-of-experts weights is not supported; target the attention "
                  "projections or other linear layers",
    MetalSwitchLinear: "LoRA on mixture-of-experts weights is not supported; target the attention "
                       "projections or other linear layers",
}


# ---- the packed weight of either family of quantized linear -------------------------------------------------

def _packed_name(module: nn.Module) -> str:
    """Where ``module`` keeps its uint32 codes: ``qweight`` (transformers' main branch) or ``weight``."""
    qweight = getattr(module, "qweight", None)
    return "qweight" if isinstance(qweight, torch.Tensor) and qweight.dtype == torch.uint32 else "weight"


def _float_dtype(module: nn.Module) -> torch.dtype:
    """The dtype a float version of ``module`` gets: its scales' (affine), else its ``float_dtype``."""
    if getattr(module, "mode", "affine") == "affine":
        return module.scales.dtype
    return module.float_dtype


def dequantized_weight(module: nn.Module) -> torch.Tensor:
    """The ``(out_features, in_features)`` float32 weight of a quantized linear."""
    packed = getattr(module, _packed_name(module))
    mode = getattr(module, "mode", "affine")
    if mode != "affine":
        return fp_dequantize(packed, module.scales, mode, dtype=torch.float32)
    scales = module.scales.float()
    return affine_dequantize(packed, scales, module.qbiases.float(), module.group_size, module.bits)


def _requantized(module: nn.Module, weight: torch.Tensor, bias: Optional[torch.Tensor]) -> nn.Module:
    """A copy of ``module`` (same class, format and dtypes) holding ``weight`` quantized, and ``bias``."""
    mode = getattr(module, "mode", "affine")
    scales_dtype = module.scales.dtype
    if mode == "affine":
        packed, scales, biases = affine_quantize(weight.to(scales_dtype), module.group_size, module.bits)
        tensors = {_packed_name(module): packed, "scales": scales, "qbiases": biases}
    else:
        packed, scales = fp_quantize(weight.to(module.float_dtype), mode)
        tensors = {_packed_name(module): packed, "scales": scales}
    if bias is not None:
        tensors["bias"] = bias
    new = copy.copy(module)
    # a shallow copy shares the tensor dictionaries: give the copy its own before replacing entries
    new._parameters, new._buffers = dict(module._parameters), dict(module._buffers)
    for name, tensor in tensors.items():
        if name in new._parameters:
            trainable = name == "bias" and module._parameters[name].requires_grad
            new._parameters[name] = nn.Parameter(tensor, requires_grad=trainable)
        else:
            new._buffers[name] = tensor
    return new


def _float_linear(module: nn.Module, weight: torch.Tensor, bias: Optional[torch.Tensor]) -> nn.Linear:
    dtype = _float_dtype(module)
    linear = nn.Linear(module.in_features, module.out_features, bias=bias is not None, device="meta", dtype=dtype)
    linear.weight = nn.Parameter(weight.to(dtype))
    if bias is not None:
        linear.bias = nn.Parameter(bias.to(dtype))
    return linear


# ---- the LoRA layer ---------------------------------------------------------------------------------------------

class QuantizedLoraLinear(lora_layer.Linear):
    """PEFT's ``lora.Linear`` over a frozen quantized linear; registered for it by :func:`metalq.peft.register`.

    ``merge_to`` chooses what merging builds: ``"quantized"`` (default; the base's format) or ``"float"``
    (an ``nn.Linear``). :func:`metalq.peft.merge_and_unload` sets it for a whole model.
    """

    def __init__(self, base_layer: nn.Module, adapter_name: str, config, **kwargs: Any) -> None:
        if config.fan_in_fan_out:
            raise ValueError("metalq.peft: fan_in_fan_out=True is for transformers' Conv1D; quantized linear "
                             "layers store (out_features, in_features): set fan_in_fan_out=False")
        super().__init__(base_layer, adapter_name, config=config, **kwargs)
        self.merge_to = "quantized"
        self._unmerged_bases: list[nn.Module] = []  # plain list: not registered, not in the state_dict

    def _get_in_out_features(self, module: nn.Module) -> tuple[int, int]:
        return module.in_features, module.out_features

    def resolve_lora_variant(self, *, config, **kwargs):
        variant = super().resolve_lora_variant(config=config, **kwargs)
        if variant is not None:
            raise ValueError(f"metalq.peft: the LoRA variant {type(variant).__name__} (DoRA and the like) needs the "
                             f"base weight in float at every step; quantized layers take plain LoRA only")
        return None

    def check_mergeable(self, merge_to: str, adapter_names: Optional[list[str]] = None) -> None:
        """Raise ``ValueError`` if merging into ``merge_to`` cannot represent this layer's result; changes nothing."""
        if merge_to not in MERGE_TARGETS:
            raise ValueError(f"metalq.peft: merge_to must be one of {MERGE_TARGETS}, got {merge_to!r}")
        base = self.get_base_layer()
        for name in check_adapters_to_merge(self, adapter_names):
            if name in self.lora_A and self.lora_bias[name] and getattr(base, "bias", None) is None:
                raise ValueError(f"metalq.peft: adapter {name!r} has a LoRA bias (lora_bias=True) but the base layer "
                                 f"has no bias to merge it into")

    @torch.no_grad()
    def merge(self, safe_merge: bool = False, adapter_names: Optional[list[str]] = None) -> None:
        """Replace the base layer by one holding ``dequantize(base) + delta`` (re-quantized unless ``merge_to``
        is ``"float"``). ``safe_merge`` checks the sum is finite before anything changes."""
        adapter_names = [name for name in check_adapters_to_merge(self, adapter_names) if name in self.lora_A]
        if not adapter_names:
            return
        self.check_mergeable(self.merge_to, adapter_names)
        base = self.get_base_layer()
        weight = dequantized_weight(base)
        bias = None if getattr(base, "bias", None) is None else base.bias.detach().float()
        for name in adapter_names:
            weight = weight + self.get_delta_weight(name).to(weight)
            if self.lora_bias[name]:
                bias = bias + self.lora_B[name].bias.detach().float() * self.scaling[name]
        if safe_merge and not (torch.isfinite(weight).all() and (bias is None or torch.isfinite(bias).all())):
            raise ValueError(f"metalq.peft: the merged weight is not finite; adapter(s) {adapter_names} seem broken")
        merged = _requantized(base, weight, bias) if self.merge_to == "quantized" else _float_linear(base, weight, bias)
        self._unmerged_bases.append(base)
        self._set_base(merged)
        self.merged_adapters.extend(adapter_names)

    def unmerge(self) -> None:
        """Put back the base layer as it was before the first merge, exactly."""
        if not self.merged:
            return
        self._set_base(self._unmerged_bases[0])
        self._unmerged_bases.clear()
        self.merged_adapters.clear()

    def _set_base(self, module: nn.Module) -> None:
        # PEFT may nest tuner layers; the quantized module is the innermost base_layer
        holder = self
        while isinstance(holder.base_layer, lora_layer.LoraLayer):
            holder = holder.base_layer
        holder.base_layer = module


def check_target(module: nn.Module, name: str) -> None:
    """Raise ``ValueError`` naming ``name`` if ``module`` is a quantized layer LoRA cannot wrap."""
    for kind, advice in UNSUPPORTED.items():
        if isinstance(module, kind):
            raise ValueError(f"metalq.peft: {name} is a {kind.__name__}: {advice}")
