"""Supported formats (mirrors metal/params.h and metal/fp_format.h) and MetalConfig."""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Optional, Sequence

SUPPORTED_BITS = (1, 2, 3, 4, 5, 6, 8)
TRANSFORMERS_METAL_BITS = (2, 4, 8)  # what transformers' own MetalConfig accepts
# 16 is a metalq extension beyond MLX's affine group sizes (llama.cpp's k-quants scale every 16 weights):
# MLX and mlx-lm cannot read it.
SUPPORTED_GROUP_SIZES = (16, 32, 64, 128)
DEFAULT_BITS = 4
DEFAULT_GROUP_SIZE = 64

QUANT_METHOD = "metal"  # transformers' QuantizationMethod.METAL

# MLX's quantization modes with mlx-lm's (group_size, bits) defaults; the floating-point modes allow
# only theirs: mxfp4 (E2M1 values, E8M0 scales), nvfp4 (E2M1, E4M3 scales), mxfp8 (E4M3, E8M0 scales).
MODE_DEFAULTS = {"affine": (DEFAULT_GROUP_SIZE, DEFAULT_BITS), "mxfp4": (32, 4), "nvfp4": (16, 4), "mxfp8": (32, 8)}
SUPPORTED_MODES = tuple(MODE_DEFAULTS)


def check_format(owner: str, bits: int, group_size: int, mode: str = "affine") -> None:
    """Raise ``ValueError`` unless ``bits`` and ``group_size`` are supported in ``mode`` (MLX's wording for the
    floating-point modes)."""
    if mode not in MODE_DEFAULTS:
        raise ValueError(f"{owner}: Invalid quantization mode {mode!r}; the modes are {', '.join(SUPPORTED_MODES)}.")
    if mode != "affine":
        mode_group_size, mode_bits = MODE_DEFAULTS[mode]
        if bits != mode_bits or isinstance(bits, bool):
            raise ValueError(f"{owner}: {mode} quantization requires bits to be {mode_bits} but got {bits!r}.")
        if group_size != mode_group_size or isinstance(group_size, bool):
            raise ValueError(f"{owner}: {mode} quantization requires group size {mode_group_size} but got {group_size!r}.")
        return
    # bool is an int subclass; True would otherwise pass as bits=1
    if isinstance(bits, bool) or bits not in SUPPORTED_BITS:
        raise ValueError(f"{owner}: bits must be one of {SUPPORTED_BITS}, got {bits!r}")
    if isinstance(group_size, bool) or group_size not in SUPPORTED_GROUP_SIZES:
        raise ValueError(f"{owner}: group_size must be one of {SUPPORTED_GROUP_SIZES}, got {group_size!r}")


def axis_multiple(bits: int, group_size: int) -> int:
    """What the length of a quantized axis (``in_features``) must be a multiple of: whole groups that fill whole
    uint32 words. More than ``group_size`` only for group size 16 at 1, 3 or 5 bits (32)."""
    return math.lcm(group_size, 32 // math.gcd(bits, 32))


def resolve_format(owner: str, bits: Optional[int], group_size: Optional[int], mode: str = "affine") -> tuple[int, int]:
    """``(bits, group_size)`` with ``None`` replaced by ``mode``'s default, checked by :func:`check_format`."""
    if mode not in MODE_DEFAULTS:
        check_format(owner, bits, group_size, mode)  # raises: unknown mode
    default_group_size, default_bits = MODE_DEFAULTS[mode]
    bits = default_bits if bits is None else bits
    group_size = default_group_size if group_size is None else group_size
    check_format(owner, bits, group_size, mode)
    return bits, group_size


@dataclass(frozen=True)
class MetalConfig:
    """How to quantize ``nn.Linear`` layers; the ``quantization_config`` of transformers' Metal checkpoints.

    Args:
        bits: bits per weight, one of 1, 2, 3, 4, 5, 6, 8 (transformers itself accepts only 2, 4, 8); by
            default the mode's (4, or 8 for mxfp8).
        group_size: consecutive input features sharing one scale (and bias): 16, 32, 64 or 128 in affine mode
            (16 is metalq's extension, which MLX and mlx-lm cannot read);
            by default the mode's (64 affine, 32 mxfp4 / mxfp8, 16 nvfp4).
        modules_to_not_convert: module names left in float: a full name, a prefix ending at a module
            boundary (``"model.layers.0"``) or a suffix starting at one (``"lm_head"``). ``None`` (the default)
            keeps nothing float in :func:`metalq.quantize_`; when :func:`metalq.save_quantized` quantizes
            for the Metal layout it means transformers' default (the output head stays float), for the mlx
            layout mlx-lm's (nothing). Pass a list, ``[]`` included, to choose exactly.
        dequantize: when loading a Metal checkpoint, dequantize it to float layers instead. A loading
            option, as in transformers: it is not written by :meth:`to_dict`.
        mode: MLX's quantization mode: ``"affine"`` (scale and bias per group), or the floating-point
            ``"mxfp4"``, ``"nvfp4"``, ``"mxfp8"`` (one uint8 scale per group, fixed bits and group size).

    Example:
        >>> metalq.quantize_(model, MetalConfig(bits=4, group_size=64, modules_to_not_convert=["lm_head"]))
        >>> metalq.quantize_(model, MetalConfig(mode="mxfp4"))
    """

    bits: Optional[int] = None
    group_size: Optional[int] = None
    modules_to_not_convert: Optional[Sequence[str]] = None
    dequantize: bool = False
    mode: str = "affine"

    def __post_init__(self):
        bits, group_size = resolve_format("MetalConfig", self.bits, self.group_size, self.mode)
        object.__setattr__(self, "bits", bits)
        object.__setattr__(self, "group_size", group_size)
        names = self.modules_to_not_convert
        if isinstance(names, str):
            raise ValueError(f"MetalConfig: modules_to_not_convert must be a list of module names, got {names!r}")
        if names is not None:
            # a tuple keeps the frozen config hashable and immune to later edits of the caller's list
            object.__setattr__(self, "modules_to_not_convert", tuple(names))

    def to_dict(self) -> dict[str, Any]:
        """The ``quantization_config`` entry of a transformers ``config.json``; ``mode`` is written only when
        it is not ``"affine"`` (transformers' MetalConfig knows affine only and has no such key)."""
        names = self.modules_to_not_convert
        out = {
            "quant_method": QUANT_METHOD,
            "bits": self.bits,
            "group_size": self.group_size,
            "modules_to_not_convert": None if names is None else list(names),
        }
        if self.mode != "affine":
            out["mode"] = self.mode
        return out

    @classmethod
    def from_dict(cls, config: dict[str, Any], **loading_attributes) -> "MetalConfig":
        """Inverse of :meth:`to_dict`; ``loading_attributes`` (``dequantize=True``) come from the caller."""
        fields = dict(config)
        method = fields.pop("quant_method", QUANT_METHOD)
        if method != QUANT_METHOD:
            raise ValueError(f"MetalConfig.from_dict: quant_method must be {QUANT_METHOD!r}, got {method!r}")
        unknown = sorted(set(fields) - {"bits", "group_size", "modules_to_not_convert", "dequantize", "mode"})
        if unknown:
            raise ValueError(f"MetalConfig.from_dict: unknown keys {unknown}")
        return cls(**{**fields, **loading_attributes})
