"""transformers' Metal layout: ``quantization_config`` as :meth:`MetalConfig.to_dict` writes it (one format for every
layer, ``modules_to_not_convert`` listing every float ``nn.Linear``), offsets ``{path}.qbiases``, the packed matrix
spelled as the installed transformers spells it (``weight``, or ``qweight`` on its main branch; read either way),
the layers transformers keeps float by default, and what its own loader cannot read."""
from __future__ import annotations

import dataclasses
import warnings
from collections import Counter
from typing import Any, Iterable, Optional

from torch import nn

from ..config import QUANT_METHOD, TRANSFORMERS_METAL_BITS, MetalConfig
from ..linear import MetalLinear
from .layout import LayerFormat, Layout, Scheme, listing
from .reader import PathLike, TensorRef


class MetalLayout(Layout):
    name = "metal"
    offsets = "qbiases"
    declared_by = f"quant_method {QUANT_METHOD!r} (transformers' MetalConfig)"

    def claims(self, config: dict[str, Any]) -> bool:
        quantization_config = config.get("quantization_config")
        return isinstance(quantization_config, dict) and quantization_config.get("quant_method") == QUANT_METHOD

    def read_scheme(self, config: dict[str, Any], where: PathLike) -> Scheme:
        try:
            metal = MetalConfig.from_dict(config["quantization_config"])
        except (TypeError, ValueError) as error:
            raise ValueError(f"{where}: quantization_config: {error}") from None
        return Scheme("metal", metal.bits, metal.group_size, {}, tuple(metal.modules_to_not_convert or ()),
                      metal.mode)

    def config_entries(
        self, layers: dict[str, LayerFormat], float_linears: list[str], config: Optional[MetalConfig]
    ) -> dict[str, Any]:
        most_common = Counter(layers.values()).most_common(1)[0][0]
        chosen = (config.bits, config.group_size, config.mode) if config is not None else most_common
        for path, layer in layers.items():
            if layer != chosen:
                raise ValueError(
                    f"{path} has {_describe(layer)} but the Metal format holds one format for all layers "
                    f"({_describe(chosen)}); use the mlx format (format='mlx', --to mlx)"
                )
        bits, group_size, mode = chosen
        metal = MetalConfig(bits=bits, group_size=group_size, modules_to_not_convert=float_linears, mode=mode)
        return {"quantization_config": metal.to_dict()}

    def kept_float(self, model: nn.Module, modules_to_not_convert: Optional[Iterable[str]]) -> list[str]:
        """transformers' default (:func:`transformers_default_skips`) for ``None``, and always the model's
        :func:`_always_float` modules, which transformers would not load quantized."""
        chosen = transformers_default_skips(model) if modules_to_not_convert is None else list(modules_to_not_convert)
        return [*chosen, *_always_float(model)]

    def packed_name(self) -> str:
        from ..transformers import packed_weight_name

        return packed_weight_name()

    def file_names(self, refs: dict[str, TensorRef]) -> dict[str, TensorRef]:
        """Each packed ``{path}.qweight`` (transformers' main branch) read as ``{path}.weight`` (transformers 5.24 and
        5.25, mlx-lm, and metalq's modules)."""
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

    def check_output(self, caller: str, model: Optional[nn.Module], layers: dict[str, LayerFormat]) -> None:
        reasons = _transformers_cannot_load(model, layers)
        if reasons:
            # stacklevel: past this method and the writer's output step, at the caller of save_quantized / convert
            warnings.warn(f"{caller}: transformers' own loader cannot read this Metal checkpoint: "
                          f"{'; '.join(reasons)}. metalq.transformers.from_pretrained loads it.", stacklevel=4)


LAYOUT = MetalLayout()


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


def _transformers_cannot_load(model: Optional[nn.Module], layers: dict[str, LayerFormat]) -> list[str]:
    """Why transformers' own loader (its ``MetalConfig`` and ``MetalLinear``) cannot read a Metal directory holding
    ``layers`` (one format), or ``[]``. Without ``model`` the kinds of the quantized modules are unknown."""
    from ..quantize import matches_module_name

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
        reasons.append(f"quantized modules that are not nn.Linear layers: {listing(named)} (it quantizes nn.Linear "
                       f"layers only)")
    # a float Linear sharing a quantized table's weight, or a MetalTiedHead reading the table
    weights = (getattr(modules[path], "weight", None) for path in others)
    tables = {id(weight) for weight in weights if weight is not None}
    heads = [fqn for fqn, module in modules.items()
             if fqn not in layers and id(getattr(getattr(module, "embedding", module), "weight", None)) in tables]
    if heads:
        reasons.append(f"an output head tied to a quantized embedding: {listing(heads)}")
    always_float = _always_float(model)
    kept = [path for path in sorted(linear) if any(matches_module_name(path, p) for p in always_float)]
    if kept:
        reasons.append(f"quantized layers it always keeps float (the model's _keep_in_fp32_modules): {listing(kept)}")
    return reasons


def _describe(layer: LayerFormat) -> str:
    bits, group_size, mode = layer
    return f"bits={bits}, group_size={group_size}" + ("" if mode == "affine" else f", mode={mode}")
