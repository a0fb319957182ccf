"""Converting checkpoint directories file to file (:func:`convert_checkpoint`, ``python -m metalq convert``): a float
transformers directory quantized, or a quantized one rewritten in another layout, with the model's architecture
built on the ``meta`` device from the class its ``config.json`` names (:func:`meta_model`)."""
from __future__ import annotations

import shutil
import warnings
from pathlib import Path
from typing import Any, Callable, Iterable, Optional, Union

import torch
from torch import nn

from ..config import check_format, resolve_format
from ..moe import expert_projections
from .gguf import GGUF_SUFFIX, convert_gguf
from .layout import LayerFormat, Scheme, checkpoint_kind, is_linear, layout_named, read_quantization
from .reader import CONFIG_NAME, INDEX_NAME, Checkpoint, PathLike, TensorRef, read_config
from .save import output
from .writer import DEFAULT_MAX_SHARD_SIZE, atomic_directory, parse_size, write_checkpoint

WEIGHT_SUFFIXES = {".safetensors", ".bin", ".pt", ".pth", ".gguf", ".h5", ".msgpack", ".npz", ".ckpt"}


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
      architecture (built on the ``meta`` device with transformers, so no weights are materialised: the class
      ``config.json``'s ``architectures`` names, any model transformers can build, encoders included) whose
      name matches no ``skip`` pattern and whose ``in_features`` fits ``group_size``; with ``embeddings=True``
      the ``nn.Embedding`` tables too, as mlx-lm does. ``skip=None`` follows the output layout's own tool:
      for ``"metal"`` transformers' default (the output head stays float, see
      :func:`transformers_default_skips`), for ``"mlx"`` mlx-lm's (nothing is skipped); a list (``[]``
      included) is exactly the patterns kept float;
    - a Metal or mlx-lm quantized directory is rewritten in the other spelling (a rename of the offsets and
      a new quantization entry; the packed tensors are copied unchanged);
    - a ``.gguf`` file is written as a quantized directory with its tokenizer (:func:`metalq.checkpoint.gguf.convert_gguf`;
      ``to`` defaults to ``"mlx"`` there).

    A Metal output that transformers' own loader cannot read is written with a warning, as in
    :func:`save_quantized`; an mlx output of a group size MLX cannot read (16) is an error.

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
    from ..quantize import matches_module_name

    source = Path(source)
    if source.suffix == GGUF_SUFFIX:
        if bits is not None or group_size is not None or skip is not None or embeddings or mode is not None:
            raise ValueError(f"{source}: a GGUF file is already quantized; bits, group_size, mode, skip and "
                             f"embeddings apply only to float checkpoints")
        return convert_gguf(source, destination, to=to or "mlx", max_shard_size=max_shard_size,
                            overwrite=overwrite, progress=progress)
    config = read_config(source)
    try:
        kind = checkpoint_kind(config)
    except ValueError as error:
        raise ValueError(f"{source / CONFIG_NAME}: {error}") from None
    if to is not None:
        layout_named(to)
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
    else:
        to = to or ("mlx" if kind == "metal" else "metal")
        scheme = read_quantization(config, source / CONFIG_NAME)
    with Checkpoint(source) as checkpoint:
        refs = checkpoint.refs if kind is None else scheme.layout.file_names(checkpoint.refs)
        model = meta_model(source, refs, required=kind is None)
        if model is not None and any(expert_projections(module) is not None for module in model.modules()):
            raise ValueError(f"{source}: convert does not handle mixture-of-experts models; load the model, quantize "
                             f"it with metalq.quantize_ and write it with metalq.save_quantized")
        if kind is None:
            skip = layout_named(to).kept_float(model, skip)
            layers, misfits = {}, []
            for fqn, module in model.named_modules():
                is_table = embeddings and isinstance(module, nn.Embedding)
                if not (is_linear(module) or is_table) or f"{fqn}.weight" not in refs:
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
        out_config, entries = output("convert", model, refs, layers, to, config)
        with atomic_directory(destination, overwrite=overwrite) as tmp:
            for file in sorted(source.iterdir()):
                weights = file.name in (CONFIG_NAME, INDEX_NAME) or file.suffix in WEIGHT_SUFFIXES
                if file.is_file() and not weights:
                    shutil.copy2(file, tmp / file.name)
            write_checkpoint(tmp, entries, out_config, to, limit, True if progress is None else progress)
    return Path(destination)


