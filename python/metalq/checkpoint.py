"""Checkpoint I/O: quantized safetensors directories in transformers' Metal layout or mlx-lm's layout.

One format, two spellings (style guide rule 17). The packed tensors are MLX's exactly; a module is
quantized when ``{path}.scales`` is among the tensors.

- ``"metal"``: ``{path}.weight`` uint32 (``{path}.qweight`` in transformers' main branch; read either way,
  written as the installed transformers spells it), ``{path}.scales``, ``{path}.qbiases``; ``config.json``
  carries ``quantization_config`` as :meth:`MetalConfig.to_dict` writes it (one bits/group_size for every layer,
  ``modules_to_not_convert`` listing every float ``nn.Linear``, so transformers skips exactly those).
- In MLX's floating-point modes (``mode`` ``"mxfp4"``, ``"nvfp4"``, ``"mxfp8"``) ``scales`` is uint8 and there
  are no offsets; ``mode`` is recorded in the config (absent means ``"affine"``).
- ``"mlx"``: the offsets are named ``{path}.biases``; ``config.json`` carries mlx-lm's ``quantization`` block
  (``group_size``, ``bits``, ``mode`` plus per-path overrides) and an identical ``quantization_config``; the
  safetensors metadata is ``{"format": "mlx"}``. ``mlx_lm.load`` reads these directories.

Writing streams one tensor at a time into a temporary sibling directory that is renamed into place at the
end, so an interrupted save leaves no output directory. Loading checks every tensor name, shape and dtype
against the model before it changes anything.
"""
from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
import re
import shutil
import struct
import uuid
import warnings
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Optional, Union

import torch
from torch import nn
from tqdm.auto import tqdm

from .config import QUANT_METHOD, TRANSFORMERS_METAL_BITS, MetalConfig, check_format, resolve_format
from .linear import MetalLinear
from .moe import MetalExperts, MetalSwitchLinear, expert_projections
from .ops import affine_dequantize, affine_quantize, fp_dequantize, fp_quantize

FORMATS = ("metal", "mlx")
CONFIG_NAME = "config.json"
SINGLE_FILE = "model.safetensors"
INDEX_NAME = "model.safetensors.index.json"
SHARD_NAME = "model-{:05d}-of-{:05d}.safetensors"
DEFAULT_MAX_SHARD_SIZE = 5 << 30  # as transformers' save_pretrained and mlx-lm's make_shards
_BIASES = {"metal": "qbiases", "mlx": "biases"}
_PROGRESS_MIN_BYTES = 1 << 30  # show a progress bar from 1 GiB on

_DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "U16": torch.uint16, "U32": torch.uint32, "U64": torch.uint64, "BOOL": torch.bool,
    "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2,
}
_DTYPE_NAMES = {dtype: name for name, dtype in _DTYPES.items()}

PathLike = Union[str, os.PathLike]


# ---- public API -------------------------------------------------------------------------------------

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
            or ``"mlx"`` (mlx-lm's layout, per-layer bits and group sizes allowed). A Metal directory that
            transformers' own loader cannot read (bits other than 2, 4, 8, a floating-point mode, quantized
            embeddings or experts) is still written, with a warning: ``metalq.transformers.from_pretrained``
            loads it.
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
    _check_format_name(format)
    limit = parse_size(max_shard_size)
    if config is not None and not isinstance(config, MetalConfig):
        raise TypeError(f"save_quantized: config must be a MetalConfig or None, got {type(config).__name__}")
    layers, refs = _model_sources(model, config, format)
    if not layers:
        raise ValueError("save_quantized: the model has no quantized layer (pass a MetalConfig to quantize it)")
    if format == "mlx":
        refs, layers = to_mlx_expert_names(model, refs, layers)
    base = model_config
    if base is None:
        hf_config = getattr(model, "config", None)
        base = hf_config.to_dict() if hasattr(hf_config, "to_dict") else {}
    out_config, entries = _output("save_quantized", model, refs, layers, format, base, config)
    extra_files = [Path(file) for file in extra_files]
    for file in extra_files:
        if not file.is_file():
            raise FileNotFoundError(f"{file}: extra file not found")
    with atomic_directory(directory, overwrite=overwrite) as tmp:
        for file in extra_files:
            shutil.copy2(file, tmp / file.name)
        write_checkpoint(tmp, entries, out_config, format, limit, progress)
    return Path(directory)


def load_quantized(
    model: nn.Module,
    directory: PathLike,
    *,
    strict: bool = True,
    progress: Optional[bool] = None,
) -> nn.Module:
    """Load a Metal or mlx-lm quantized directory into ``model``, swapping in :class:`MetalLinear` layers.

    ``model`` is the float architecture (possibly built on the ``meta`` device), or one already prepared with
    :func:`metalq.replace_with_metal_linear`. A module is quantized when ``{path}.scales`` is in the checkpoint
    (its packed tensor is ``{path}.weight``, or ``{path}.qweight`` in a Metal directory written for transformers'
    main branch);
    for mlx-lm directories also when its path has an entry in the ``quantization`` block, which gives its
    bits and group size (otherwise they follow from the tensor shapes, as in ``mlx_lm.load``). For a Metal
    directory every ``nn.Linear`` not in ``modules_to_not_convert`` must be quantized, with the config's
    bits and group size. Quantized embeddings become ``metalq.MetalEmbedding`` (a tied output head reads the
    same table), or float ``nn.Embedding`` with a warning when that class is unavailable.

    Every tensor is checked (present, shape, dtype kind) and read before the model changes: on any error
    (missing or misshapen tensor, truncated file, unknown ``quant_method``) the model is untouched. Loaded
    tensors keep the checkpoint's dtypes; they go to the device of the tensor they replace (CPU for ``meta``).
    Non-persistent buffers (rotary ``inv_freq``) are in no checkpoint: on a ``meta`` model they stay ``meta``
    (:func:`metalq.transformers.from_pretrained` recomputes them), so build the model on CPU or with only its
    parameters on ``meta``.

    Args:
        model: the module to fill, in place.
        directory: a directory with ``config.json`` and ``model.safetensors`` or sharded files plus
            ``model.safetensors.index.json``.
        strict: fail on checkpoint tensors that the model has no place for.
        progress: show a tqdm bar (default: from 1 GiB of tensors on).

    Returns:
        ``model``.

    Example:
        >>> model = transformers.AutoModelForCausalLM.from_config(config)   # or parameters on meta only
        >>> metalq.load_quantized(model, "Llama-3.2-1B-Instruct-4bit")   # an mlx-community directory
    """
    directory = Path(directory)
    scheme = read_quantization(read_config(directory), directory / CONFIG_NAME)
    with Checkpoint(directory) as checkpoint:
        if scheme.kind == "metal":
            checkpoint.refs = _from_metal_spelling(checkpoint.refs)
        if scheme.kind == "mlx":
            checkpoint.refs, overrides = from_mlx_expert_names(model, checkpoint.refs, scheme.overrides)
            scheme = dataclasses.replace(scheme, overrides=overrides)
        plan = _plan_load(model, checkpoint, scheme, strict)
        tensors = _read_all(checkpoint, plan.needed, progress)
    _apply(model, plan, tensors)
    return model


