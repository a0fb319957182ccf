"""Saving: :func:`save_quantized` (a model's quantized layers and tensors), and what it and convert write for a set of
quantized layers (:func:`output`): ``config.json`` with the layout's quantization entries, and the tensors in the
layout's spelling, float weights of layers to quantize quantized one layer at a time while they are written."""
from __future__ import annotations

import shutil
import warnings
from pathlib import Path
from typing import Any, Callable, Iterable, Optional, Union

import torch
from torch import nn

from ..config import MetalConfig
from ..moe import MetalExperts, expert_projections
from ..ops import fp_quantize
from .layout import LayerFormat, Layout, is_linear, is_quantized_module, layout_named, layouts, quantized_model_config
from .reader import PathLike, TensorRef
from .writer import DEFAULT_MAX_SHARD_SIZE, Entry, atomic_directory, parse_size, write_checkpoint


def save_quantized(
    model: nn.Module,
    directory: PathLike,
    config: Optional[MetalConfig] = None,
    *,
    format: str = "metal",
    model_config: Optional[dict[str, Any]] = None,
    max_shard_size: Union[int, str] = DEFAULT_MAX_SHARD_SIZE,
    overwrite: bool = False,
    progress: Optional[bool] = None,
    extra_files: Iterable[PathLike] = (),
) -> Path:
    """Write ``model`` as a quantized safetensors directory, streaming tensor by tensor; ``model`` is not changed.

    Args:
        model: a module holding :class:`MetalLinear` (and ``MetalEmbedding``) layers, or float ``nn.Linear``
            layers that ``config`` selects; those are quantized one at a time as they are written.
        directory: the output directory; it must not exist unless ``overwrite=True``. It appears only
            once complete: a failure or Ctrl-C leaves no partial directory behind.
        config: quantize the float ``nn.Linear`` layers it selects (layers whose ``in_features`` does not fit
            ``group_size`` stay float). Its ``modules_to_not_convert`` given as a list keeps exactly those
            float; left ``None`` it follows the layout's own tool: in ``"metal"`` transformers' default (the
            output head and tied weights stay float, see :func:`transformers_default_skips`), in ``"mlx"``
            mlx-lm's (everything is quantized, the head included). ``None``: save as is.
        format: ``"metal"`` (transformers' layout: every quantized layer must share bits and group_size)
            or ``"mlx"`` (mlx-lm's layout, per-layer bits and group sizes allowed, affine group sizes 32, 64 and
            128 only, as MLX reads). A Metal directory that transformers' own loader cannot read (bits other than
            2, 4, 8, a floating-point mode, quantized embeddings or experts) is still written, with a warning:
            ``metalq.transformers.from_pretrained`` loads it.
        model_config: the model's ``config.json`` content (default: ``model.config.to_dict()`` when the model
            has a transformers config, else ``{}``); the quantization entries are added to a copy.
        max_shard_size: bytes (or a string such as ``"2GB"``) per safetensors file; above it the tensors are
            split into ``model-0000i-of-0000n.safetensors`` files with a ``model.safetensors.index.json``.
        overwrite: replace an existing ``directory`` (swapped in only after the new one is complete).
        progress: show a tqdm bar (default: from 1 GiB of tensors on).
        extra_files: files copied into the directory as well (tokenizer files, ``generation_config.json``).

    Returns:
        The output directory as a ``Path``.

    Example:
        >>> metalq.save_quantized(model, "llama-4bit", metalq.MetalConfig(bits=4, group_size=64))
        >>> metalq.save_quantized(model, "llama-4bit-mlx", format="mlx")   # mlx_lm.load reads it
    """
    layout = layout_named(format)
    limit = parse_size(max_shard_size)
    if config is not None and not isinstance(config, MetalConfig):
        raise TypeError(f"save_quantized: config must be a MetalConfig or None, got {type(config).__name__}")
    layers, refs = _model_sources(model, config, layout)
    if not layers:
        raise ValueError("save_quantized: the model has no quantized layer (pass a MetalConfig to quantize it)")
    refs, layers = layout.write_names(model, refs, layers)
    base = model_config
    if base is None:
        hf_config = getattr(model, "config", None)
        base = hf_config.to_dict() if hasattr(hf_config, "to_dict") else {}
    out_config, entries = output("save_quantized", model, refs, layers, format, base, config)
    extra_files = [Path(file) for file in extra_files]
    for file in extra_files:
        if not file.is_file():
            raise FileNotFoundError(f"{file}: extra file not found")
    with atomic_directory(directory, overwrite=overwrite) as tmp:
        for file in extra_files:
            shutil.copy2(file, tmp / file.name)
        write_checkpoint(tmp, entries, out_config, format, limit, progress)
    return Path(directory)


