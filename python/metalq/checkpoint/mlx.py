"""mlx-lm's layout: ``config.json``'s ``quantization`` block (``group_size``, ``bits``, ``mode`` plus per-path
overrides; an identical ``quantization_config`` beside it), offsets ``{path}.biases``, safetensors metadata
``{"format": "mlx"}``, unlisted layers' formats read from their shapes, the group sizes MLX can read, and mlx-lm's
names for mixture-of-experts blocks. ``mlx_lm.load`` reads these directories."""
from __future__ import annotations

import dataclasses
from collections import Counter
from typing import Any, Callable, Optional

import torch
from torch import nn

from ..config import MetalConfig, resolve_format
from ..moe import MetalExperts, expert_projections
from .layout import LayerFormat, Layout, Scheme, listing
from .reader import PathLike, TensorRef

MLX_AFFINE_GROUP_SIZES = (32, 64, 128)  # what mx.quantize accepts in affine mode (metalq's formats have 16 too)


class MlxLayout(Layout):
    name = "mlx"
    offsets = "biases"
    declared_by = "mlx-lm's 'quantization' block"
    safetensors_format = "mlx"

    def claims(self, config: dict[str, Any]) -> bool:
        return isinstance(config.get("quantization"), dict)

    def read_scheme(self, config: dict[str, Any], where: PathLike) -> Scheme:
        block = config["quantization"]
        bits, group_size, mode = _entry(block, "quantization", where)
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
                overrides[key] = _entry({**inherited, **value}, field, where, defaults=True)
            else:
                raise ValueError(f"{where}: {field} must be an object or a boolean, got {value!r}")
        return Scheme("mlx", bits, group_size, overrides, mode=mode, infer_from_shapes=True)

    def config_entries(
        self, layers: dict[str, LayerFormat], float_linears: list[str], config: Optional[MetalConfig]
    ) -> dict[str, Any]:
        (bits, group_size, mode), _ = Counter(layers.values()).most_common(1)[0]
        block: dict[str, Any] = {"group_size": group_size, "bits": bits, "mode": mode}
        for path, layer in layers.items():
            if layer != (bits, group_size, mode):
                layer_bits, layer_group_size, layer_mode = layer
                block[path] = {"group_size": layer_group_size, "bits": layer_bits, "mode": layer_mode}
        return {"quantization": block, "quantization_config": dict(block)}

    def model_names(
        self, model: nn.Module, refs: dict[str, TensorRef], scheme: Scheme
    ) -> tuple[dict[str, TensorRef], Scheme]:
        refs, overrides = from_mlx_expert_names(model, refs, scheme.overrides)
        return refs, dataclasses.replace(scheme, overrides=overrides)

    def write_names(
        self, model: nn.Module, refs: dict[str, TensorRef], layers: dict[str, LayerFormat]
    ) -> tuple[dict[str, TensorRef], dict[str, LayerFormat]]:
        return to_mlx_expert_names(model, refs, layers)

    def check_output(self, caller: str, model: Optional[nn.Module], layers: dict[str, LayerFormat]) -> None:
        unreadable: dict[int, list[str]] = {}  # group size -> layers
        for path, (_, group_size, mode) in layers.items():
            if mode == "affine" and group_size not in MLX_AFFINE_GROUP_SIZES:
                unreadable.setdefault(group_size, []).append(path)
        if unreadable:
            held = "; ".join(f"group size {size} in {listing(paths)}" for size, paths in unreadable.items())
            raise ValueError(
                f"{caller}: the mlx layout cannot hold affine {held}: MLX reads affine group sizes "
                f"{', '.join(map(str, MLX_AFFINE_GROUP_SIZES))} only. Write the Metal layout instead "
                f"(format='metal', --to metal): metalq reads it"
            )


LAYOUT = MlxLayout()


def _entry(entry: dict, field: str, where, defaults: bool = False) -> LayerFormat:
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
