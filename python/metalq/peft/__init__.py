"""QLoRA with PEFT on metalq's quantized layers: wrap, train, merge, save and load adapters.

PEFT wraps only the layer types it knows; :func:`register` teaches a ``LoraConfig`` metalq's quantized
linears (:class:`metalq.MetalLinear` in every bits, group size and mode, and transformers' own
``MetalLinear``) through PEFT's custom-module hook. :func:`get_peft_model` registers,
resolves ``target_modules="all-linear"`` over quantized layers too (PEFT's own shorthand collects only
``nn.Linear``) and checks every target before anything changes. The frozen base is never dequantized while
training: gradients reach the activations through the quantized product and the LoRA factors train.

Example:
    >>> metalq.quantize_(model, metalq.MetalConfig(bits=4, group_size=64))
    >>> model = metalq.peft.get_peft_model(model, peft.LoraConfig(r=8, target_modules="all-linear"))
    >>> ...  # train as usual: plain PyTorch, or transformers' Trainer
    >>> model.save_pretrained("adapter")                                   # PEFT's adapter files
    >>> merged = metalq.peft.merge_and_unload(model)                       # a metalq model again
"""
from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any, Optional, Union

from torch import nn

from .layers import MERGE_TARGETS, QuantizedLoraLinear, check_target, quantized_linear_types
from .mlx_adapters import load_mlx_adapter, save_mlx_adapter

ALL_LINEAR = "all-linear"

__all__ = [
    "ALL_LINEAR", "QuantizedLoraLinear", "register", "get_peft_model", "from_pretrained", "merge_and_unload",
    "linear_targets", "load_mlx_adapter", "save_mlx_adapter",
]


def register(config):
    """Register metalq's LoRA layer on ``config`` (a ``peft.LoraConfig``) for every quantized linear type; returns it.

    PEFT does not save the registration: register again on the config given to ``PeftModel.from_pretrained``
    (or use :func:`from_pretrained`, which does).
    """
    from peft import LoraConfig

    if not isinstance(config, LoraConfig):
        raise TypeError(f"metalq.peft: config must be a peft.LoraConfig, got {type(config).__name__}")
    config._register_custom_module({kind: QuantizedLoraLinear for kind in quantized_linear_types()})
    return config


def linear_targets(model: nn.Module) -> set[str]:
    """The names of every linear layer of ``model``, float or quantized, but its output head: what PEFT's
    ``"all-linear"`` means, extended to metalq's and transformers' quantized linears."""
    from peft.tuners.tuners_utils import BaseTunerLayer
    from transformers.pytorch_utils import Conv1D

    kinds = (nn.Linear, Conv1D) + quantized_linear_types()
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    inside_adapters = {
        f"{prefix}.{suffix}"
        for prefix, module in model.named_modules() if isinstance(module, BaseTunerLayer)
        for suffix, _ in module.named_modules() if suffix
    }
    return {
        name for name, module in model.named_modules()
        if isinstance(module, kinds) and module is not head and name not in inside_adapters
    }


def get_peft_model(model: nn.Module, config, **kwargs: Any):
    """``peft.get_peft_model`` for a model holding metalq (or transformers') quantized layers.

    Registers metalq's LoRA layer on ``config`` (:func:`register`), replaces ``target_modules="all-linear"``
    by :func:`linear_targets`, and checks every targeted module first: a quantized module LoRA cannot wrap
    (a quantized embedding or the head tied to it, mixture-of-experts weights) raises ``ValueError`` naming it, with the model unchanged.
    ``kwargs`` go to ``peft.get_peft_model``.
    """
    import peft
    from peft.tuners.tuners_utils import check_target_module_exists

    register(config)
    if isinstance(config.target_modules, str) and config.target_modules.lower() == ALL_LINEAR:
        config.target_modules = linear_targets(model)
    for name, module in model.named_modules():
        if name and check_target_module_exists(config, name):
            check_target(module, name)
    return peft.get_peft_model(model, config, **kwargs)


def from_pretrained(model: nn.Module, adapter: Union[str, os.PathLike], **kwargs: Any):
    """``peft.PeftModel.from_pretrained(model, adapter, ...)`` onto a metalq base: reads the adapter's
    ``LoraConfig`` and registers metalq's layer on it. ``is_trainable=True`` to train further."""
    from peft import LoraConfig, PeftModel

    config = kwargs.pop("config", None) or LoraConfig.from_pretrained(str(adapter))
    _check_adapter_fits(model, Path(adapter) / SAFETENSORS_WEIGHTS_NAME)
    return PeftModel.from_pretrained(model, str(adapter), config=register(config), **kwargs)


SAFETENSORS_WEIGHTS_NAME = "adapter_model.safetensors"  # PEFT's file name
_FACTOR = re.compile(r"^(?:base_model\.model\.)?(?P<module>.+)\.lora_(?P<side>A|B)\.weight$")


def _check_adapter_fits(model: nn.Module, weights: Path) -> None:
    """Raise ``ValueError`` naming the first LoRA factor of ``weights`` whose module is missing from ``model``
    or whose shape does not fit it, before PEFT injects anything."""
    from safetensors import safe_open

    if not weights.is_file():
        return  # PEFT reports a missing adapter itself (it also reads the older .bin files)
    modules = dict(model.named_modules())
    with safe_open(str(weights), framework="pt") as handle:
        for key in handle.keys():
            match = _FACTOR.match(key)
            if match is None:
                continue
            name, side = match["module"], match["side"]
            module = modules.get(name)
            if module is None or not hasattr(module, "in_features"):
                raise ValueError(f"{weights}: {key} is for module {name!r}, which the model has no linear layer for")
            rows, cols = handle.get_slice(key).get_shape()
            # lora_A is (r, in_features), lora_B (out_features, r)
            which, size = ("in_features", cols) if side == "A" else ("out_features", rows)
            if size != getattr(module, which):
                raise ValueError(f"{weights}: {key} has shape {[rows, cols]}, which does not fit {name} "
                                 f"({which}={getattr(module, which)})")


def merge_and_unload(
    model,
    *,
    quantized: bool = True,
    safe_merge: bool = False,
    adapter_names: Optional[list[str]] = None,
    progressbar: bool = False,
) -> nn.Module:
    """Merge the adapters into their base layers and return the base model without PEFT's wrappers.

    Args:
        model: a ``PeftModel`` (or PEFT-injected model) over metalq layers.
        quantized: True (default) re-quantizes each merged layer in its base's format, so the model stays a
            metalq model of the same size; False gives float ``nn.Linear`` layers (dequantized base + delta).
        safe_merge, adapter_names, progressbar: as ``PeftModel.merge_and_unload``.

    Every layer is checked before the first merge: a merge that cannot be represented (a LoRA bias,
    ``lora_bias=True``, on a base layer without a bias) raises ``ValueError`` and leaves the model unchanged. Layers of other types (float ``nn.Linear``) merge as PEFT merges them.
    """
    merge_to = MERGE_TARGETS[0] if quantized else MERGE_TARGETS[1]
    layers = [module for module in model.modules() if isinstance(module, QuantizedLoraLinear)]
    for layer in layers:
        layer.check_mergeable(merge_to, adapter_names)
    for layer in layers:
        layer.merge_to = merge_to
    return model.merge_and_unload(progressbar=progressbar, safe_merge=safe_merge, adapter_names=adapter_names)
