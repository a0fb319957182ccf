"""transformers integration: run Metal-quantized (and mlx-lm) checkpoints through metalq, on any device.

Two entry points:

* :func:`use_metalq_kernel` routes transformers' own ``MetalLinear`` (``MetalConfig`` /
  ``quant_method="metal"`` models loaded by ``AutoModel*.from_pretrained``) to metalq's ``affine_qmm_t``:
  no Hub download, no ``kernels`` package, and pre-quantized checkpoints stay quantized on CPU too.
* :func:`from_pretrained` builds a transformers model from a quantized directory (transformers' Metal
  layout or an ``mlx_lm.convert`` output) with metalq's modules: ``MetalLinear``, ``MetalEmbedding`` for
  quantized embeddings, ``MetalTiedHead`` for output heads tied to them. Any bits (1-8) and per-layer formats.

transformers' releases (5.24, 5.25) name a Metal layer's packed tensor ``weight``; its main branch names it
``qweight``. metalq reads both, and writes the one :func:`packed_weight_name` finds in the installed version.
"""
from __future__ import annotations

import os
from functools import partial
from pathlib import Path
from typing import Any, Optional, Union

import torch
from torch import nn

from . import ops
from .checkpoint import CONFIG_NAME, checkpoint_kind, load_quantized, read_config
from .checkpoint.gguf import GGUF_SUFFIX, load_gguf_into, open_gguf
from .checkpoint.layout import QUANTIZATION_KEYS


# ---- transformers' own MetalLinear -> metalq -------------------------------------------------------------

def use_metalq_kernel(quantizer: bool = True) -> None:
    """Make transformers' Metal quantization run on metalq's kernels. Call once, before loading models.

    * Sets ``transformers.integrations.metal_quantization._metal_kernel`` to :mod:`metalq.ops`, whose
      ``affine_qmm_t(x, w, scales, biases, group_size, bits)`` and ``quantized_matmul(x, w, scales, biases,
      transpose=True, group_size=, bits=)`` are the calls transformers' ``MetalLinear`` makes (the first in
      releases up to 5.25, the second in newer code), so ``_get_metal_kernel()`` never fetches the Hub kernel.
    * With ``quantizer=True`` (default), registers a subclass of transformers' ``MetalHfQuantizer`` for
      ``quant_method="metal"`` that does not require MPS or the ``kernels`` package: pre-quantized
      checkpoints load quantized on CPU (instead of being dequantized), and ``device_map`` defaults to
      ``"mps"`` when available, else ``"cpu"``. It reports ``is_trainable``, so transformers' ``Trainer``
      accepts the model with adapters attached. Quantizing float checkpoints on the fly still uses
      transformers' own quantizer code (and its ``MetalConfig``, which accepts bits 2, 4 and 8 only).

    Idempotent. Only transformers' Metal path changes; other quantization methods are untouched.

    Example:
        >>> import metalq.transformers
        >>> metalq.transformers.use_metalq_kernel()
        >>> model = AutoModelForCausalLM.from_pretrained("some-model-metal-4bit")   # runs on CPU or MPS
    """
    from transformers.integrations import metal_quantization

    # transformers' MetalLinear calls its kernel's affine_qmm_t(x, w, scales, qbiases, group_size, bits) or, in
    # newer versions, quantized_matmul(x, w, scales, qbiases, transpose=True, group_size=, bits=): ops has both
    metal_quantization._metal_kernel = ops
    if quantizer:
        from transformers.quantizers import auto

        auto.AUTO_QUANTIZER_MAPPING["metal"] = _metalq_quantizer_class()


_QUANTIZER_CLASS = None


