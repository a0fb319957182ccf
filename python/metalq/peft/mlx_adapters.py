"""mlx-lm LoRA adapters on metalq models, both ways: load what ``mlx_lm.lora`` trained, save what mlx-lm loads.

An mlx-lm adapter directory holds ``adapters.safetensors`` (``<module>.lora_a`` of shape ``(in, r)`` and
``<module>.lora_b`` of shape ``(r, out)``) and ``adapter_config.json`` (``fine_tune_type``, ``num_layers``,
``lora_parameters`` with ``rank``, ``scale``, ``dropout`` and optional ``keys``). mlx-lm computes
``y = base(x) + scale * (dropout(x) @ lora_a) @ lora_b``: PEFT's ``lora.Linear`` with ``lora_A.weight = lora_a.T``,
``lora_B.weight = lora_b.T`` and ``scaling = lora_alpha / r = scale``.

Which layers get LoRA follows mlx-lm's rule: each key is a module name relative to a transformer block, applied
in the last ``num_layers`` blocks (``num_layers <= 0``: every block), or a module name in the whole model
(``lm_head``); without ``keys``, every linear layer found in the blocks. Module names are the transformers ones,
which mlx-lm's models (Llama, Qwen, Mistral, ...) share.

Example:
    >>> base = metalq.transformers.from_pretrained("Qwen2.5-0.5B-Instruct-4bit")    # the mlx_lm.lora --model
    >>> model = metalq.peft.load_mlx_adapter(base, "adapters")                     # mlx_lm.lora --adapter-path
    >>> ...                                                                        # or train in PyTorch, then
    >>> metalq.peft.save_mlx_adapter(model, "adapters-torch")   # mlx_lm.generate --adapter-path adapters-torch
"""
from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Any, Optional, Union

import torch
from peft.tuners.lora import Linear as LoraLinear
from peft.tuners.lora import LoraLayer
from safetensors.torch import load_file, save_file
from torch import nn

from ..checkpoint import atomic_directory, write_json
from .layers import quantized_linear_types

ADAPTER_WEIGHTS = "adapters.safetensors"  # mlx-lm's file names
ADAPTER_CONFIG = "adapter_config.json"
_FACTOR = re.compile(r"^(?P<module>.+)\.lora_(?P<side>[ab])$")

__all__ = ["load_mlx_adapter", "save_mlx_adapter"]


# ---- mlx-lm's rule for which layers get LoRA, in the PyTorch model's names ---------------------------------------

def _lora_sites(model: nn.Module) -> dict[str, nn.Module]:
    """The layers both mlx-lm and metalq put LoRA on, by name: linear layers, float or quantized, but an output head
    tied to the input embedding (mlx-lm has no such module: it multiplies by the embedding's table). A layer PEFT
    already wrapped counts as its base layer."""
    embedding = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    tied = getattr(embedding, "weight", None)
    kinds = (nn.Linear,) + quantized_linear_types()
    sites, wrapped = {}, ()
    for name, module in model.named_modules():
        if wrapped and name.startswith(wrapped):
            continue  # PEFT's own modules inside a wrapper: its base layer and the factors
        base = module
        if isinstance(module, LoraLayer):
            base, wrapped = module.get_base_layer(), wrapped + (f"{name}.",)
        if isinstance(base, kinds) and (tied is None or getattr(base, "weight", None) is not tied):
            sites[name] = base
    return sites


def _blocks(model: nn.Module) -> tuple[str, int]:
    """The name and length of the decoder's block list, mlx-lm's ``model.layers``."""
    decoder = model.get_decoder() if hasattr(model, "get_decoder") else model
    blocks = getattr(decoder, "layers", None)
    if not isinstance(blocks, nn.ModuleList):
        raise ValueError(f"metalq.peft: {type(model).__name__} has no decoder block list (get_decoder().layers), "
                         "which mlx-lm's num_layers counts from the end of")
    return next(name for name, module in model.named_modules() if module is blocks), len(blocks)