def convert_checkpoint(
    source: PathLike,
    destination: PathLike,
    *,
    to: Optional[str] = None,
    bits: Optional[int] = None,
    group_size: Optional[int] = None,
    skip: Optional[Iterable[str]] = None,
    embeddings: bool = False,
    max_shard_size: Union[int, str] = DEFAULT_MAX_SHARD_SIZE,
    overwrite: bool = False,
    progress: Optional[bool] = None,
    mode: Optional[str] = None,
) -> Path:
    """Convert a checkpoint directory file to file, one tensor in memory at a time (``python -m metalq convert``).

    - a float Hugging Face directory (no quantization entry) is quantized: every ``nn.Linear`` of the
      architecture (built on the ``meta`` device with transformers, so no weights are materialised) whose
      name matches no ``skip`` pattern and whose ``in_features`` fits ``group_size``; with ``embeddings=True``
      the ``nn.Embedding`` tables too, as mlx-lm does. ``skip=None`` follows the output layout's own tool:
      for ``"metal"`` transformers' default (the output head stays float, see
      :func:`transformers_default_skips`), for ``"mlx"`` mlx-lm's (nothing is skipped); a list (``[]``
      included) is exactly the patterns kept float;
    - a Metal or mlx-lm quantized directory is rewritten in the other spelling (a rename of the offsets and
      a new quantization entry; the packed tensors are copied unchanged).

    A Metal output that transformers' own loader cannot read is written with a warning, as in
    :func:`save_quantized`.

    Other files of ``source`` (tokenizer, ``generation_config.json``, ...) are copied; weights in other formats
    are not. The output directory appears only once complete.

    Args:
        source, destination: directories; ``destination`` must not exist unless ``overwrite``.
        to: ``"metal"`` or ``"mlx"``; default: ``"metal"``, or the other spelling for a quantized source.
        bits, group_size, skip, embeddings, mode: quantization of a float source (default ``"affine"`` with 4 bits
            and group size 64; a floating-point ``mode`` has its own bits and group size).
        max_shard_size, progress: as :func:`save_quantized` (the bar shows by default here).

    Returns:
        ``Path(destination)``.
    """
    from .quantize import matches_module_name

    source = Path(source)
    config = read_config(source)
    try:
        kind = checkpoint_kind(config)
    except ValueError as error:
        raise ValueError(f"{source / CONFIG_NAME}: {error}") from None
    if to is not None:
        _check_format_name(to)
    limit = parse_size(max_shard_size)
    if kind is not None and (bits is not None or group_size is not None or skip is not None or embeddings
                             or mode is not None):
        raise ValueError(f"{source} is already quantized ({kind}); bits, group_size, mode, skip and embeddings "
                         f"apply only to float checkpoints")
    if kind is None:
        to = to or "metal"
        mode = mode or "affine"
        bits, group_size = resolve_format("convert", bits, group_size, mode)
        if embeddings and mode != "affine":
            raise ValueError(f"convert: embeddings are quantized in affine mode only, not {mode!r}")
        model = _meta_model(source, required=True)
    else:
        to = to or ("mlx" if kind == "metal" else "metal")
        scheme = read_quantization(config, source / CONFIG_NAME)
        model = _meta_model(source, required=False)
    if model is not None and any(expert_projections(module) is not None for module in model.modules()):
        raise ValueError(f"{source}: convert does not handle mixture-of-experts models; load the model, quantize it "
                         f"with metalq.quantize_ and write it with metalq.save_quantized")
    with Checkpoint(source) as checkpoint:
        refs = _from_metal_spelling(checkpoint.refs) if kind == "metal" else checkpoint.refs
        if kind is None:
            skip = _kept_float(model, skip, to)
            layers, misfits = {}, []
            for fqn, module in model.named_modules():
                is_table = embeddings and isinstance(module, nn.Embedding)
                if not (_is_linear(module) or is_table) or f"{fqn}.weight" not in refs:
                    continue
                if any(matches_module_name(fqn, pattern) for pattern in skip):
                    continue
                if refs[f"{fqn}.weight"].shape[-1] % group_size:
                    misfits.append(fqn)
                    continue
                layers[fqn] = (bits, group_size, mode)
            if misfits:
                warnings.warn(f"convert: kept {len(misfits)} layer(s) in float because in_features is not divisible "
                              f"by group_size={group_size}: {', '.join(misfits)}", stacklevel=2)
            if not layers:
                raise ValueError(f"{source}: no nn.Linear of the model matches a tensor of the checkpoint")
        else:
            layers = _layers_from_scheme(scheme, refs)
        out_config, entries = _output("convert", model, refs, layers, to, config)
        with atomic_directory(destination, overwrite=overwrite) as tmp:
            for file in sorted(source.iterdir()):
                weights = file.name in (CONFIG_NAME, INDEX_NAME) or file.suffix in _WEIGHT_SUFFIXES
                if file.is_file() and not weights:
                    shutil.copy2(file, tmp / file.name)
            write_checkpoint(tmp, entries, out_config, to, limit, True if progress is None else progress)
    return Path(destination)


_WEIGHT_SUFFIXES = {".safetensors", ".bin", ".pt", ".pth", ".gguf", ".h5", ".msgpack", ".npz", ".ckpt"}


def _meta_model(directory: Path, required: bool) -> Optional[nn.Module]:
    """The architecture of a transformers directory on the ``meta`` device (for its module names and types)."""
    try:
        import transformers

        config = transformers.AutoConfig.from_pretrained(str(directory))
        with torch.device("meta"), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            try:
                return transformers.AutoModelForCausalLM.from_config(config)
            except ValueError:
                return transformers.AutoModel.from_config(config)
    except Exception as error:  # noqa: BLE001  (any failure means: architecture unknown)
        if required:
            raise ValueError(
                f"{directory}: cannot build the model architecture with transformers to find its Linear layers "
                f"({type(error).__name__}: {error})"
            ) from None
        return None


def _layers_from_scheme(scheme: Scheme, refs: dict[str, TensorRef]) -> dict[str, LayerFormat]:
    """``(bits, group_size, mode)`` of every module with ``scales`` in a quantized checkpoint, checked against the
    shapes."""
    layers = {}
    for name, scales in refs.items():
        if not name.endswith(".scales"):
            continue
        path = name[: -len(".scales")]
        weight = refs.get(f"{path}.weight")
        if weight is None:
            raise ValueError(f"missing tensor {path + '.weight'!r}: {path} has scales")
        bits, group_size, mode = scheme.bits, scheme.group_size, scheme.mode
        if scheme.kind == "mlx" and path in scheme.overrides:
            if scheme.overrides[path] is None:
                raise ValueError(f"{path} has scales but quantization[{path!r}] is false")
            bits, group_size, mode = scheme.overrides[path]
        elif scheme.kind == "mlx" and mode == "affine" and len(scales.shape) == 2 and scales.shape[1]:
            group_size = weight.shape[-1] * 32 // bits // scales.shape[1]  # mlx-lm infers unlisted layers
        if mode == "affine" and f"{path}.{_BIASES[scheme.kind]}" not in refs:
            raise ValueError(f"missing tensor {path + '.' + _BIASES[scheme.kind]!r}: {path} is quantized")
        if (mode == "affine") == (scales.dtype == torch.uint8):
            raise ValueError(f"tensor {name!r} has dtype {scales.dtype}, which does not fit mode {mode!r} "
                             f"(uint8 scales are the floating-point modes')")
        columns = weight.shape[-1] * 32 // bits if weight.shape else 0
        if (len(weight.shape) != 2 or len(scales.shape) != 2 or weight.dtype != torch.uint32
                or columns != scales.shape[1] * group_size or scales.shape[0] != weight.shape[0]):
            raise ValueError(
                f"tensor {name!r} has shape {scales.shape} and {path}.weight {weight.dtype} {weight.shape}: "
                f"they do not fit bits={bits}, group_size={group_size}"
            )
        try:
            check_format(path, bits, group_size, mode)
        except ValueError as error:
            raise ValueError(f"{error} (from the shapes of {path}.weight and {name})") from None
        layers[path] = (bits, group_size, mode)
    if not layers:
        raise ValueError("the checkpoint declares quantization but holds no '.scales' tensor")
    return layers


# ---- what transformers' Metal loader reads --------------------------------------------------------------

def transformers_default_skips(model: nn.Module) -> list[str]:
    """The ``nn.Linear`` layers of ``model`` that transformers' quantizers keep float when
    ``modules_to_not_convert`` is None (its ``get_keys_to_not_convert``): the output embeddings
    (``get_output_embeddings()``), layers whose weight is tied to another module's, and the module whose
    ``weight`` is the model's last parameter (a bias-free head)."""
    holders: dict[int, list[str]] = {}
    for key, tensor in model.state_dict(keep_vars=True).items():
        holders.setdefault(id(tensor), []).append(key)
    names = {key.removesuffix(".weight") for keys in holders.values() if len(keys) > 1 for key in keys}
    parameters = list(model.named_parameters())
    if parameters:
        names.add(parameters[-1][0].removesuffix(".weight"))
    modules = dict(model.named_modules())
    output_embeddings = getattr(model, "get_output_embeddings", None)
    head = output_embeddings() if callable(output_embeddings) else None
    names.update(fqn for fqn, module in modules.items() if head is not None and module is head)
    return sorted(name for name in names if isinstance(modules.get(name), nn.Linear))