def meta_model(directory: Path, refs: dict[str, TensorRef], required: bool) -> Optional[nn.Module]:
    """The architecture of a transformers directory on the ``meta`` device (for its module names and types): the
    class ``config.json``'s ``architectures`` names; without one, or when the installed transformers has none of
    the classes named (with a warning then), the first of its base and causal-LM models that holds every weight of
    the checkpoint (``refs``). ``required``: raise when there is none, else return ``None``."""
    try:
        import transformers

        config = transformers.AutoConfig.from_pretrained(str(directory))
        named = list(getattr(config, "architectures", None) or ())
        classes = [getattr(transformers, name, None) for name in named]
        known = [cls for cls in classes if isinstance(cls, type) and issubclass(cls, transformers.PreTrainedModel)]
        if known:
            return _build(known[0]._from_config, config)  # as the auto classes build it
        weights = [name for name in refs if name.endswith(".weight")]
        tried = []
        for auto in (transformers.AutoModel, transformers.AutoModelForCausalLM):
            try:
                model = _build(auto.from_config, config)
            except ValueError:  # the auto class has no model for this model type
                continue
            held = model.state_dict().keys()
            missing = [name for name in weights if name not in held]
            if not missing:
                if named:
                    warnings.warn(f"convert: {directory / CONFIG_NAME} names architectures {named}, which "
                                  f"transformers {transformers.__version__} does not have; converting as "
                                  f"{type(model).__name__}, which holds every weight of the checkpoint", stacklevel=3)
                return model
            tried.append(f"{type(model).__name__} has no {missing[0]!r}")
        unknown = f"transformers {transformers.__version__} has no class {named}" if named else "no 'architectures'"
        tried = "; ".join(tried) or "none builds this model type"
        raise ValueError(f"{unknown}, and no auto class holds every weight of the checkpoint ({tried}): name the "
                         f"model's class in 'architectures'")
    except Exception as error:  # noqa: BLE001  (any failure means: architecture unknown)
        if required:
            raise ValueError(
                f"{directory}: cannot build the model architecture with transformers to find its Linear layers "
                f"({type(error).__name__}: {error})"
            ) from None
        return None


def _build(make: Callable[[Any], nn.Module], config: Any) -> nn.Module:
    """``make(config)`` on the ``meta`` device, transformers' initialisation warnings silenced."""
    with torch.device("meta"), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return make(config)


def _layers_from_scheme(scheme: Scheme, refs: dict[str, TensorRef]) -> dict[str, LayerFormat]:
    """``(bits, group_size, mode)`` of every module with ``scales`` in a quantized checkpoint, checked against the
    shapes."""
    offsets = scheme.layout.offsets
    layers = {}
    for name, scales in refs.items():
        if not name.endswith(".scales"):
            continue
        path = name[: -len(".scales")]
        weight = refs.get(f"{path}.weight")
        if weight is None:
            raise ValueError(f"missing tensor {path + '.weight'!r}: {path} has scales")
        bits, group_size, mode = scheme.bits, scheme.group_size, scheme.mode
        override = scheme.overrides.get(path, False)
        if override is None:
            raise ValueError(f"{path} has scales but quantization[{path!r}] is false")
        if override:
            bits, group_size, mode = override
        elif scheme.infer_from_shapes and mode == "affine" and len(scales.shape) == 2 and scales.shape[1]:
            group_size = weight.shape[-1] * 32 // bits // scales.shape[1]  # as mlx-lm reads unlisted layers
        if mode == "affine" and f"{path}.{offsets}" not in refs:
            raise ValueError(f"missing tensor {path + '.' + offsets!r}: {path} is quantized")
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