def _place(name: str, blocks: str) -> Optional[tuple[int, str]]:
    """``(block index, name inside the block)`` when ``name`` is inside a block, else None."""
    match = re.fullmatch(rf"{re.escape(blocks)}\.(\d+)\.(.+)", name)
    return (int(match[1]), match[2]) if match else None


def _select(sites: dict[str, nn.Module], blocks: str, count: int, num_layers: int,
            keys: Optional[list[str]]) -> dict[str, set[str]]:
    """mlx-lm's ``linear_to_lora_layers`` rule: for each key, the sites it puts LoRA on."""
    if keys is None:  # mlx-lm's default: every layer type it can wrap, found in any block
        keys = sorted({place[1] for place in (_place(name, blocks) for name in sites) if place})
    chosen = range(count - num_layers if num_layers > 0 else 0, count)  # mlx-lm slices layers[-max(num_layers, 0):]
    selection = {}
    for key in keys:
        # a key names a module inside each chosen block, and (mlx-lm's second pass) one of the whole model: lm_head
        selection[key] = ({f"{blocks}.{i}.{key}" for i in chosen} | {key}) & sites.keys()
    return selection


# ---- import -------------------------------------------------------------------------------------------------------

def _read_settings(path: Path) -> dict[str, Any]:
    """``rank``, ``scale``, ``dropout``, ``num_layers`` and ``keys`` of an mlx-lm ``adapter_config.json``, checked."""
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such file (an mlx_lm.lora --adapter-path directory has one)")
    config = json.loads(path.read_text())
    kind = config.get("fine_tune_type", "lora")  # mlx-lm's default when absent
    if kind == "dora":
        raise ValueError(f"{path}: fine_tune_type='dora' is not supported: metalq.peft loads plain LoRA (DoRA needs "
                         "the base weight in float at every step, which quantized layers do not keep)")
    if kind == "full":
        raise ValueError(f"{path}: fine_tune_type='full' saves whole layer weights, not LoRA factors: load them "
                         "as a checkpoint, not as an adapter")
    if kind != "lora":
        raise ValueError(f"{path}: fine_tune_type must be 'lora', got {kind!r}")
    parameters = config.get("lora_parameters")
    if not isinstance(parameters, dict):
        raise ValueError(f"{path}: lora_parameters must be an object with rank, scale and dropout")
    missing = [field for field in ("rank", "scale", "dropout") if field not in parameters]
    if missing:
        hint = " (mlx-lm spells lora_alpha / rank as 'scale')" if "alpha" in parameters else ""
        raise ValueError(f"{path}: lora_parameters has no {', '.join(missing)}{hint}")
    rank, num_layers, keys = parameters["rank"], config.get("num_layers"), parameters.get("keys")
    if not isinstance(rank, int) or isinstance(rank, bool) or rank < 1:
        raise ValueError(f"{path}: lora_parameters.rank must be a positive integer, got {rank!r}")
    for field in ("scale", "dropout"):
        if not isinstance(parameters[field], (int, float)) or isinstance(parameters[field], bool):
            raise ValueError(f"{path}: lora_parameters.{field} must be a number, got {parameters[field]!r}")
    if not isinstance(num_layers, int) or isinstance(num_layers, bool):
        raise ValueError(f"{path}: num_layers must be an integer (the last blocks that get LoRA), got {num_layers!r}")
    if keys is not None and not (isinstance(keys, list) and all(isinstance(key, str) for key in keys)):
        raise ValueError(f"{path}: lora_parameters.keys must be a list of module names, got {keys!r}")
    return dict(rank=rank, scale=float(parameters["scale"]), dropout=float(parameters["dropout"]),
                num_layers=num_layers, keys=keys)