def _always_float(model: Optional[nn.Module]) -> list[str]:
    """The model's ``_keep_in_fp32_modules``: transformers keeps them float whatever ``modules_to_not_convert`` says."""
    return sorted(getattr(model, "_keep_in_fp32_modules", None) or ())


def _kept_float(model: nn.Module, modules_to_not_convert: Optional[Iterable[str]], format: str) -> list[str]:
    """The module patterns a quantizing config keeps float in ``format``, as each layout's own tool does: a list
    is exactly that list, ``None`` is transformers' default in the Metal layout (:func:`transformers_default_skips`)
    and mlx-lm's in the mlx layout (nothing: mlx-lm quantizes the head too). The Metal layout also keeps
    :func:`_always_float` modules, which transformers would not load quantized."""
    if format == "mlx":
        return list(modules_to_not_convert or ())
    chosen = transformers_default_skips(model) if modules_to_not_convert is None else list(modules_to_not_convert)
    return [*chosen, *_always_float(model)]


def _from_metal_spelling(refs: dict[str, TensorRef]) -> dict[str, TensorRef]:
    """A Metal checkpoint's tensors with each packed ``{path}.qweight`` (transformers' main branch) read as
    ``{path}.weight`` (transformers 5.24 and 5.25, mlx-lm, and metalq's modules)."""
    out = {}
    for name, ref in refs.items():
        path, _, leaf = name.rpartition(".")
        if leaf != "qweight" or f"{path}.scales" not in refs:
            out[name] = ref
            continue
        twin = refs.get(f"{path}.weight")
        if twin is not None:
            raise ValueError(f"tensors {name!r} ({ref.where}) and {path + '.weight'!r} ({twin.where}) are both "
                             f"present: a Metal checkpoint holds a quantized layer's packed weight under one name")
        out[f"{path}.weight"] = dataclasses.replace(ref, where=f"{ref.where}, stored as {name!r}")
    return out


def _transformers_cannot_load(model: Optional[nn.Module], layers: dict[str, LayerFormat]) -> list[str]:
    """Why transformers' own loader (its ``MetalConfig`` and ``MetalLinear``) cannot read a Metal directory holding
    ``layers`` (one format), or ``[]``. Without ``model`` the kinds of the quantized modules are unknown."""
    from .quantize import matches_module_name

    bits, _, mode = next(iter(layers.values()))
    reasons = []
    if mode != "affine":
        reasons.append(f"mode={mode!r} (its Metal layout is affine only)")
    elif bits not in TRANSFORMERS_METAL_BITS:
        reasons.append(f"bits={bits} (its MetalConfig accepts bits {', '.join(map(str, TRANSFORMERS_METAL_BITS))})")
    if model is None:
        return reasons
    modules = dict(model.named_modules())
    linear = {path for path in layers if isinstance(modules.get(path), (nn.Linear, MetalLinear))}
    others = [path for path in layers if path in modules and path not in linear]
    if others:
        named = [f"{path} ({type(modules[path]).__name__})" for path in others]
        reasons.append(f"quantized modules that are not nn.Linear layers: {_listing(named)} (it quantizes nn.Linear "
                       f"layers only)")
    # a float Linear sharing a quantized table's weight, or a MetalTiedHead reading the table
    tables = {id(weight) for weight in (getattr(modules[path], "weight", None) for path in others) if weight is not None}
    heads = [fqn for fqn, module in modules.items()
             if fqn not in layers and id(getattr(getattr(module, "embedding", module), "weight", None)) in tables]
    if heads:
        reasons.append(f"an output head tied to a quantized embedding: {_listing(heads)}")
    always_float = _always_float(model)
    kept = [path for path in sorted(linear) if any(matches_module_name(path, p) for p in always_float)]
    if kept:
        reasons.append(f"quantized layers it always keeps float (the model's _keep_in_fp32_modules): {_listing(kept)}")
    return reasons


def _output(
    caller: str,
    model: Optional[nn.Module],
    refs: dict[str, TensorRef],
    layers: dict[str, LayerFormat],
    format: str,
    base: dict[str, Any],
    config: Optional[MetalConfig] = None,
) -> tuple[dict[str, Any], list[Entry]]:
    """The ``config.json`` and tensors of a checkpoint holding ``layers``. A Metal config lists every float
    ``nn.Linear`` of ``model`` (a tied head too: it has no tensor, but transformers would quantize it unlisted),
    and a Metal directory that transformers' loader cannot read gets one warning saying why."""
    float_linears = [] if model is None else [
        fqn for fqn, module in model.named_modules() if fqn and isinstance(module, nn.Linear) and fqn not in layers
    ]
    out_config = quantized_model_config(base, layers, format, float_linears, config)
    reasons = _transformers_cannot_load(model, layers) if format == "metal" else []
    if reasons:
        warnings.warn(f"{caller}: transformers' own loader cannot read this Metal checkpoint: {'; '.join(reasons)}. "
                      f"metalq.transformers.from_pretrained loads it.", stacklevel=3)
    return out_config, _output_entries(refs, layers, format)


def _listing(names: list[str], limit: int = 5) -> str:
    """``names`` joined, the first ``limit`` of them shown."""
    more = f" and {len(names) - limit} more" if len(names) > limit else ""
    return ", ".join(names[:limit]) + more


# ---- config.json -------------------------------------------------------------------------------------

# A quantized layer's format: (bits, group_size, mode).
LayerFormat = tuple[int, int, str]


@dataclass
class Scheme:
    """The quantization a ``config.json`` declares.

    ``kind`` is ``"metal"`` or ``"mlx"``; ``bits``/``group_size``/``mode`` the defaults; ``overrides`` maps a
    module path to a :data:`LayerFormat` or ``None`` (kept float) for mlx-lm's per-path entries;
    ``modules_to_not_convert`` is the Metal config's list.
    """

    kind: str
    bits: int
    group_size: int
    overrides: dict[str, Optional[LayerFormat]]
    modules_to_not_convert: tuple[str, ...] = ()
    mode: str = "affine"


def read_config(directory: PathLike) -> dict[str, Any]:
    """The parsed ``config.json`` of ``directory`` (errors name the file)."""
    path = Path(directory) / CONFIG_NAME
    if not Path(directory).is_dir():
        raise FileNotFoundError(f"{directory}: no such directory")
    if not path.is_file():
        raise FileNotFoundError(f"{path}: missing (every checkpoint directory needs a config.json)")
    try:
        with open(path, encoding="utf-8") as f:
            config = json.load(f)
    except json.JSONDecodeError as error:
        raise ValueError(f"{path}: not valid JSON ({error})") from None
    if not isinstance(config, dict):
        raise ValueError(f"{path}: expected a JSON object")
    return config


def checkpoint_kind(config: dict[str, Any]) -> Optional[str]:
    """``"mlx"``, ``"metal"``, or ``None`` for an unquantized model; raises on another ``quant_method``."""
    if isinstance(config.get("quantization"), dict):
        return "mlx"
    quantization_config = config.get("quantization_config")
    if quantization_config is None:
        return None
    if not isinstance(quantization_config, dict):
        raise ValueError(f"quantization_config must be an object, got {quantization_config!r}")
    method = quantization_config.get("quant_method")
    if method == QUANT_METHOD:
        return "metal"
    raise ValueError(
        f"quantization_config.quant_method={method!r} is not supported: metalq reads quant_method "
        f"{QUANT_METHOD!r} (transformers' MetalConfig) and mlx-lm's 'quantization' block"
    )


