"""metalq: MLX-format low-bit quantized matmul for PyTorch (affine and mxfp4 / nvfp4 / mxfp8 modes).

Metal kernels on Apple-silicon GPUs (MPS) and fast vectorised kernels on CPU, for weights packed
exactly as MLX and transformers' ``MetalConfig`` pack them.
"""
import torch  # noqa: F401  (loads libtorch, which _C links against)

from ._extension import load as _load_extension

_C = _load_extension()  # registers torch.ops.metalq.*; ImportError if built for another torch
from .ops import (
    affine_dequantize,
    affine_gather_qmm,
    affine_qmm_n,
    affine_qmm_t,
    affine_quantize,
    fp_dequantize,
    fp_qmm_n,
    fp_qmm_t,
    fp_quantize,
    pack,
    quantized_matmul,
    unpack,
)
from .reference import reference_enabled, reference_ops
from .checkpoint import convert_checkpoint, load_gguf, load_quantized, read_gguf, save_quantized
from .config import MetalConfig
from .embedding import MetalEmbedding, MetalTiedHead
from .linear import MetalLinear
from .moe import MetalExperts, MetalSwitchLinear
from .quantize import dequantize_, quantize_, replace_with_metal_linear
from .calibration import calibrate

__all__ = [
    "affine_quantize",
    "affine_dequantize",
    "affine_qmm_t",
    "affine_qmm_n",
    "affine_gather_qmm",
    "fp_quantize",
    "fp_dequantize",
    "fp_qmm_t",
    "fp_qmm_n",
    "quantized_matmul",
    "pack",
    "unpack",
    "reference_ops",
    "reference_enabled",
    "MetalConfig",
    "MetalLinear",
    "MetalEmbedding",
    "MetalTiedHead",
    "MetalSwitchLinear",
    "MetalExperts",
    "quantize_",
    "calibrate",
    "dequantize_",
    "replace_with_metal_linear",
    "save_quantized",
    "load_quantized",
    "convert_checkpoint",
    "load_gguf",
    "read_gguf",
]
