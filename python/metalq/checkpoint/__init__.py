"""Checkpoint I/O: quantized safetensors directories in transformers' Metal layout or mlx-lm's layout.

One format, two spellings. The packed tensors are MLX's exactly; a module is quantized when ``{path}.scales`` is
among the tensors.

- ``"metal"`` (:mod:`.metal`): ``{path}.weight`` uint32 (``{path}.qweight`` in transformers' main branch; read
  either way, written as the installed transformers spells it), ``{path}.scales``, ``{path}.qbiases``;
  ``config.json`` carries ``quantization_config`` as :meth:`MetalConfig.to_dict` writes it (one bits/group_size for
  every layer, ``modules_to_not_convert`` listing every float ``nn.Linear``, so transformers skips exactly those).
- In MLX's floating-point modes (``mode`` ``"mxfp4"``, ``"nvfp4"``, ``"mxfp8"``) ``scales`` is uint8 and there
  are no offsets; ``mode`` is recorded in the config (absent means ``"affine"``).
- ``"mlx"`` (:mod:`.mlx`): the offsets are named ``{path}.biases``; ``config.json`` carries mlx-lm's
  ``quantization`` block (``group_size``, ``bits``, ``mode`` plus per-path overrides) and an identical
  ``quantization_config``; the safetensors metadata is ``{"format": "mlx"}``. ``mlx_lm.load`` reads these
  directories.

Each layout is one module implementing :class:`.layout.Layout`, listed in :func:`.layout.layouts`; around them
:mod:`.reader` and :mod:`.writer` read and stream safetensors directories, :mod:`.save` and :mod:`.convert` write
checkpoints from a model or from another checkpoint, and :mod:`.planner` loads one into a model. GGUF files
(:mod:`.gguf`, llama.cpp's block types mapped by :mod:`.gguf_blocks`) are read through the same planner.
"""
from ..ops import affine_quantize  # noqa: F401  (save quantizes through this name: tests replace it here)
from .convert import convert_checkpoint
from .gguf import GGUFTensor, load_gguf, load_gguf_into, read_gguf
from .layout import LayerFormat, Scheme, checkpoint_kind, quantized_model_config, read_quantization
from .metal import transformers_default_skips
from .planner import load_quantized
from .reader import CONFIG_NAME, Checkpoint, TensorRef, read_config
from .save import save_quantized
from .writer import (  # noqa: F401  (write_checkpoint writes files through _write_safetensors: tests replace it here)
    DEFAULT_MAX_SHARD_SIZE,
    Entry,
    _write_safetensors,
    atomic_directory,
    parse_size,
    write_checkpoint,
    write_json,
)

__all__ = [
    "CONFIG_NAME",
    "DEFAULT_MAX_SHARD_SIZE",
    "Checkpoint",
    "Entry",
    "GGUFTensor",
    "LayerFormat",
    "Scheme",
    "TensorRef",
    "atomic_directory",
    "checkpoint_kind",
    "convert_checkpoint",
    "load_gguf",
    "load_gguf_into",
    "load_quantized",
    "parse_size",
    "quantized_model_config",
    "read_config",
    "read_gguf",
    "read_quantization",
    "save_quantized",
    "transformers_default_skips",
    "write_checkpoint",
    "write_json",
]
