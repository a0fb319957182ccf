"""What the checkpoint layouts share: the :class:`Layout` interface each format's module implements, the registry
(:func:`layouts`), the quantization a ``config.json`` declares (:class:`Scheme`, read by the layout that claims the
config) and which modules a checkpoint holds as quantized layers.

A layout's module subclasses :class:`Layout`, exports one instance as ``LAYOUT`` and is named in :func:`layouts`;
the planner, the writers and convert see formats only through these hooks and the :class:`Scheme` a layout reads.
"""
from __future__ import annotations

import abc
import functools
from dataclasses import dataclass
from typing import Any, Iterable, Optional

from torch import nn

from ..config import MetalConfig
from .reader import CONFIG_NAME, PathLike, TensorRef

# A quantized layer's format: (bits, group_size, mode).
LayerFormat = tuple[int, int, str]

# the config.json entries of every layout, dropped when a config is rewritten for another
QUANTIZATION_KEYS = ("quantization", "quantization_config")


@dataclass
class Scheme:
    """The quantization a ``config.json`` declares, as the rules the load planner applies.

    ``kind`` is the layout's name; ``bits``/``group_size``/``mode`` the defaults; ``overrides`` maps a module path
    to a :data:`LayerFormat` or ``None`` (kept float); ``modules_to_not_convert``, when not ``None``, means every
    ``nn.Linear`` matching none of these patterns is quantized (transformers' rule for the Metal layout; otherwise
    a layer is quantized when its ``scales`` are present); ``infer_from_shapes`` reads an unlisted affine layer's
    bits and group size from its tensors' shapes (mlx-lm's rule) instead of the defaults.
    """

    kind: str
    bits: int
    group_size: int
    overrides: dict[str, Optional[LayerFormat]]
    modules_to_not_convert: Optional[tuple[str, ...]] = None
    mode: str = "affine"
    infer_from_shapes: bool = False

    @property
    def layout(self) -> "Layout":
        return layouts()[self.kind]


class Layout(abc.ABC):
    """How one format spells quantized layers in its files and declares them in ``config.json``.

    The tensors between the hooks are named as metalq's modules name theirs (the packed matrix ``{path}.weight``);
    a quantized layer's offsets keep the name they were read with (any layout's ``offsets``) until written.
    """

    name: str  # what format= / --to take
    offsets: str  # the leaf of an affine layer's offsets tensor: "{path}.{offsets}"
    declared_by: str  # how config.json declares the layout, for the error naming what metalq reads
    safetensors_format = "pt"  # the "format" of the safetensors metadata

    @abc.abstractmethod
    def claims(self, config: dict[str, Any]) -> bool:
        """Whether ``config`` (a parsed ``config.json``) declares this layout."""

    @abc.abstractmethod
    def read_scheme(self, config: dict[str, Any], where: PathLike) -> Scheme:
        """The :class:`Scheme` of a ``config`` this layout claims (errors name ``where`` and the field)."""

    @abc.abstractmethod
    def config_entries(
        self, layers: dict[str, LayerFormat], float_linears: list[str], config: Optional[MetalConfig]
    ) -> dict[str, Any]:
        """The ``config.json`` entries declaring quantized ``layers`` (path -> format), the float ``nn.Linear``
        layers being ``float_linears``; ``config`` is the quantizing config, when the layers are quantized now."""

    def kept_float(self, model: nn.Module, modules_to_not_convert: Optional[Iterable[str]]) -> list[str]:
        """The module patterns a quantizing config keeps float, as the layout's own tool reads
        ``modules_to_not_convert`` (``None``: its default)."""
        return list(modules_to_not_convert or ())

    def packed_name(self) -> str:
        """The leaf the packed matrix is written under."""
        return "weight"

    def file_names(self, refs: dict[str, TensorRef]) -> dict[str, TensorRef]:
        """A checkpoint's tensors with the layout's own spellings read as metalq's."""
        return refs

    def model_names(
        self, model: nn.Module, refs: dict[str, TensorRef], scheme: Scheme
    ) -> tuple[dict[str, TensorRef], Scheme]:
        """The tensors (and the scheme's per-path entries) under ``model``'s module names, for loading."""
        return refs, scheme

    def write_names(
        self, model: nn.Module, refs: dict[str, TensorRef], layers: dict[str, LayerFormat]
    ) -> tuple[dict[str, TensorRef], dict[str, LayerFormat]]:
        """Inverse of :meth:`model_names` for saving ``model``: its tensors and layers under the layout's names."""
        return refs, layers

    def check_output(self, caller: str, model: Optional[nn.Module], layers: dict[str, LayerFormat]) -> None:
        """Raise when the layout cannot hold ``layers``; warn when its own tool cannot read them (``caller`` names
        :func:`save_quantized` or convert, whose caller the warning points at)."""