def _read_factors(path: Path, sites: dict[str, nn.Module], targets: set[str], rank: int) -> dict[str, dict]:
    """The factors of ``adapters.safetensors`` in PEFT's layout, ``{module: {"A": (r, in), "B": (out, r)}}``;
    ``ValueError`` naming the first tensor that is not a factor of a targeted layer or does not fit it."""
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such file (an mlx_lm.lora --adapter-path directory has one)")
    factors: dict[str, dict] = {}
    for key, tensor in load_file(str(path)).items():
        match = _FACTOR.match(key)
        if match is None:
            raise ValueError(f"{path}: {key} is not a LoRA factor (mlx-lm names them <module>.lora_a and .lora_b)")
        name, side = match["module"], match["side"]
        if name not in targets:
            where = "a layer adapter_config.json's num_layers and keys put LoRA on" if name in sites else \
                "a linear layer of the model"
            raise ValueError(f"{path}: {key} is for {name!r}, which is not {where}")
        site = sites[name]
        # mlx-lm: lora_a is (input_dims, rank), lora_b (rank, output_dims)
        expected = (site.in_features, rank) if side == "a" else (rank, site.out_features)
        if tuple(tensor.shape) != expected:
            raise ValueError(f"{path}: {key} has shape {list(tensor.shape)}, but {name} with rank {rank} needs "
                             f"{list(expected)} (lora_a is (in_features, rank), lora_b (rank, out_features))")
        factors.setdefault(name, {})["A" if side == "a" else "B"] = tensor.T
    return factors


def load_mlx_adapter(
    model: nn.Module,
    adapter_dir: Union[str, os.PathLike],
    adapter_name: str = "default",
    is_trainable: bool = False,
):
    """Put an mlx-lm LoRA adapter (an ``mlx_lm.lora --adapter-path`` directory) on ``model``; returns a ``PeftModel``.

    ``model`` is the adapter's base in PyTorch, e.g. :func:`metalq.transformers.from_pretrained` of the directory
    given to ``mlx_lm.lora --model``. The ``LoraConfig`` comes from ``adapter_config.json``: ``r = rank``,
    ``lora_alpha = scale * rank``, ``lora_dropout = dropout`` and the layers mlx-lm's rule picks from ``num_layers``
    and ``lora_parameters.keys`` (see the module docstring); the model goes through
    :func:`metalq.peft.get_peft_model` and the factors are copied in, transposed to PEFT's layout. Targeted layers
    the file has no factors for keep ``lora_B = 0``, as mlx-lm leaves them.

    Everything is checked before the model changes: ``fine_tune_type`` other than ``"lora"``, a key naming no
    linear layer, ``num_layers`` above the block count, or a tensor that is not a factor of a targeted layer or
    does not fit it raise ``ValueError`` naming it, with ``model`` unchanged.

    Args:
        model: a transformers model (its decoder blocks are mlx-lm's ``model.layers``).
        adapter_dir: the directory with ``adapters.safetensors`` and ``adapter_config.json``.
        adapter_name: the PEFT adapter name.
        is_trainable: False (default) freezes the adapter and puts the model in eval mode, as
            ``PeftModel.from_pretrained``; True to train further.

    Example:
        >>> base = metalq.transformers.from_pretrained("mlx-model-4bit")
        >>> model = metalq.peft.load_mlx_adapter(base, "adapters")
        >>> logits = model(input_ids=ids).logits     # mlx_lm.load("mlx-model-4bit", adapter_path="adapters")'s
    """
    from peft import LoraConfig

    from . import get_peft_model  # the package imports this module: import it when called

    adapter_dir = Path(adapter_dir)
    settings = _read_settings(adapter_dir / ADAPTER_CONFIG)
    sites = _lora_sites(model)
    blocks, count = _blocks(model)
    if settings["num_layers"] > count:
        raise ValueError(f"{adapter_dir / ADAPTER_CONFIG}: num_layers={settings['num_layers']} but the model has "
                         f"{count} blocks: the adapter is for another base")
    selection = _select(sites, blocks, count, settings["num_layers"], settings["keys"])
    unmatched = [key for key, names in selection.items() if not names]
    if unmatched:
        raise ValueError(f"{adapter_dir / ADAPTER_CONFIG}: lora_parameters.keys {unmatched} name no linear layer of "
                         f"the model, neither inside the blocks num_layers={settings['num_layers']} picks nor in the "
                         "whole model")
    targets = set().union(*selection.values())
    if not targets:
        raise ValueError(f"{adapter_dir / ADAPTER_CONFIG}: num_layers and lora_parameters.keys put LoRA on no layer")
    factors = _read_factors(adapter_dir / ADAPTER_WEIGHTS, sites, targets, settings["rank"])

    config = LoraConfig(
        r=settings["rank"], lora_alpha=settings["scale"] * settings["rank"], lora_dropout=settings["dropout"],
        target_modules=sorted(targets), inference_mode=not is_trainable,
    )
    peft_model = get_peft_model(model, config, adapter_name=adapter_name)
    injected = peft_model.get_base_model()
    with torch.no_grad():
        for name, sides in factors.items():
            layer = injected.get_submodule(name)
            for side, tensor in sides.items():
                getattr(layer, f"lora_{side}")[adapter_name].weight.copy_(tensor)
    return peft_model if is_trainable else peft_model.eval()