def _metalq_quantizer_class():
    global _QUANTIZER_CLASS
    if _QUANTIZER_CLASS is not None:
        return _QUANTIZER_CLASS
    from transformers.quantizers.quantizer_metal import MetalHfQuantizer

    class MetalqHfQuantizer(MetalHfQuantizer):
        """transformers' Metal quantizer with metalq's kernels: any device, no ``kernels`` package."""

        def validate_environment(self, *args, **kwargs):
            device_map = kwargs.get("device_map")
            if (
                not self.quantization_config.dequantize
                and isinstance(device_map, dict)
                and "disk" in device_map.values()
            ):
                raise ValueError("metalq: Metal-quantized layers cannot be offloaded to disk")

        def update_device_map(self, device_map):
            if device_map is None:
                device_map = {"": "mps" if torch.backends.mps.is_available() else "cpu"}
            return device_map

        @property
        def is_trainable(self) -> bool:
            # metalq's kernels have gradients for the activations: adapters (LoRA) train on the frozen base
            return True

    _QUANTIZER_CLASS = MetalqHfQuantizer
    return MetalqHfQuantizer


def packed_weight_name() -> str:
    """The name the installed transformers gives a Metal layer's packed uint32 tensor: ``"qweight"`` when its
    ``MetalLinear`` holds one (transformers' main branch), else ``"weight"`` (releases 5.24 and 5.25, and
    without transformers). :func:`metalq.save_quantized` writes the Metal layout with it."""
    try:
        from transformers.integrations.metal_quantization import MetalLinear
    except ImportError:
        return "weight"
    with torch.device("meta"):  # a pre-quantized shell, nothing allocated
        probe = MetalLinear(in_features=64, out_features=1, bits=4, group_size=64)
    return "qweight" if "qweight" in probe.state_dict() else "weight"


# ---- from_pretrained: metalq modules from a quantized directory -------------------------------------------

def from_pretrained(
    path: Union[str, os.PathLike],
    *,
    dtype: Optional[torch.dtype] = None,
    device: Union[str, torch.device, None] = None,
    model_class: Any = None,
    attn_implementation: Optional[str] = None,
    strict: bool = True,
    dequantize_unsupported: bool = False,
) -> nn.Module:
    """Load a quantized checkpoint directory or a GGUF file as a transformers model that runs quantized through metalq.

    The architecture is built on the meta device (no float weights are ever allocated) from ``config.json``, or
    from a GGUF file's metadata through transformers' own GGUF config mapping; then :func:`metalq.load_quantized`
    (or, for GGUF, :func:`metalq.checkpoint.load_gguf_into`) swaps in ``MetalLinear`` for every quantized
    Linear, ``MetalEmbedding`` for quantized embeddings and ``MetalTiedHead`` for an output head tied to a
    quantized embedding, following the checkpoint's ``quantization_config`` (transformers' Metal layout,
    ``qbiases``, the packed tensor spelled ``weight`` or ``qweight``), mlx-lm's ``quantization`` block
    (``biases``, per-layer overrides; a layer is quantized exactly when ``{path}.scales`` is present) or each GGUF
    tensor's ggml type. Non-persistent buffers (rotary frequencies) are computed.

    Args:
        path: a local directory with ``config.json`` and ``model.safetensors`` (or shards), or a ``.gguf`` file.
        dtype: float dtype of activations, norms and scales (default: the config's ``dtype`` /
            ``torch_dtype``, else float32; float32 for GGUF, which keeps llama.cpp's values exactly: a lower
            dtype rounds the scales as it rounds the activations). The packed weights are unaffected.
        device: where to put the model (default: ``"mps"`` when available, else ``"cpu"``).
        model_class: a transformers auto class or model class (default ``AutoModelForCausalLM``).
        attn_implementation: passed to transformers (``"sdpa"``, ``"eager"``, ...).
        strict: fail on checkpoint tensors the model has no place for.
        dequantize_unsupported: GGUF only: load tensors of ggml types metalq has no format for (IQ*, TQ*, ...)
            dequantized to float with a warning, instead of raising ``ValueError`` naming the first.

    Returns:
        The model in eval mode; ``generate`` works as usual (greedy, sampling, batched with left padding).

    Example:
        >>> model = metalq.transformers.from_pretrained("Qwen2.5-0.5B-Instruct-4bit")  # an mlx_lm.convert output
        >>> model = metalq.transformers.from_pretrained("Llama-3.2-1B-Instruct-Q4_K_M.gguf")
        >>> out = model.generate(**tokenizer(["Hello"], return_tensors="pt"), max_new_tokens=20)
    """
    import transformers

    path = Path(path)
    if path.suffix == GGUF_SUFFIX:
        open_gguf(path)  # a missing or broken file is reported as such, before transformers reads it
        config = transformers.AutoConfig.from_pretrained(str(path.parent), gguf_file=path.name)
        dtype = dtype or torch.float32
        load = partial(load_gguf_into, path=path, dequantize_unsupported=dequantize_unsupported)
    else:
        if dequantize_unsupported:
            raise ValueError("from_pretrained: dequantize_unsupported applies to GGUF files only")
        raw = read_config(path)
        if checkpoint_kind(raw) is None:
            raise ValueError(
                f"{path / CONFIG_NAME}: not a quantized checkpoint (no 'quantization_config' or 'quantization'); "
                "load it with transformers and quantize it with metalq.quantize_"
            )
        dtype = dtype or _config_dtype(raw) or torch.float32
        config = _model_config(raw)
        load = partial(load_quantized, directory=path, strict=strict)
    device = torch.device(device or ("mps" if torch.backends.mps.is_available() else "cpu"))
    model_class = model_class or transformers.AutoModelForCausalLM
    kwargs = {} if attn_implementation is None else {"attn_implementation": attn_implementation}
    with torch.device("meta"):
        if hasattr(model_class, "from_config"):
            model = model_class.from_config(config, dtype=dtype, **kwargs)
        else:  # a concrete model class
            model = model_class._from_config(config, dtype=dtype, **kwargs)
    load(model)
    _materialize_buffers(model)
    model.to(device=device, dtype=dtype)  # floating tensors only: the packed uint32 weights keep their dtype
    generation = path / "generation_config.json"
    if generation.is_file() and getattr(model, "generation_config", None) is not None:
        model.generation_config = transformers.GenerationConfig.from_pretrained(path)
    return model.eval()


