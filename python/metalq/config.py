"""Supported formats (mirrors metal/params.h) and MetalConfig."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional, Sequence

SUPPORTED_BITS = (1, 2, 3, 4, 5, 6, 8)
SUPPORTED_GROUP_SIZES = (32, 64, 128)
DEFAULT_BITS = 4
DEFAULT_GROUP_SIZE = 64

QUANT_METHOD = "metal"  # transformers' QuantizationMethod.METAL


def check_format(owner: str, bits: int, group_size: int) -> None:
    """Raise ``ValueError`` unless ``bits`` and ``group_size`` are in the supported sets."""
    # bool is an int subclass; True would otherwise pass as bits=1
    if isinstance(bits, bool) or bits not in SUPPORTED_BITS:
        raise ValueError(f"{owner}: bits must be one of {SUPPORTED_BITS}, got {bits!r}")
    if isinstance(group_size, bool) or group_size not in SUPPORTED_GROUP_SIZES:
        raise ValueError(f"{owner}: group_size must be one of {SUPPORTED_GROUP_SIZES}, got {group_size!r}")


@dataclass(frozen=True)
class MetalConfig:
    """How to quantize ``nn.Linear`` layers; the ``quantization_config`` of transformers' Metal checkpoints.

    Args:
        bits: bits per weight, one of 1, 2, 3, 4, 5, 6, 8 (transformers itself accepts only 2, 4, 8).
        group_size: consecutive input features sharing one (scale, bias) pair: 32, 64 or 128.
        modules_to_not_convert: module names left in float: a full name, a prefix ending at a module
            boundary (``"model.layers.0"``) or a suffix starting at one (``"lm_head"``).
        dequantize: when loading a Metal checkpoint, dequantize it to float layers instead. A loading
            option, as in transformers: it is not written by :meth:`to_dict`.

    Example:
        >>> metalq.quantize_(model, MetalConfig(bits=4, group_size=64, modules_to_not_convert=["lm_head"]))
    """

    bits: int = DEFAULT_BITS
    group_size: int = DEFAULT_GROUP_SIZE
    modules_to_not_convert: Optional[Sequence[str]] = None
    dequantize: bool = False

    def __post_init__(self):
        check_format("MetalConfig", self.bits, self.group_size)
        names = self.modules_to_not_convert
        if isinstance(names, str):
            raise ValueError(f"MetalConfig: modules_to_not_convert must be a list of module names, got {names!r}")
        if names is not None:
            # a tuple keeps the frozen config hashable and immune to later edits of the caller's list
            object.__setattr__(self, "modules_to_not_convert", tuple(names))

    def to_dict(self) -> dict[str, Any]:
        """The ``quantization_config`` entry of a transformers ``config.json``."""
        names = self.modules_to_not_convert
        return {
            "quant_method": QUANT_METHOD,
            "bits": self.bits,
            "group_size": self.group_size,
            "modules_to_not_convert": None if names is None else list(names),
        }

    @classmethod
    def from_dict(cls, config: dict[str, Any], **loading_attributes) -> "MetalConfig":
        """Inverse of :meth:`to_dict`; ``loading_attributes`` (``dequantize=True``) come from the caller."""
        fields = dict(config)
        method = fields.pop("quant_method", QUANT_METHOD)
        if method != QUANT_METHOD:
            raise ValueError(f"MetalConfig.from_dict: quant_method must be {QUANT_METHOD!r}, got {method!r}")
        unknown = sorted(set(fields) - {"bits", "group_size", "modules_to_not_convert", "dequantize"})
        if unknown:
            raise ValueError(f"MetalConfig.from_dict: unknown keys {unknown}")
        return cls(**{**fields, **loading_attributes})
