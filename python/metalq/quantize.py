"""Whole-model conversion: ``nn.Linear`` <-> :class:`MetalLinear`, torchao-style and transformers-style."""
from __future__ import annotations

import warnings
from functools import partial
from typing import Callable, Iterable, Mapping, Optional, Union

from torch import nn
from tqdm.auto import tqdm

from .config import MetalConfig, axis_multiple
from .embedding import MetalEmbedding, MetalTiedHead
from .linear import MetalLinear
from .moe import MetalExperts, MetalSwitchLinear, expert_projections, require_affine

# ``quantize_``'s config: one MetalConfig for every layer, a mapping from module name (or pattern, or
# "_default") to a MetalConfig or None, or a callable ``(module, fqn) -> MetalConfig | None``.
ConfigSpec = Union[
    MetalConfig,
    Mapping[str, Optional[MetalConfig]],
    Callable[[nn.Linear, str], Optional[MetalConfig]],
]
DEFAULT_KEY = "_default"  # torchao's ModuleFqnToConfig spelling for "every other layer"
_PROGRESS_MIN_WEIGHTS = 1 << 27  # show a progress bar from ~130M weights on (seconds of work on CPU)


def matches_module_name(name: str, pattern: str) -> bool:
    """Whether ``pattern`` names module ``name``: exactly, as a prefix ending at a module boundary
    (``"model.layers.0"`` covers ``"model.layers.0.mlp.up_proj"`` but not ``"model.layers.01"``), or as a
    suffix starting at one (``"lm_head"`` covers ``"model.lm_head"``)."""
    pattern = pattern.strip(".")
    return name == pattern or name.startswith(pattern + ".") or name.endswith("." + pattern)


def _excluded(fqn: str, patterns: Optional[Iterable[str]]) -> bool:
    return any(matches_module_name(fqn, p) for p in patterns or ())


def quantize_(
    model: nn.Module,
    config: ConfigSpec = MetalConfig(),
    filter_fn: Optional[Callable[[nn.Module, str], bool]] = None,
    *,
    embeddings: bool = False,
) -> None:
    """Replace, in place, the ``nn.Linear`` layers of ``model`` by quantized :class:`MetalLinear` layers, and
    transformers' fused mixture-of-experts modules (3-D ``gate_up_proj``/``up_proj`` and ``down_proj``) by
    :class:`metalq.MetalExperts`.

    Args:
        model: any module; its Linear and fused experts submodules are converted (a bare Linear cannot be
            replaced in place: use :meth:`MetalLinear.from_linear`).
        config: a :class:`MetalConfig` for all layers; or per-layer overrides as a mapping from module name
            or pattern (matched like ``modules_to_not_convert``; first match wins, ``"_default"`` for the
            rest) to a MetalConfig or ``None`` (keep float); or a callable ``(module, fqn) -> MetalConfig | None``.
            Each config's ``modules_to_not_convert`` is honoured.
        filter_fn: ``(module, fqn) -> bool``; only layers for which it returns True are converted.
        embeddings: also convert ``nn.Embedding`` layers to :class:`MetalEmbedding` (quantized along
            ``embedding_dim``), choosing their configs the same way, as mlx-lm does. A Linear that shares
            its weight with a converted embedding (a tied output head) becomes a :class:`MetalTiedHead`
            reading the quantized table, so the tie survives.

    Layers whose ``in_features`` (for experts: any projection's) is not divisible by their ``group_size`` (for
    group size 16 at 1, 3 or 5 bits: by 32, whole uint32 words) stay float, named in one warning. Routers of MoE blocks are not ``nn.Linear`` in transformers and stay float.
    On error nothing is replaced: every layer is quantized before the first one is swapped in.

    Example:
        >>> metalq.quantize_(model, {"lm_head": MetalConfig(bits=8), "_default": MetalConfig(bits=4)})
    """
    config_for = _config_resolver(config)

    def choose(module: nn.Linear, fqn: str) -> Optional[MetalConfig]:
        if filter_fn is not None and not filter_fn(module, fqn):
            return None
        chosen = config_for(module, fqn)
        if chosen is not None and chosen.dequantize:
            raise ValueError("quantize_: MetalConfig(dequantize=True) is a loading option; use metalq.dequantize_")
        return chosen

    plan, misfits = _plan(model, _is_linear, choose, MetalLinear.from_linear, "quantize_")
    experts_plan, experts_misfits = _plan(model, _is_float_experts, choose, MetalExperts.from_experts, "quantize_")
    misfits += experts_misfits
    if embeddings:
        embedding_plan, embedding_misfits = _plan(
            model, _is_embedding, choose, MetalEmbedding.from_embedding, "quantize_"
        )
        misfits += embedding_misfits
        tables = {id(old.weight): _once(build) for _, old, build in embedding_plan}
        embedding_plan = [(fqns, old, tables[id(old.weight)]) for fqns, old, _ in embedding_plan]
        plan = [
            (fqns, old, partial(_tied_head, tables[id(old.weight)], old) if id(old.weight) in tables else build)
            for fqns, old, build in plan
        ] + embedding_plan
    _warn_misfits(misfits, "quantize_")
    _swap(model, plan + experts_plan, "quantize_")