def read_quantization(config: dict[str, Any], where: PathLike = CONFIG_NAME) -> Scheme:
    """Parse the quantization entries of a ``config.json`` into a :class:`Scheme` (errors name the field)."""
    try:
        kind = checkpoint_kind(config)
    except ValueError as error:
        raise ValueError(f"{where}: {error}") from None
    if kind is None:
        raise ValueError(f"{where}: no 'quantization_config' or 'quantization' entry: not a quantized checkpoint")
    if kind == "metal":
        try:
            metal = MetalConfig.from_dict(config["quantization_config"])
        except (TypeError, ValueError) as error:
            raise ValueError(f"{where}: quantization_config: {error}") from None
        return Scheme("metal", metal.bits, metal.group_size, {}, tuple(metal.modules_to_not_convert or ()),
                      metal.mode)
    block = config["quantization"]
    bits, group_size, mode = _mlx_entry(block, "quantization", where)
    overrides: dict[str, Optional[LayerFormat]] = {}
    for key, value in block.items():
        if key in ("bits", "group_size", "mode"):
            continue
        field = f"quantization[{key!r}]"
        if isinstance(value, bool):
            overrides[key] = (bits, group_size, mode) if value else None
        elif isinstance(value, dict):
            # unset fields follow the global entry, or the override's own mode's defaults when it changes mode
            inherited = {"mode": mode} if value.get("mode", mode) != mode else {
                "bits": bits, "group_size": group_size, "mode": mode}
            overrides[key] = _mlx_entry({**inherited, **value}, field, where, defaults=True)
        else:
            raise ValueError(f"{where}: {field} must be an object or a boolean, got {value!r}")
    return Scheme("mlx", bits, group_size, overrides, mode=mode)


def _describe(layer: LayerFormat) -> str:
    bits, group_size, mode = layer
    return f"bits={bits}, group_size={group_size}" + ("" if mode == "affine" else f", mode={mode}")


def _mlx_entry(entry: dict, field: str, where, defaults: bool = False) -> LayerFormat:
    """An mlx-lm quantization entry as a :data:`LayerFormat`; ``mode`` absent means affine. Without
    ``defaults`` bits and group_size must be present."""
    mode = entry.get("mode", "affine")
    if not defaults:
        for key in ("bits", "group_size"):
            if key not in entry:
                raise ValueError(f"{where}: {field} has no {key!r}")
    try:
        bits, group_size = resolve_format(f"{field}", entry.get("bits"), entry.get("group_size"), mode)
    except ValueError as error:
        raise ValueError(f"{where}: {error}") from None
    return bits, group_size, mode


def quantized_model_config(
    base: dict[str, Any],
    layers: dict[str, LayerFormat],
    format: str,
    float_linears: Iterable[str] = (),
    config: Optional[MetalConfig] = None,
) -> dict[str, Any]:
    """``base`` plus the quantization entries for quantized ``layers`` (path -> ``(bits, group_size, mode)``).

    ``"metal"`` requires one format for all layers (``config``'s when given) and writes ``quantization_config =
    MetalConfig.to_dict()`` with ``modules_to_not_convert`` the list of ``float_linears`` (never null, so that
    transformers skips exactly those and applies no default of its own); ``"mlx"`` writes mlx-lm's
    ``quantization`` block (the most common format, then per-path overrides) and an identical
    ``quantization_config``.
    """
    _check_format_name(format)
    out = {key: value for key, value in base.items() if key not in ("quantization", "quantization_config")}
    if not layers:
        raise ValueError("no quantized layer to describe")
    if format == "metal":
        most_common = Counter(layers.values()).most_common(1)[0][0]
        chosen = (config.bits, config.group_size, config.mode) if config is not None else most_common
        for path, layer in layers.items():
            if layer != chosen:
                raise ValueError(
                    f"{path} has {_describe(layer)} but the Metal format holds one format for all layers "
                    f"({_describe(chosen)}); use the mlx format (format='mlx', --to mlx)"
                )
        bits, group_size, mode = chosen
        metal = MetalConfig(bits=bits, group_size=group_size, modules_to_not_convert=list(float_linears), mode=mode)
        out["quantization_config"] = metal.to_dict()
        return out
    (bits, group_size, mode), _ = Counter(layers.values()).most_common(1)[0]
    block: dict[str, Any] = {"group_size": group_size, "bits": bits, "mode": mode}
    for path, (layer_bits, layer_group_size, layer_mode) in layers.items():
        if (layer_bits, layer_group_size, layer_mode) != (bits, group_size, mode):
            block[path] = {"group_size": layer_group_size, "bits": layer_bits, "mode": layer_mode}
    out["quantization"] = block
    out["quantization_config"] = dict(block)
    return out


# ---- reading safetensors -------------------------------------------------------------------------------

@dataclass
class TensorRef:
    """A tensor known by dtype and shape, read on demand."""

    dtype: torch.dtype
    shape: tuple[int, ...]
    load: Callable[[], torch.Tensor]
    where: str

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * self.dtype.itemsize


class Checkpoint:
    """The tensors of a safetensors directory: ``model.safetensors``, or shards listed by
    ``model.safetensors.index.json``, or (as mlx-lm globs) ``model*.safetensors``.

    Every header is parsed and checked against its file size on opening (a truncated file is an error that
    names it). Use as a context manager; ``refs`` maps each tensor name to a :class:`TensorRef`.
    """

    def __init__(self, directory: PathLike):
        try:
            from safetensors import SafetensorError, safe_open
        except ImportError:
            raise ImportError("reading checkpoints needs safetensors: pip install safetensors") from None

        self.directory = Path(directory)
        self._handles: dict[Path, Any] = {}
        self.refs: dict[str, TensorRef] = {}
        self.metadata: dict[Path, dict[str, str]] = {}
        index_path = self.directory / INDEX_NAME
        weight_map: Optional[dict[str, str]] = None
        if index_path.is_file():
            try:
                with open(index_path, encoding="utf-8") as f:
                    weight_map = json.load(f)["weight_map"]
            except (json.JSONDecodeError, KeyError, TypeError) as error:
                raise ValueError(f"{index_path}: not a safetensors index ({error!r})") from None
            files = sorted({self.directory / name for name in weight_map.values()})
        elif (self.directory / SINGLE_FILE).is_file():
            files = [self.directory / SINGLE_FILE]
        else:
            files = sorted(self.directory.glob("model*.safetensors"))
        if not files:
            raise FileNotFoundError(f"{self.directory}: no {SINGLE_FILE}, {INDEX_NAME} or model*.safetensors")
        try:
            for file in files:
                if not file.is_file():
                    raise FileNotFoundError(f"{file}: listed in {INDEX_NAME} but missing")
                try:
                    handle = safe_open(str(file), framework="pt")
                except SafetensorError as error:
                    raise ValueError(f"{file}: not a complete safetensors file ({error})") from None
                self._handles[file] = handle
                self.metadata[file] = handle.metadata() or {}
                for name in handle.keys():
                    if name in self.refs:
                        raise ValueError(f"tensor {name!r} is stored twice: in {self.refs[name].where} and {file}")
                    piece = handle.get_slice(name)
                    dtype = _DTYPES.get(piece.get_dtype())
                    if dtype is None:
                        raise ValueError(f"{file}: tensor {name!r} has unsupported dtype {piece.get_dtype()}")
                    self.refs[name] = TensorRef(
                        dtype, tuple(piece.get_shape()), _loader(handle, name), str(file)
                    )
            for name, file_name in (weight_map or {}).items():
                ref = self.refs.get(name)
                if ref is None or Path(ref.where).name != file_name:
                    raise ValueError(f"{index_path}: tensor {name!r} is not in {file_name}")
        except BaseException:
            self.close()
            raise

    def close(self) -> None:
        self._handles.clear()

    def __enter__(self) -> "Checkpoint":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _loader(handle, name: str) -> Callable[[], torch.Tensor]:
    return lambda: handle.get_tensor(name)


# ---- writing safetensors ---------------------------------------------------------------------------------

@dataclass
class Entry:
    """One output tensor: its name, dtype and shape up front (for the header), its data on demand."""

    name: str
    dtype: torch.dtype
    shape: tuple[int, ...]
    produce: Callable[[], torch.Tensor]

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * self.dtype.itemsize