# ---- export -------------------------------------------------------------------------------------------------------

# LoraConfig options that add something besides LoRA factors, which an mlx-lm adapter cannot hold
_NOT_LORA_FACTORS = {
    "modules_to_save": "trains whole copies of modules",
    "trainable_token_indices": "trains rows of the embedding",
    "layer_replication": "changes the base's block list",
}


def _mlx_rule(targets: set[str], sites: dict[str, nn.Module], blocks: str, count: int) -> tuple[int, list[str]]:
    """``num_layers`` and ``keys`` that make mlx-lm's rule pick exactly ``targets``: block-relative keys over the
    last blocks when ``targets`` are all of those, else every layer by its full name."""
    places = {name: _place(name, blocks) for name in targets}
    inside = [place for place in places.values() if place]
    outside = sorted(name for name, place in places.items() if place is None)
    if inside:
        num_layers = count - min(index for index, _ in inside)
        keys = sorted({key for _, key in inside}) + outside
        if set().union(*_select(sites, blocks, count, num_layers, keys).values()) == targets:
            return num_layers, keys
    # full names match only at mlx-lm's whole-model pass: num_layers does not matter then
    return count, sorted(targets)


def save_mlx_adapter(
    peft_model,
    directory: Union[str, os.PathLike],
    adapter_name: str = "default",
    *,
    overwrite: bool = False,
) -> Path:
    """Write a PEFT LoRA adapter as an mlx-lm adapter directory: ``adapters.safetensors`` + ``adapter_config.json``.

    ``mlx_lm.load(base, adapter_path=directory)`` (and ``mlx_lm.generate --adapter-path``) then computes what
    ``peft_model`` computes, for ``base`` the mlx-lm model of ``peft_model``'s base (the directory it was loaded from
    with :func:`metalq.transformers.from_pretrained`, or its ``metalq.save_quantized(format="mlx")`` output).
    ``num_layers`` and ``lora_parameters.keys`` are chosen so that mlx-lm's rule picks exactly the adapted layers.

    Only what mlx-lm's plain LoRA expresses is written; otherwise ``ValueError`` naming the option or layer, and
    nothing is written: a LoRA bias (``lora_bias``), DoRA or another LoRA variant, ranks or scalings that differ
    per layer (``rank_pattern``, ``alpha_pattern``), ``modules_to_save`` and the like, and LoRA on a layer mlx-lm
    cannot wrap (an embedding, a convolution, an output head tied to the embedding).

    Args:
        peft_model: a ``PeftModel`` over a transformers model (metalq-quantized or float).
        directory: the output directory; it appears only once complete.
        adapter_name: which of the model's adapters to write.
        overwrite: replace an existing ``directory``.

    Returns:
        The directory as a ``Path``.

    Example:
        >>> model = metalq.peft.get_peft_model(metalq.transformers.from_pretrained("mlx-model-4bit"),
        ...                                    peft.LoraConfig(r=8, target_modules=["q_proj", "v_proj"]))
        >>> ...  # train
        >>> metalq.peft.save_mlx_adapter(model, "adapters")
        >>> # mlx_lm.generate --model mlx-model-4bit --adapter-path adapters --prompt "Hello"
    """
    configs = getattr(peft_model, "peft_config", {})
    if adapter_name not in configs:
        raise ValueError(f"metalq.peft: peft_model has no adapter {adapter_name!r} (it has {sorted(configs)})")
    config = configs[adapter_name]
    for option, reason in _NOT_LORA_FACTORS.items():
        if getattr(config, option, None):
            raise ValueError(f"metalq.peft: adapter {adapter_name!r} sets {option}, which {reason}; an mlx-lm "
                             "adapter holds LoRA factors only")
    model = peft_model.get_base_model()
    layers = {name: module for name, module in model.named_modules()
              if isinstance(module, LoraLayer) and adapter_name in module.r}
    if not layers:
        raise ValueError(f"metalq.peft: adapter {adapter_name!r} has no LoRA layer")
    sites = _lora_sites(model)
    for name, layer in layers.items():
        if not isinstance(layer, LoraLinear) or name not in sites:
            raise ValueError(f"metalq.peft: adapter {adapter_name!r} puts LoRA on {name} "
                             f"({type(layer.get_base_layer()).__name__}); mlx-lm puts LoRA on linear layers only, "
                             "and not on an output head tied to the embedding")
        if adapter_name in layer.lora_variant:
            raise ValueError(f"metalq.peft: adapter {adapter_name!r} is a "
                             f"{type(layer.lora_variant[adapter_name]).__name__} on {name} (use_dora or another LoRA "
                             "variant); mlx-lm's fine_tune_type='lora' adapters hold plain LoRA")
        if layer.lora_bias[adapter_name]:
            raise ValueError(f"metalq.peft: adapter {adapter_name!r} has lora_bias=True; mlx-lm's LoRA has no bias")
    first = next(iter(layers.values()))
    rank, scale = first.r[adapter_name], first.scaling[adapter_name]
    for name, layer in layers.items():
        if layer.r[adapter_name] != rank:
            raise ValueError(f"metalq.peft: adapter {adapter_name!r} has rank {layer.r[adapter_name]} on {name} but "
                             f"{rank} elsewhere (rank_pattern); mlx-lm takes one rank for every layer")
        if layer.scaling[adapter_name] != scale:
            raise ValueError(f"metalq.peft: adapter {adapter_name!r} scales {name} by {layer.scaling[adapter_name]} "
                             f"but others by {scale} (alpha_pattern, rank_pattern); mlx-lm takes one scale")

    blocks, count = _blocks(model)
    num_layers, keys = _mlx_rule(set(layers), sites, blocks, count)
    tensors = {}
    for name, layer in layers.items():
        # PEFT's lora_A.weight is (r, in) and lora_B.weight (out, r); mlx-lm's lora_a (in, r) and lora_b (r, out)
        tensors[f"{name}.lora_a"] = layer.lora_A[adapter_name].weight.detach().T.contiguous().cpu()
        tensors[f"{name}.lora_b"] = layer.lora_B[adapter_name].weight.detach().T.contiguous().cpu()
    settings = {
        "fine_tune_type": "lora",
        "num_layers": num_layers,
        "lora_parameters": {"rank": rank, "scale": float(scale), "dropout": float(config.lora_dropout), "keys": keys},
    }
    with atomic_directory(directory, overwrite=overwrite) as tmp:
        save_file(tensors, str(tmp / ADAPTER_WEIGHTS))
        write_json(tmp / ADAPTER_CONFIG, settings)
    return Path(directory)