def _config_dtype(raw: dict[str, Any]) -> Optional[torch.dtype]:
    text = raw.get("text_config") if isinstance(raw.get("text_config"), dict) else {}
    name = raw.get("dtype") or raw.get("torch_dtype") or text.get("dtype") or text.get("torch_dtype")
    dtype = getattr(torch, name, None) if isinstance(name, str) else None
    return dtype if isinstance(dtype, torch.dtype) and dtype.is_floating_point else None


def _model_config(raw: dict[str, Any]):
    """The transformers config of ``config.json`` without its quantization entries (metalq handles those)."""
    from transformers import AutoConfig

    fields = {key: value for key, value in raw.items() if key not in QUANTIZATION_KEYS}
    if "model_type" not in fields:
        raise ValueError(f"{CONFIG_NAME}: no 'model_type': cannot tell which transformers architecture to build")
    model_type = fields.pop("model_type")
    return AutoConfig.for_model(model_type, **fields)


def _materialize_buffers(model: nn.Module) -> None:
    """Give the non-persistent buffers left on ``meta`` (not in any checkpoint) real values, computed by the
    model's own initialisation (rotary ``inv_freq``); anything else still on ``meta`` is an error."""
    owners = {}
    for name, buffer in model.named_buffers():
        if buffer.is_meta:
            module_path, _, leaf = name.rpartition(".")
            module = model.get_submodule(module_path)
            if leaf not in module._non_persistent_buffers_set:
                raise ValueError(f"{name} was not loaded from the checkpoint")
            module._buffers[leaf] = torch.empty_like(buffer, device="cpu")
            owners[id(module)] = module
    init = getattr(model, "_init_weights", None)
    for module in owners.values():
        if init is None:
            raise ValueError(f"cannot initialise the buffers of {type(module).__name__}")
        init(module)
    left = [name for name, tensor in [*model.named_parameters(), *model.named_buffers()] if tensor.is_meta]
    if left:
        raise ValueError(f"still on the meta device after loading: {', '.join(left[:5])}")