@contextlib.contextmanager
def atomic_directory(directory: PathLike, overwrite: bool = False) -> Iterator[Path]:
    """Yield an empty temporary sibling of ``directory``; rename it to ``directory`` when the block succeeds,
    delete it when the block raises (``KeyboardInterrupt`` included)."""
    directory = Path(directory)
    if directory.exists() and not overwrite:
        raise FileExistsError(f"{directory}: already exists (pass overwrite=True / --overwrite to replace it)")
    if directory.exists() and not directory.is_dir():
        raise FileExistsError(f"{directory}: exists and is not a directory")
    directory.parent.mkdir(parents=True, exist_ok=True)
    token = uuid.uuid4().hex[:8]
    tmp = directory.parent / f".{directory.name}.tmp-{token}"
    tmp.mkdir()
    try:
        yield tmp
        if directory.exists():  # overwrite: swap, then drop the old directory
            old = directory.parent / f".{directory.name}.old-{token}"
            directory.rename(old)
            tmp.rename(directory)
            shutil.rmtree(old, ignore_errors=True)
        else:
            tmp.rename(directory)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def write_checkpoint(
    directory: Path,
    entries: list[Entry],
    config: Optional[dict[str, Any]],
    format: str,
    max_shard_size: int = DEFAULT_MAX_SHARD_SIZE,
    progress: Optional[bool] = None,
) -> None:
    """Write ``entries`` as safetensors shards (and the index when there are several) plus ``config.json``."""
    _check_format_name(format)
    names = Counter(entry.name for entry in entries)
    duplicates = [name for name, count in names.items() if count > 1]
    if duplicates:
        raise ValueError(f"tensor names written twice: {duplicates}")
    shards: list[list[Entry]] = []
    size = 0
    for entry in entries:
        if not shards or (shards[-1] and size + entry.nbytes > max_shard_size):
            shards.append([])
            size = 0
        shards[-1].append(entry)
        size += entry.nbytes
    if not shards:
        shards.append([])
    metadata = {"format": "mlx" if format == "mlx" else "pt"}
    total = sum(entry.nbytes for entry in entries)
    show = total >= _PROGRESS_MIN_BYTES if progress is None else progress
    weight_map = {}
    with tqdm(total=total, unit="B", unit_scale=True, desc="writing", disable=not show) as bar:
        for i, shard in enumerate(shards):
            file_name = SINGLE_FILE if len(shards) == 1 else SHARD_NAME.format(i + 1, len(shards))
            _write_safetensors(directory / file_name, shard, metadata, bar)
            weight_map.update({entry.name: file_name for entry in shard})
    if len(shards) > 1:
        index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
        _write_json(directory / INDEX_NAME, index)
    if config is not None:
        _write_json(directory / CONFIG_NAME, config)


def _write_json(path: Path, content: Any) -> None:
    with open(path, "w", encoding="utf-8") as f:
        json.dump(content, f, indent=2)
        f.write("\n")


def _write_safetensors(path: Path, entries: list[Entry], metadata: dict[str, str], bar) -> None:
    """safetensors: u64 header length, JSON header (padded to 8 bytes), then the tensors back to back."""
    header: dict[str, Any] = {"__metadata__": metadata}
    offset = 0
    for entry in entries:
        dtype = _DTYPE_NAMES.get(entry.dtype)
        if dtype is None:
            raise ValueError(f"tensor {entry.name!r}: dtype {entry.dtype} cannot be stored in safetensors")
        end = offset + entry.nbytes
        header[entry.name] = {"dtype": dtype, "shape": list(entry.shape), "data_offsets": [offset, end]}
        offset += entry.nbytes
    encoded = json.dumps(header, separators=(",", ":")).encode()
    encoded += b" " * (-len(encoded) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(encoded)))
        f.write(encoded)
        for entry in entries:
            tensor = entry.produce()
            if tensor.dtype != entry.dtype or tuple(tensor.shape) != entry.shape:
                raise RuntimeError(
                    f"tensor {entry.name!r}: produced {tensor.dtype} {tuple(tensor.shape)}, "
                    f"announced {entry.dtype} {entry.shape}"
                )
            if tensor.numel():
                data = tensor.detach().to("cpu").contiguous().reshape(-1).view(torch.uint8)
                f.write(memoryview(data.numpy()))
            bar.update(entry.nbytes)
            del tensor
        f.flush()
        os.fsync(f.fileno())


# ---- output entries: renames and on-the-fly quantization ----------------------------------------------

def _output_entries(
    refs: dict[str, TensorRef],
    layers: dict[str, LayerFormat],
    format: str,
) -> list[Entry]:
    """The tensors to write: quantized layers in ``format``'s spelling, float weights of ``layers`` that have no
    ``scales`` yet quantized on the fly (one layer in memory at a time), everything else unchanged. ``refs``
    spell the packed tensors ``weight``."""
    from .transformers import packed_weight_name

    biases = _BIASES[format]
    other = _BIASES["mlx" if format == "metal" else "metal"]
    packed = "weight" if format == "mlx" else packed_weight_name()
    entries: list[Entry] = []
    for name, ref in refs.items():
        path, _, leaf = name.rpartition(".")
        quantized = f"{path}.scales" in refs
        if path in layers and not quantized and leaf == "weight":
            entries.extend(_quantize_entries(path, ref, *layers[path], biases, packed))
        elif quantized and leaf in (other, "weight"):
            entries.append(Entry(f"{path}.{packed if leaf == 'weight' else biases}", ref.dtype, ref.shape, ref.load))
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


def _model_sources(
    model: nn.Module, config: Optional[MetalConfig], format: str
) -> tuple[dict[str, LayerFormat], dict[str, TensorRef]]:
    """The quantized layers (existing, plus float Linears ``config`` selects for ``format``) and the model's
    tensors, each tied tensor once."""
    from .quantize import matches_module_name

    skip = [] if config is None else _kept_float(model, config.modules_to_not_convert, format)

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
        if _is_quantized_module(module):
            layers[fqn] = (module.bits, module.group_size, getattr(module, "mode", "affine"))
        elif config is not None and _is_float_experts(module):
            if not any(matches_module_name(fqn, p) for p in skip):
                raise ValueError(f"save_quantized: {fqn} holds float experts; quantizing while writing covers "
                                 f"nn.Linear layers only: quantize the model with metalq.quantize_ first")
        elif config is not None and _is_linear(module) and f"{fqn}.weight" in refs:
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


def _is_linear(module: nn.Module) -> bool:
    return isinstance(module, nn.Linear) and not isinstance(module, nn.modules.linear.NonDynamicallyQuantizableLinear)


def _is_float_experts(module: nn.Module) -> bool:
    return not isinstance(module, MetalExperts) and expert_projections(module) is not None


def _is_quantized_module(module: nn.Module) -> bool:
    return "scales" in module._buffers and hasattr(module, "bits") and hasattr(module, "group_size")


# ---- mlx-lm's names for mixture-of-experts blocks ------------------------------------------------------------
# mlx-lm keeps a block's experts as `<block>.switch_mlp.<projection>` (transformers' fused `gate_up_proj` is its
# `gate_proj` and `up_proj` stacked along the output rows) and spells the block as the original checkpoints do
# (Mixtral's `block_sparse_moe` is transformers' `mlp`).

MLX_EXPERTS = "switch_mlp"
_MLX_PIECES = {"gate_up_proj": ("gate_proj", "up_proj")}  # transformers projection -> mlx-lm projections
_EXPERT_LEAVES = ("weight", "scales", "biases", "qbiases", "bias")


def _experts_blocks(model: nn.Module) -> list[tuple[str, nn.Module, str]]:
    """``(experts path, experts module, block path)`` for each fused experts module of ``model``."""
    found = []
    for path, module in model.named_modules():
        if path and expert_projections(module) is not None:
            if getattr(module, "is_concatenated", True) is False:
                raise ValueError(f"{path}: interleaved gate/up experts have no mlx-lm layout")
            found.append((path, module, path.rpartition(".")[0]))
    return found


def _prefix_renamer(renames: dict[str, str]) -> Callable[[str], str]:
    """``name -> name`` with a leading key of ``renames`` replaced by its value."""

    def rename(name: str) -> str:
        prefix = next((p for p in renames if name.startswith(p)), None)
        return name if prefix is None else renames[prefix] + name[len(prefix):]

    return rename


def _mlx_pieces(name: str) -> tuple[str, ...]:
    return _MLX_PIECES.get(name, (name,))


def _merged_ref(names: list[str], refs: dict[str, TensorRef]) -> TensorRef:
    """One tensor read as the given tensors stacked along dimension 1 (the expert matrices' rows)."""
    parts = [refs[name] for name in names]
    first = parts[0]
    other_dims = lambda shape: shape[:1] + shape[2:]  # noqa: E731
    for name, part in zip(names, parts):
        if part.dtype != first.dtype or len(part.shape) < 2 or other_dims(part.shape) != other_dims(first.shape):
            raise ValueError(f"tensor {name!r} ({part.where}) is {part.dtype} {part.shape}, which does not stack with "
                             f"{names[0]!r} ({first.dtype} {first.shape})")
    shape = (first.shape[0], sum(part.shape[1] for part in parts), *first.shape[2:])
    where = " and ".join(dict.fromkeys(part.where for part in parts))
    return TensorRef(first.dtype, shape, lambda: torch.cat([part.load() for part in parts], dim=1), where)