@functools.cache
def layouts() -> dict[str, Layout]:
    """Every layout by name, in the order a ``config.json`` is matched against them: an mlx-lm ``quantization``
    block first, as ``mlx_lm.load`` reads a directory that also has a ``quantization_config``."""
    from . import metal, mlx  # they import this module

    return {layout.name: layout for layout in (mlx.LAYOUT, metal.LAYOUT)}


def layout_named(format: str) -> Layout:
    """The layout called ``format``."""
    found = layouts().get(format)
    if found is None:
        raise ValueError(f"format must be one of {tuple(sorted(layouts()))}, got {format!r}")
    return found


def checkpoint_kind(config: dict[str, Any]) -> Optional[str]:
    """The layout a ``config.json`` declares (``"mlx"``, ``"metal"``), or ``None`` for an unquantized model; raises on
    a ``quantization_config`` no layout reads."""
    for layout in layouts().values():
        if layout.claims(config):
            return layout.name
    quantization_config = config.get("quantization_config")
    if quantization_config is None:
        return None
    if not isinstance(quantization_config, dict):
        raise ValueError(f"quantization_config must be an object, got {quantization_config!r}")
    readable = " and ".join(layout.declared_by for layout in layouts().values())
    raise ValueError(f"quantization_config.quant_method={quantization_config.get('quant_method')!r} is not supported: "
                     f"metalq reads {readable}")


def read_quantization(config: dict[str, Any], where: PathLike = CONFIG_NAME) -> Scheme:
    """Parse the quantization entries of a ``config.json`` into a :class:`Scheme` (errors name the field)."""
    try:
        kind = checkpoint_kind(config)
    except ValueError as error:
        raise ValueError(f"{where}: {error}") from None
    if kind is None:
        raise ValueError(f"{where}: no 'quantization_config' or 'quantization' entry: not a quantized checkpoint")
    return layouts()[kind].read_scheme(config, where)


def quantized_model_config(
    base: dict[str, Any],
    layers: dict[str, LayerFormat],
    format: str,
    float_linears: Iterable[str] = (),
    config: Optional[MetalConfig] = None,
) -> dict[str, Any]:
    """``base`` plus the quantization entries of layout ``format`` for quantized ``layers`` (path -> ``(bits,
    group_size, mode)``).

    ``"metal"`` requires one format for all layers (``config``'s when given) and writes ``quantization_config =
    MetalConfig.to_dict()`` with ``modules_to_not_convert`` the list of ``float_linears`` (never null, so that
    transformers skips exactly those and applies no default of its own); ``"mlx"`` writes mlx-lm's
    ``quantization`` block (the most common format, then per-path overrides) and an identical
    ``quantization_config``.
    """
    layout = layout_named(format)
    if not layers:
        raise ValueError("no quantized layer to describe")
    out = {key: value for key, value in base.items() if key not in QUANTIZATION_KEYS}
    return {**out, **layout.config_entries(layers, list(float_linears), config)}


# ---- the modules a checkpoint holds ------------------------------------------------------------------------

def is_linear(module: nn.Module) -> bool:
    """A plain ``nn.Linear`` (attention's out-projection subclass is part of ``nn.MultiheadAttention``)."""
    return isinstance(module, nn.Linear) and not isinstance(module, nn.modules.linear.NonDynamicallyQuantizableLinear)


def is_quantized_module(module: nn.Module) -> bool:
    """A metalq module holding packed tensors (linear, embedding, or experts projection)."""
    return "scales" in module._buffers and hasattr(module, "bits") and hasattr(module, "group_size")


def listing(names: list[str], limit: int = 5) -> str:
    """``names`` joined, the first ``limit`` of them shown."""
    more = f" and {len(names) - limit} more" if len(names) > limit else ""
    return ", ".join(names[:limit]) + more
