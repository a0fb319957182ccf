"""Loading a quantized checkpoint into a model (:func:`load_quantized`): the load plan matches every tensor of the
checkpoint to the model's modules under the :class:`Scheme`'s rules and checks names, shapes and dtypes, then every
tensor is read, and only then are the new layers built and swapped in, so an error leaves the model untouched."""
from __future__ import annotations

import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch
from torch import nn
from tqdm.auto import tqdm

from ..config import check_format
from ..linear import MetalLinear
from ..moe import MetalExperts, MetalSwitchLinear, expert_projections
from ..ops import affine_dequantize, fp_dequantize
from .layout import Scheme, is_linear, is_quantized_module, listing, read_quantization
from .reader import CONFIG_NAME, PROGRESS_MIN_BYTES, Checkpoint, PathLike, TensorRef, read_config


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
        layout = scheme.layout
        checkpoint.refs, scheme = layout.model_names(model, layout.file_names(checkpoint.refs), scheme)
        plan = _plan_load(model, checkpoint, scheme, strict)
        tensors = _read_all(checkpoint, plan.needed, progress)
    _apply(model, plan, tensors)
    return model


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
    if isinstance(module, nn.Embedding) or (is_quantized_module(module) and hasattr(module, "embedding_dim")):
        return "embedding", {"": ((module.num_embeddings,), module.embedding_dim, False)}
    if is_linear(module) or isinstance(module, MetalLinear):
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
        names["biases"] = f"{path}.{scheme.layout.offsets}"
    for role, name in names.items():
        if name not in refs:
            raise ValueError(f"missing tensor {name!r}: {path} is quantized ({scheme.kind} checkpoint)")
    scales = refs[names["scales"]]
    if override:
        bits, group_size, mode = override
    elif scheme.infer_from_shapes and mode == "affine":  # as mlx-lm reads unlisted affine layers
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
    from ..quantize import matches_module_name

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
            override = scheme.overrides.get(name, False)  # a LayerFormat, None (kept float) or False (unlisted)
            if override is not False:
                quantized[part] = override is not None
            elif kind == "linear" and scheme.modules_to_not_convert is not None:
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
            parts[part] = _plan_part(name, shape, scheme.overrides.get(name, False), scheme, refs)
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
                if not is_linear(head):
                    raise ValueError(f"{key} is tied to quantized {embedding_of[ident].fqns[0]} but is not a Linear")
                tied_heads.append(([head_path], head, embedding_of[ident]))
        else:
            raise ValueError(f"missing tensor {rest[0]!r}: the model has it but the checkpoint does not")
    used = {name for layer in layers for name in layer.names} | {name for _, name, _ in groups}
    used |= covered
    # the model computes its non-persistent buffers; older transformers saved some (BERT's position_ids)
    used |= {f"{fqn}.{name}" if fqn else name for fqn, module in model.named_modules(remove_duplicate=False)
             for name in module._non_persistent_buffers_set}
    unexpected = sorted(set(refs) - used)
    if strict and unexpected:
        raise ValueError(f"unexpected tensors in the checkpoint (the model has no place for them): "
                         f"{listing([repr(name) for name in unexpected])}")
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
    show = total >= PROGRESS_MIN_BYTES if progress is None else progress
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
            new = embedding_class(old.num_embeddings, old.embedding_dim, padding_idx=old.padding_idx,
                                  embed_scale=embedding_class.scale_of(old), **fmt)
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