def from_mlx_expert_names(
    model: nn.Module, refs: dict[str, TensorRef], overrides: dict[str, Optional[LayerFormat]]
) -> tuple[dict[str, TensorRef], dict[str, Optional[LayerFormat]]]:
    """An mlx-lm checkpoint's tensors and per-path formats under ``model``'s names: each fused experts module
    reads ``<block>.switch_mlp.*`` (gate and up projections stacked), and a block the checkpoint spells
    differently (found as the one sibling with ``switch_mlp`` tensors) is renamed to the model's."""
    owners = {name.split(f".{MLX_EXPERTS}.")[0] for name in refs if f".{MLX_EXPERTS}." in name}
    renames: dict[str, str] = {}  # checkpoint block prefix -> model block prefix
    merged: dict[str, list[str]] = {}  # model tensor name -> checkpoint tensor names
    formats: dict[str, Optional[LayerFormat]] = {}
    stacked_paths: set[str] = set()
    for path, module, block in _experts_blocks(model):
        siblings = [owner for owner in owners if owner.rpartition(".")[0] == block.rpartition(".")[0]]
        spelled = block if block in owners else siblings[0] if len(siblings) == 1 else None
        if spelled is None:
            continue  # no mlx-lm experts here: the load plan reports what is missing
        if spelled != block:
            renames[f"{spelled}."] = f"{block}."
        for name in expert_projections(module):
            pieces = [f"{spelled}.{MLX_EXPERTS}.{piece}" for piece in _mlx_pieces(name)]
            quantized = f"{pieces[0]}.scales" in refs
            for leaf in _EXPERT_LEAVES:
                names = [f"{piece}.{leaf}" for piece in pieces]
                present = [n for n in names if n in refs]
                if present and len(present) != len(names):
                    missing = next(n for n in names if n not in refs)
                    raise ValueError(f"missing tensor {missing!r}: {path}.{name} stacks {', '.join(pieces)}")
                if present and quantized:
                    merged[f"{path}.{name}.{leaf}"] = names
                elif present:  # a float stack is the experts module's own parameter
                    merged[f"{path}.{name}_bias" if leaf == "bias" else f"{path}.{name}"] = names
            listed = [overrides[piece] for piece in pieces if piece in overrides]
            if listed and (len(listed) != len(pieces) or len(set(listed)) > 1):
                raise ValueError(f"{' and '.join(pieces)} have different formats in the quantization block, but "
                                 f"{path}.{name} holds them as one matrix")
            if listed:
                formats[f"{path}.{name}"] = listed[0]
            stacked_paths.update(pieces)

    rename = _prefix_renamer(renames)
    consumed = {name for names in merged.values() for name in names}
    out = {rename(name): ref for name, ref in refs.items() if name not in consumed}
    for target, names in merged.items():
        out[target] = refs[names[0]] if len(names) == 1 else _merged_ref(names, refs)
    if len(out) != len(refs) - len(consumed) + len(merged):
        raise ValueError(f"renaming {', '.join(renames)} to the model's names makes tensor names collide")
    kept = {rename(key): value for key, value in overrides.items() if key not in stacked_paths}
    return out, {**kept, **formats}


def _checkpoint_block_name(model: nn.Module, block: str) -> str:
    """How original checkpoints (and so mlx-lm) spell ``block``: transformers' own renamings, reversed."""
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    try:
        from transformers.conversion_mapping import get_checkpoint_conversion_mapping
        from transformers.core_model_loading import WeightRenaming
    except ImportError:
        return block
    name = f"{block}."
    transforms = get_checkpoint_conversion_mapping(model_type) if model_type else None
    for transform in transforms or []:
        if type(transform) is WeightRenaming:
            name, _ = transform.reverse_transform().rename_source_key(name)
    return name[:-1]


def to_mlx_expert_names(
    model: nn.Module, refs: dict[str, TensorRef], layers: dict[str, LayerFormat]
) -> tuple[dict[str, TensorRef], dict[str, LayerFormat]]:
    """Inverse of :func:`from_mlx_expert_names` for saving: each fused experts module's tensors (quantized, or
    float ``(E, out, in)`` parameters) as mlx-lm's ``<block>.switch_mlp.*``, the gate and up halves split."""
    renames: dict[str, str] = {}  # model block prefix -> checkpoint block prefix
    split: dict[str, list[tuple[str, int, int]]] = {}  # model tensor name -> (checkpoint name, first row, rows)
    out_layers = dict(layers)
    for path, module, block in _experts_blocks(model):
        if getattr(module, "is_transposed", False) and not isinstance(module, MetalExperts):
            raise ValueError(f"{path}: float experts stored (E, in, out) have no mlx-lm layout; quantize them first")
        spelled = _checkpoint_block_name(model, block)
        if spelled != block:
            renames[f"{block}."] = f"{spelled}."
        for name, (_, rows, _) in expert_projections(module).items():
            pieces = _mlx_pieces(name)
            height = rows // len(pieces)
            targets = [f"{spelled}.{MLX_EXPERTS}.{piece}" for piece in pieces]
            if isinstance(module, MetalExperts):
                sources = {leaf: f"{path}.{name}.{leaf}" for leaf in _EXPERT_LEAVES}
            else:
                sources = {"weight": f"{path}.{name}", "bias": f"{path}.{name}_bias"}
            for leaf, source in sources.items():
                if source in refs:
                    split[source] = [(f"{target}.{leaf}", i * height, height) for i, target in enumerate(targets)]
            if f"{path}.{name}" in out_layers:
                layer_format = out_layers.pop(f"{path}.{name}")
                out_layers.update(dict.fromkeys(targets, layer_format))

    rename = _prefix_renamer(renames)
    out_layers = {rename(path): layer_format for path, layer_format in out_layers.items()}
    out: dict[str, TensorRef] = {}
    for name, ref in refs.items():
        if name not in split:
            out[rename(name)] = ref
            continue
        for target, start, height in split[name]:
            shape = (ref.shape[0], height, *ref.shape[2:])
            out[target] = TensorRef(ref.dtype, shape, _rows(ref, start, height), ref.where)
    return out, out_layers


def _rows(ref: TensorRef, start: int, height: int) -> Callable[[], torch.Tensor]:
    return lambda: ref.load()[:, start:start + height].contiguous()


# ---- loading into a model ----------------------------------------------------------------------------------

@dataclass
class _Part:
    """One packed matrix (or stack of matrices) of a quantized layer."""

    bits: int
    group_size: int
    mode: str
    names: dict[str, str]  # role (weight, scales, biases, bias) -> checkpoint tensor name


@dataclass
class _Layer:
    fqns: list[str]
    old: nn.Module
    kind: str  # "linear", "embedding", "experts", or "matrix" (another module's 2-D weight, loaded dequantized)
    parts: dict[str, _Part]  # "" for one matrix; the projection names of experts

    @property
    def names(self) -> list[str]:
        return [name for part in self.parts.values() for name in part.names.values()]


@dataclass
class _LoadPlan:
    layers: list[_Layer]
    groups: list[tuple[list[str], str, torch.Tensor]]  # (model keys sharing one tensor, checkpoint name, old)
    tied_heads: list[tuple[list[str], nn.Module, _Layer]]  # Linear heads tied to a quantized embedding
    needed: dict[str, torch.device]  # checkpoint name -> where the tensor goes


# a packed part's shape: (leading rows shape, in_features, whether it has a float bias)
_PartShape = tuple[tuple[int, ...], int, bool]


def _quantizable(module: nn.Module) -> Optional[tuple[str, dict[str, _PartShape]]]:
    """``(kind, {part: shape})`` for a layer a checkpoint may hold quantized."""
    if isinstance(module, nn.Embedding) or (_is_quantized_module(module) and hasattr(module, "embedding_dim")):
        return "embedding", {"": ((module.num_embeddings,), module.embedding_dim, False)}
    if _is_linear(module) or isinstance(module, MetalLinear):
        return "linear", {"": ((module.out_features,), module.in_features, module.bias is not None)}
    projections = expert_projections(module)
    if projections is not None:
        if isinstance(module, MetalExperts):
            biases = {name: layer.bias is not None for name, layer in module.projections()}
        else:
            biases = {name: getattr(module, f"{name}_bias", None) is not None for name in projections}
        return "experts", {
            name: ((count, rows), columns, biases[name]) for name, (count, rows, columns) in projections.items()
        }
    weight = module._parameters.get("weight")
    if weight is not None and weight.dim() == 2:
        return "matrix", {"": ((weight.shape[0],), weight.shape[1], False)}
    return None