def replace_with_metal_linear(
    model: nn.Module,
    modules_to_not_convert: Optional[Iterable[str]] = None,
    quantization_config: Union[MetalConfig, Mapping, None] = None,
    pre_quantized: bool = False,
) -> nn.Module:
    """transformers' ``replace_with_metal_linear``: swap every ``nn.Linear`` not excluded for a MetalLinear (and
    every fused experts module not excluded for a :class:`metalq.MetalExperts`).

    Args:
        model: the model, possibly on the meta device.
        modules_to_not_convert: names kept float, in addition to the config's own list.
        quantization_config: a :class:`MetalConfig` or its ``to_dict()`` form (default ``MetalConfig()``).
            With ``dequantize=True`` nothing is replaced.
        pre_quantized: True for layers ready to receive a Metal checkpoint (zero uint32 ``weight``,
            ``scales``/``qbiases`` in the layer's dtype, on the layer's device, so ``meta`` stays ``meta``);
            False to quantize the existing float weights.

    Returns:
        ``model``, modified in place.

    Example:
        >>> with torch.device("meta"):
        ...     model = build_model()
        >>> replace_with_metal_linear(model, quantization_config=config, pre_quantized=True)
        >>> model.load_state_dict(checkpoint, assign=True)
    """
    if quantization_config is None:
        quantization_config = MetalConfig()
    elif isinstance(quantization_config, Mapping):
        quantization_config = MetalConfig.from_dict(quantization_config)
    if quantization_config.dequantize:
        return model
    excluded = [*(modules_to_not_convert or ()), *(quantization_config.modules_to_not_convert or ())]

    def choose(module: nn.Linear, fqn: str) -> Optional[MetalConfig]:
        return None if _excluded(fqn, excluded) else quantization_config

    caller = "replace_with_metal_linear"
    plan, misfits = _plan(model, _is_linear, choose, _empty_metal_linear if pre_quantized else MetalLinear.from_linear,
                          caller)
    experts_plan, experts_misfits = _plan(
        model, _is_float_experts, choose, _empty_metal_experts if pre_quantized else MetalExperts.from_experts, caller
    )
    _warn_misfits(misfits + experts_misfits, caller)
    _swap(model, plan + experts_plan, caller)
    if not plan:
        warnings.warn("replace_with_metal_linear: no nn.Linear layer was converted", stacklevel=2)
    return model


def dequantize_(model: nn.Module) -> None:
    """Replace, in place, every :class:`MetalLinear` of ``model`` by the float ``nn.Linear`` it encodes (and
    every :class:`MetalEmbedding` by its ``nn.Embedding``, every :class:`metalq.MetalExperts` by its float experts
    module; a :class:`MetalTiedHead` becomes an ``nn.Linear`` sharing the dequantized embedding's weight)."""
    quantized = (MetalLinear, MetalEmbedding, MetalTiedHead, MetalExperts)
    targets = _find(model, lambda module, fqn: isinstance(module, quantized), "dequantize_")
    tables = {id(layer): _once(layer.dequantize) for _, layer in targets if isinstance(layer, MetalEmbedding)}
    plan = []
    for fqns, layer in targets:
        if isinstance(layer, MetalTiedHead):
            table = tables.get(id(layer.embedding)) or _once(layer.embedding.dequantize)
            plan.append((fqns, layer, partial(_untied_linear, table, layer)))
        else:
            plan.append((fqns, layer, tables.get(id(layer), layer.dequantize)))
    _swap(model, plan, "dequantize_")


# ---- internals --------------------------------------------------------------------------------------

def _config_resolver(config: ConfigSpec) -> Callable[[nn.Linear, str], Optional[MetalConfig]]:
    """Turn any accepted ``config`` into ``(module, fqn) -> MetalConfig | None``."""
    if isinstance(config, MetalConfig):
        by_layer = lambda module, fqn: config  # noqa: E731
    elif isinstance(config, Mapping):
        patterns = [(pattern, value) for pattern, value in config.items() if pattern != DEFAULT_KEY]
        default = config.get(DEFAULT_KEY)

        def by_layer(module, fqn):
            return next((value for pattern, value in patterns if matches_module_name(fqn, pattern)), default)

    elif callable(config):
        by_layer = config
    else:
        raise TypeError(f"quantize_: config must be a MetalConfig, a mapping or a callable, got {type(config)}")

    def resolve(module, fqn):
        chosen = by_layer(module, fqn)
        if chosen is not None and not isinstance(chosen, MetalConfig):
            raise TypeError(f"quantize_: the config for {fqn!r} must be a MetalConfig or None, got {type(chosen)}")
        return None if chosen is None or _excluded(fqn, chosen.modules_to_not_convert) else chosen

    return resolve


def _is_linear(module: nn.Module, fqn: str) -> bool:
    # MultiheadAttention reads out_proj.weight directly, so its out_proj cannot be swapped
    return isinstance(module, nn.Linear) and not isinstance(module, nn.modules.linear.NonDynamicallyQuantizableLinear)