def _model_sources(
    model: nn.Module, config: Optional[MetalConfig], layout: Layout
) -> tuple[dict[str, LayerFormat], dict[str, TensorRef]]:
    """The quantized layers (existing, plus float Linears ``config`` selects for ``layout``) and the model's
    tensors, each tied tensor once."""
    from ..quantize import matches_module_name

    skip = [] if config is None else layout.kept_float(model, config.modules_to_not_convert)

    refs: dict[str, TensorRef] = {}
    seen: set[int] = set()
    for name, tensor in model.state_dict(keep_vars=True).items():
        if id(tensor) in seen:
            continue  # a tied tensor is stored once, as transformers and mlx-lm do
        seen.add(id(tensor))
        if tensor.device.type == "meta":
            raise ValueError(f"tensor {name!r} is on the meta device: there is nothing to save")
        refs[name] = TensorRef(tensor.dtype, tuple(tensor.shape), (lambda t=tensor: t.detach()), "model")
    layers: dict[str, LayerFormat] = {}
    misfits = []
    for fqn, module in model.named_modules():
        if is_quantized_module(module):
            layers[fqn] = (module.bits, module.group_size, getattr(module, "mode", "affine"))
        elif config is not None and _is_float_experts(module):
            if not any(matches_module_name(fqn, p) for p in skip):
                raise ValueError(f"save_quantized: {fqn} holds float experts; quantizing while writing covers "
                                 f"nn.Linear layers only: quantize the model with metalq.quantize_ first")
        elif config is not None and is_linear(module) and f"{fqn}.weight" in refs:
            if any(matches_module_name(fqn, p) for p in skip):
                continue
            if module.in_features % config.group_size:
                misfits.append(fqn)
                continue
            layers[fqn] = (config.bits, config.group_size, config.mode)
    if misfits:
        warnings.warn(
            f"save_quantized: kept {len(misfits)} layer(s) in float because in_features is not divisible by "
            f"group_size={config.group_size}: {', '.join(misfits)}",
            stacklevel=3,
        )
    return layers, refs


def _is_float_experts(module: nn.Module) -> bool:
    return not isinstance(module, MetalExperts) and expert_projections(module) is not None


def output(
    caller: str,
    model: Optional[nn.Module],
    refs: dict[str, TensorRef],
    layers: dict[str, LayerFormat],
    format: str,
    base: dict[str, Any],
    config: Optional[MetalConfig] = None,
) -> tuple[dict[str, Any], list[Entry]]:
    """The ``config.json`` and tensors of a checkpoint holding ``layers`` in layout ``format``, after the layout's
    :meth:`~Layout.check_output`. The config lists every float ``nn.Linear`` of ``model`` (a tied head too: it has
    no tensor, but transformers would quantize it unlisted)."""
    layout = layout_named(format)
    float_linears = [] if model is None else [
        fqn for fqn, module in model.named_modules() if fqn and isinstance(module, nn.Linear) and fqn not in layers
    ]
    out_config = quantized_model_config(base, layers, format, float_linears, config)
    layout.check_output(caller, model, layers)
    return out_config, _output_entries(refs, layers, layout)


def _output_entries(refs: dict[str, TensorRef], layers: dict[str, LayerFormat], layout: Layout) -> list[Entry]:
    """The tensors to write: quantized layers in ``layout``'s spelling, float weights of ``layers`` that have no
    ``scales`` yet quantized on the fly (one layer in memory at a time), everything else unchanged. ``refs``
    spell the packed tensors ``weight``, the offsets as any layout does."""
    offsets = {other.offsets for other in layouts().values()}
    packed = layout.packed_name()
    entries: list[Entry] = []
    for name, ref in refs.items():
        path, _, leaf = name.rpartition(".")
        quantized = f"{path}.scales" in refs
        if path in layers and not quantized and leaf == "weight":
            entries.extend(_quantize_entries(path, ref, *layers[path], layout.offsets, packed))
        elif quantized and leaf in (*offsets, "weight"):
            renamed = packed if leaf == "weight" else layout.offsets
            entries.append(Entry(f"{path}.{renamed}", ref.dtype, ref.shape, ref.load))
        else:
            entries.append(Entry(name, ref.dtype, ref.shape, ref.load))
    return entries


def _quantize_entries(
    path: str, ref: TensorRef, bits: int, group_size: int, mode: str, biases: str, packed: str
) -> list[Entry]:
    if len(ref.shape) != 2 or not ref.dtype.is_floating_point:
        raise ValueError(f"tensor {path}.weight: expected a 2-D float weight to quantize, got {ref.dtype} {ref.shape}")
    rows, columns = ref.shape
    if columns % group_size:
        raise ValueError(f"tensor {path}.weight: {columns} columns are not divisible by group_size={group_size}")
    dtype = ref.dtype if ref.dtype in (torch.float32, torch.float16, torch.bfloat16) else torch.float32
    memo: dict[str, torch.Tensor] = {}

    def part(key: str) -> Callable[[], torch.Tensor]:
        def produce() -> torch.Tensor:
            # through the package, where tests replace the quantizer to watch or interrupt quantizing
            from . import affine_quantize

            if not memo:
                weight = ref.load().to(dtype)
                if mode == "affine":
                    memo["weight"], memo["scales"], memo[biases] = affine_quantize(weight, group_size, bits)
                else:
                    memo["weight"], memo["scales"] = fp_quantize(weight, mode)
            return memo.pop(key)  # the last one frees the layer

        return produce

    groups = (rows, columns // group_size)
    weight = Entry(f"{path}.{packed}", torch.uint32, (rows, columns * bits // 32), part("weight"))
    if mode != "affine":
        return [weight, Entry(f"{path}.scales", torch.uint8, groups, part("scales"))]
    return [weight, Entry(f"{path}.scales", dtype, groups, part("scales")),
            Entry(f"{path}.{biases}", dtype, groups, part(biases))]