def _owned_keys(kind: str, module: nn.Module, fqn: str) -> list[str]:
    """The model state keys a quantized layer's checkpoint tensors replace."""
    if kind == "matrix":
        return [f"{fqn}.weight"]
    if isinstance(module, MetalExperts):
        return [f"{fqn}.{name}.{leaf}" for name, layer in module.projections() for leaf in layer.state_dict()]
    if kind == "experts":
        owned = {f"{name}{suffix}" for name in expert_projections(module) for suffix in ("", "_bias")}
        return [f"{fqn}.{name}" for name in module._parameters if name in owned]
    own = [*module.named_parameters(recurse=False), *module.named_buffers(recurse=False)]
    return [f"{fqn}.{leaf}" for leaf, _ in own]


def _plan_part(path: str, shape: _PartShape, override, scheme: Scheme, refs: dict[str, TensorRef]) -> _Part:
    """Format and tensor names of the packed matrix at ``path``, every tensor checked against the checkpoint."""
    where = lambda name: f"tensor {name!r} ({refs[name].where})"  # noqa: E731
    rows, in_features, has_bias = shape
    mode = override[2] if override else scheme.mode
    names = {"weight": f"{path}.weight", "scales": f"{path}.scales"}
    if mode == "affine":
        names["biases"] = f"{path}.{_BIASES[scheme.kind]}"
    for role, name in names.items():
        if name not in refs:
            raise ValueError(f"missing tensor {name!r}: {path} is quantized ({scheme.kind} checkpoint)")
    scales = refs[names["scales"]]
    if override:
        bits, group_size, mode = override
    elif scheme.kind == "mlx" and mode == "affine":  # mlx-lm infers unlisted affine layers from the shapes
        if len(scales.shape) != len(rows) + 1 or not scales.shape[-1] or in_features % scales.shape[-1]:
            raise ValueError(f"{where(names['scales'])} has shape {scales.shape}, which does not fit "
                             f"{path} (in_features={in_features})")
        group_size = in_features // scales.shape[-1]
        bits = refs[names["weight"]].shape[-1] * 32 // in_features
        try:
            check_format(path, bits, group_size)
        except ValueError as error:
            raise ValueError(f"{error} (inferred from the shapes of {path}.weight and {path}.scales)") from None
    else:
        bits, group_size = scheme.bits, scheme.group_size
    if in_features % group_size:
        raise ValueError(f"{path}: in_features={in_features} is not divisible by group_size={group_size}")
    groups = (*rows, in_features // group_size)
    expect = {
        "weight": ((*rows, in_features * bits // 32), (torch.uint32,)),
        "scales": (groups, (torch.float32, torch.float16, torch.bfloat16) if mode == "affine" else (torch.uint8,)),
    }
    if mode == "affine":
        expect["biases"] = (groups, (scales.dtype,))
    if has_bias:
        names["bias"] = f"{path}.bias"
        if names["bias"] not in refs:
            raise ValueError(f"missing tensor {names['bias']!r}")
        expect["bias"] = (rows, None)
    for role, (shape, dtypes) in expect.items():
        ref = refs[names[role]]
        if ref.shape != shape:
            raise ValueError(f"{where(names[role])} has shape {ref.shape}, expected {shape} "
                             f"for {path} (bits={bits}, group_size={group_size}, mode={mode})")
        if dtypes is not None and ref.dtype not in dtypes:
            raise ValueError(f"{where(names[role])} has dtype {ref.dtype}, expected one of {dtypes}")
    return _Part(bits, group_size, mode, names)


def _plan_load(model: nn.Module, checkpoint: Checkpoint, scheme: Scheme, strict: bool) -> _LoadPlan:
    from .quantize import matches_module_name

    refs = checkpoint.refs
    where = lambda name: f"tensor {name!r} ({refs[name].where})"  # noqa: E731
    modules: dict[int, tuple[list[str], nn.Module]] = {}
    for fqn, module in model.named_modules(remove_duplicate=False):
        if fqn and _quantizable(module) is not None:
            modules.setdefault(id(module), ([], module))[0].append(fqn)

    layers: list[_Layer] = []
    covered: set[str] = set()  # model state keys owned by quantized layers
    for fqns, module in modules.values():
        kind, shapes = _quantizable(module)
        part_path = lambda base, part: f"{base}.{part}" if part else base  # noqa: E731
        path = next((f for f in fqns if any(f"{part_path(f, part)}.scales" in refs for part in shapes)), fqns[0])
        quantized = {}
        for part in shapes:
            name = part_path(path, part)
            if scheme.kind == "mlx":
                override = scheme.overrides.get(name, False)
                quantized[part] = override is not None and (override is not False or f"{name}.scales" in refs)
            elif kind == "linear":
                # transformers quantizes every Linear not excluded; a tied head (no weight of its own) follows its table
                excluded = any(matches_module_name(path, p) for p in scheme.modules_to_not_convert)
                quantized[part] = f"{name}.scales" in refs or (not excluded and f"{name}.weight" in refs)
            else:
                quantized[part] = f"{name}.scales" in refs
        if len(set(quantized.values())) > 1:
            raise ValueError(f"{path}: the checkpoint holds some of its projections quantized and others not "
                             f"({', '.join(part for part, q in quantized.items() if q)} quantized)")
        if not any(quantized.values()):
            if isinstance(module, (MetalLinear, MetalExperts)):
                raise ValueError(f"{path} is a {type(module).__name__} but the checkpoint holds no quantized "
                                 f"tensors for it")
            continue
        parts = {}
        for part, shape in shapes.items():
            name = part_path(path, part)
            override = scheme.overrides.get(name, False) if scheme.kind == "mlx" else False
            parts[part] = _plan_part(name, shape, override, scheme, refs)
            if kind == "experts" and parts[part].mode != "affine":
                raise ValueError(f"{name}: {parts[part].mode} experts are not supported (metalq's experts are affine)")
        layers.append(_Layer(fqns, module, kind, parts))
        for fqn in fqns:
            covered.update(_owned_keys(kind, module, fqn))

    state = model.state_dict(keep_vars=True)
    tensor_groups: dict[int, list[str]] = {}
    for key, tensor in state.items():
        tensor_groups.setdefault(id(tensor), []).append(key)
    embedding_of = {id(layer.old.weight): layer for layer in layers if layer.kind == "embedding"}
    groups, tied_heads = [], []
    for ident, keys in tensor_groups.items():
        rest = [key for key in keys if key not in covered]
        if not rest:
            continue
        present = [key for key in rest if key in refs]
        if present:
            name = present[0]
            old = state[name]
            for key in present:
                ref = refs[key]
                if ref.shape != tuple(old.shape):
                    raise ValueError(f"{where(key)} has shape {ref.shape}, the model expects {tuple(old.shape)}")
                both_float = ref.dtype.is_floating_point and old.dtype.is_floating_point
                if not both_float and ref.dtype != old.dtype:
                    raise ValueError(f"{where(key)} has dtype {ref.dtype}, the model expects {old.dtype}")
            groups.append((rest, name, old))
            covered.update(present)
        elif ident in embedding_of and all(key.endswith(".weight") for key in rest):
            # an output head tied to an embedding that the checkpoint holds quantized
            for key in rest:
                head_path = key[: -len(".weight")]
                head = model.get_submodule(head_path)
                if not _is_linear(head):
                    raise ValueError(f"{key} is tied to quantized {embedding_of[ident].fqns[0]} but is not a Linear")
                tied_heads.append(([head_path], head, embedding_of[ident]))
        else:
            raise ValueError(f"missing tensor {rest[0]!r}: the model has it but the checkpoint does not")
    used = {name for layer in layers for name in layer.names} | {name for _, name, _ in groups}
    used |= covered
    unexpected = sorted(set(refs) - used)
    if strict and unexpected:
        raise ValueError(f"unexpected tensors in the checkpoint (the model has no place for them): "
                         f"{_listing([repr(name) for name in unexpected])}")
    needed = {name: _target_device(old) for _, name, old in groups}
    for layer in layers:
        needed.update(dict.fromkeys(layer.names, _module_device(layer.old)))
    return _LoadPlan(layers, groups, tied_heads, dict(sorted(needed.items())))


def _read_all(
    checkpoint: Checkpoint, names: dict[str, torch.device], progress: Optional[bool]
) -> dict[str, torch.Tensor]:
    """Read each tensor and move it to its device at once (one host copy alive at a time)."""
    refs = checkpoint.refs
    total = sum(refs[name].nbytes for name in names)
    show = total >= _PROGRESS_MIN_BYTES if progress is None else progress
    tensors = {}
    with tqdm(total=total, unit="B", unit_scale=True, desc="loading", disable=not show) as bar:
        for name, device in names.items():
            try:
                tensors[name] = refs[name].load().to(device)
            except Exception as error:  # noqa: BLE001  (safetensors raises its own error types)
                raise ValueError(f"tensor {name!r} ({refs[name].where}): cannot be read ({error})") from None
            bar.update(refs[name].nbytes)
    return tensors


def _target_device(old: Optional[torch.Tensor]) -> torch.device:
    return torch.device("cpu") if old is None or old.device.type == "meta" else old.device


def _module_device(module: nn.Module) -> torch.device:
    """Where a layer's loaded tensors go: the device of its weight (or first tensor); CPU for ``meta``."""
    tensor = getattr(module, "weight", None)
    if not isinstance(tensor, torch.Tensor):
        tensor = next(iter([*module.parameters(), *module.buffers()]), None)
    return _target_device(tensor)


def _apply(model: nn.Module, plan: _LoadPlan, tensors: dict[str, torch.Tensor]) -> None:
    """Build every new layer, then swap them all in (nothing here can fail on the checkpoint's account)."""
    import metalq

    embedding_class = getattr(metalq, "MetalEmbedding", None)
    tied_head_class = getattr(metalq, "MetalTiedHead", None)
    dequantized = []
    built: dict[int, nn.Module] = {}
    for layer in plan.layers:
        old = layer.old
        device = _module_device(old)
        packed = {}  # part -> (weight, scales, biases, bias or None)
        for part, spec in layer.parts.items():
            get = lambda role: tensors[spec.names[role]].to(device)  # noqa: E731
            packed[part] = (get("weight"), get("scales"), get("biases") if "biases" in spec.names else None,
                            get("bias") if "bias" in spec.names else None)
        if layer.kind == "experts":
            projections = {}
            for part, (weight, scales, biases, bias) in packed.items():
                count, rows, _ = weight.shape
                spec = layer.parts[part]
                new = MetalSwitchLinear(count, scales.shape[-1] * spec.group_size, rows, bias=bias is not None,
                                        bits=spec.bits, group_size=spec.group_size, dtype=scales.dtype, device="meta")
                new.weight, new.scales, new.qbiases = weight, scales, biases
                if bias is not None:
                    new.bias = nn.Parameter(bias)
                projections[part] = new
            built[id(layer)] = MetalExperts(old, projections)
            continue
        spec, (weight, scales, biases, bias) = layer.parts[""], packed[""]
        # the float dtype: the scales' (affine), else the replaced layer's (fp modes' scales are uint8)
        old_weight = getattr(old, "weight", None)
        dtype = scales.dtype if spec.mode == "affine" else (
            old_weight.dtype if old_weight is not None and old_weight.is_floating_point() else None)
        fmt = dict(bits=spec.bits, group_size=spec.group_size, dtype=dtype, device="meta", mode=spec.mode)
        if layer.kind == "matrix":
            table = (affine_dequantize(weight, scales, biases, spec.group_size, spec.bits) if spec.mode == "affine"
                     else fp_dequantize(weight, scales, spec.mode, dtype=dtype))
            new = nn.Parameter(table, requires_grad=old.weight.requires_grad)
        elif layer.kind == "linear":
            new = MetalLinear(old.in_features, old.out_features, bias=bias is not None, **fmt)
            _set_packed(new, weight, scales, biases)
            if bias is not None:
                new.bias = nn.Parameter(bias, requires_grad=old.bias.requires_grad)
        elif embedding_class is not None:
            new = embedding_class(old.num_embeddings, old.embedding_dim, padding_idx=old.padding_idx, **fmt)
            _set_packed(new, weight, scales, biases)
        else:
            new = nn.Embedding(old.num_embeddings, old.embedding_dim, padding_idx=getattr(old, "padding_idx", None),
                               dtype=scales.dtype, device="meta")
            new.weight = nn.Parameter(affine_dequantize(weight, scales, biases, spec.group_size, spec.bits),
                                      requires_grad=False)
            dequantized.append(layer.fqns[0])
        built[id(layer)] = new
    heads = []
    for head_paths, head, layer in plan.tied_heads:
        table = built[id(layer)]
        bias = None if head.bias is None or head.bias.device.type == "meta" else head.bias
        if isinstance(table, nn.Embedding):
            heads.append((head_paths, None, table))  # share the float table's parameter
        elif tied_head_class is not None:
            heads.append((head_paths, tied_head_class(table, bias=bias), None))
        else:
            new = MetalLinear(table.embedding_dim, table.num_embeddings, bias=bias is not None, bits=table.bits,
                              group_size=table.group_size, dtype=table.float_dtype, device="meta", mode=table.mode)
            _set_packed(new, table.weight, table.scales, getattr(table, "qbiases", None))
            if bias is not None:
                new.bias = nn.Parameter(bias.detach().clone())
            heads.append((head_paths, new, None))
    if dequantized:
        warnings.warn(
            f"load_quantized: metalq.MetalEmbedding is unavailable; quantized embedding(s) {', '.join(dequantized)} "
            f"were dequantized to float nn.Embedding",
            stacklevel=3,
        )
    # ---- from here on the model changes
    for layer in plan.layers:
        for fqn in layer.fqns:
            if layer.kind == "matrix":  # the module stays; its weight is the dequantized matrix
                model.get_submodule(fqn)._parameters["weight"] = built[id(layer)]
            else:
                model.set_submodule(fqn, built[id(layer)])
    for keys, name, old in plan.groups:
        tensor = tensors[name].to(_target_device(old))
        if isinstance(old, nn.Parameter):
            tensor = nn.Parameter(tensor, requires_grad=old.requires_grad and tensor.is_floating_point())
        for key in keys:
            module_path, _, leaf = key.rpartition(".")
            module = model.get_submodule(module_path)
            if leaf in module._parameters:
                module._parameters[leaf] = tensor
            else:
                module._buffers[leaf] = tensor
    for head_paths, new, table in heads:
        for path in head_paths:
            if new is None:
                model.get_submodule(path).weight = table.weight
            else:
                model.set_submodule(path, new)


def _set_packed(layer: nn.Module, weight: torch.Tensor, scales: torch.Tensor, biases: Optional[torch.Tensor]) -> None:
    """Give a freshly built quantized layer its tensors (``biases`` is None in the floating-point modes)."""
    layer.weight, layer.scales = weight, scales
    if biases is not None:
        layer.qbiases = biases


# ---- helpers -------------------------------------------------------------------------------------------

def parse_size(size: Union[int, str]) -> int:
    """Bytes from an int or a string such as ``"500MB"``, ``"2GB"`` or ``"1GiB"``."""
    if isinstance(size, bool):
        raise ValueError(f"max_shard_size: expected bytes or a size such as '2GB', got {size!r}")
    if isinstance(size, int):
        value = size
    else:
        match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]?)(i?)B?\s*", str(size), re.IGNORECASE)
        if not match:
            raise ValueError(f"max_shard_size: expected bytes or a size such as '2GB', got {size!r}")
        number, prefix, binary = match.groups()
        base = 1024 if binary else 1000
        value = int(float(number) * base ** " KMGT".index(prefix.upper() or " "))
    if value <= 0:
        raise ValueError(f"max_shard_size must be positive, got {size!r}")
    return value


def _check_format_name(format: str) -> None:
    if format not in FORMATS:
        raise ValueError(f"format must be one of {FORMATS}, got {format!r}")