def _find(model: nn.Module, predicate, caller: str) -> list[tuple[list[str], nn.Module]]:
    """Modules passing ``predicate``, each with every name it is reachable under (shared layers stay shared)."""
    found: dict[int, tuple[list[str], nn.Module]] = {}
    for fqn, module in model.named_modules(remove_duplicate=False):
        if predicate(module, fqn):
            if not fqn:
                raise ValueError(f"{caller}: the model itself is the layer to replace; convert it directly instead")
            found.setdefault(id(module), ([], module))[0].append(fqn)
    return list(found.values())


def _is_embedding(module: nn.Module, fqn: str) -> bool:
    return isinstance(module, nn.Embedding)


def _is_float_experts(module: nn.Module, fqn: str) -> bool:
    return not isinstance(module, MetalExperts) and expert_projections(module) is not None


def _input_features(layer: nn.Module) -> list[int]:
    """The lengths that are cut into groups when ``layer`` is quantized."""
    if isinstance(layer, nn.Embedding):
        return [layer.embedding_dim]
    shapes = expert_projections(layer)
    return [columns for _, _, columns in shapes.values()] if shapes is not None else [layer.in_features]


def _plan(model: nn.Module, predicate, choose, make, caller: str):
    """``(plan, misfits)``: ``(names, layer, build)`` for each layer passing ``predicate`` for which
    ``choose(module, fqn)`` gives a config, ``build() = make(layer, bits, group_size, mode)``."""
    plan, misfits = [], []
    for fqns, layer in _find(model, predicate, caller):
        config = choose(layer, fqns[0])
        if config is None:
            continue
        features = _input_features(layer)
        multiple = axis_multiple(config.bits, config.group_size)
        if any(n % multiple for n in features):
            shown = features[0] if len(features) == 1 else features
            words = "" if multiple == config.group_size else f", bits={config.bits}: a multiple of {multiple}"
            misfits.append(f"{fqns[0]} (in_features={shown}, group_size={config.group_size}{words})")
            continue
        plan.append((fqns, layer, partial(make, layer, config.bits, config.group_size, mode=config.mode)))
    return plan, misfits


def _warn_misfits(misfits: list[str], caller: str) -> None:
    if misfits:
        warnings.warn(
            f"{caller}: kept {len(misfits)} layer(s) in float because in_features is not divisible by "
            f"group_size (or does not fill whole uint32 words): {', '.join(misfits)}",
            stacklevel=4,
        )


def _once(build: Callable[[], nn.Module]) -> Callable[[], nn.Module]:
    """``build``, run at most once: a tied head and its embedding must share one quantized table."""
    built = []
    return lambda: built[0] if built else built.append(build()) or built[0]


def _tied_head(table: Callable[[], MetalEmbedding], linear: nn.Linear) -> MetalTiedHead:
    return MetalTiedHead(table(), linear.bias)


def _untied_linear(table: Callable[[], nn.Embedding], head: MetalTiedHead) -> nn.Linear:
    """The float Linear of a tied head, sharing its weight Parameter with the dequantized embedding."""
    embedding = table()
    linear = nn.Linear(head.in_features, head.out_features, bias=head.bias is not None, device="meta")
    linear.weight = embedding.weight
    if head.bias is not None:
        linear.bias = nn.Parameter(head.bias.detach().clone(), requires_grad=head.bias.requires_grad)
    return linear


def _swap(model: nn.Module, plan: list[tuple[list[str], nn.Module, Callable[[], nn.Module]]], caller: str) -> None:
    """Run each ``(names, old_layer, build)`` build first, then swap all results in: an error leaves ``model``
    untouched."""
    total_weights = sum(param.numel() for _, old, _ in plan for param in old.parameters())
    builds = tqdm(plan, desc=caller, unit="layer", leave=False, disable=total_weights < _PROGRESS_MIN_WEIGHTS)
    built = [(fqns, build()) for fqns, _, build in builds]
    for fqns, new in built:
        for fqn in fqns:
            model.set_submodule(fqn, new)


def _empty_metal_linear(linear: nn.Linear, bits: int, group_size: int, mode: str) -> MetalLinear:
    """A MetalLinear shell shaped like ``linear``, awaiting a pre-quantized checkpoint."""
    return MetalLinear(
        linear.in_features,
        linear.out_features,
        bias=linear.bias is not None,
        bits=bits,
        group_size=group_size,
        dtype=linear.weight.dtype,
        device=linear.weight.device,
        mode=mode,
    )


def _empty_metal_experts(experts: nn.Module, bits: int, group_size: int, mode: str = "affine") -> MetalExperts:
    """A MetalExperts shell shaped like ``experts``, awaiting a pre-quantized checkpoint."""
    require_affine("MetalExperts", mode)
    projections = {}
    for name, (count, rows, columns) in expert_projections(experts).items():
        like = experts._parameters[name]
        projections[name] = MetalSwitchLinear(
            count, columns, rows, bias=getattr(experts, f"{name}_bias", None) is not None, bits=bits,
            group_size=group_size, dtype=like.dtype, device=like.device,
        )
    return MetalExperts(experts, projections)
