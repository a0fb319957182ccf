"""GGUF files (llama.cpp, Ollama, LM Studio) loaded quantized: llama.cpp's block types as metalq layers, no float copy.

Each GGUF tensor of a type that is an affine group format (:mod:`.gguf_blocks`) becomes metalq's packed tensors
losslessly; F32 / F16 / BF16 tensors stay as they are. Architecture, config and tokenizer come from the file's
metadata through transformers' own GGUF support (its config mapping, tensor names and tensor processors), so
whatever transformers maps (Llama, Mistral, Qwen2, Qwen3, Gemma, ...) loads here; only its float weight path is
not used. Quantized tensors are converted one at a time from the memory-mapped file: a load holds the packed model
plus one tensor's temporaries.
"""
from __future__ import annotations

import os
import tempfile
import warnings
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional, Union

import numpy as np
import torch
from torch import nn

from ..ops import affine_dequantize, fp_dequantize, pack
from .gguf_blocks import FORMATS, decode_rows
from .layout import Scheme
from .planner import _apply, _plan_load, _read_all
from .reader import TensorRef

GGUF_SUFFIX = ".gguf"
FLOAT_TYPES = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16}
PathLike = Union[str, os.PathLike]


def _gguf():
    try:
        import gguf
    except ImportError:
        raise ImportError("reading GGUF files needs gguf-py: pip install gguf") from None
    return gguf


def open_gguf(path: PathLike):
    """gguf-py's reader over ``path`` (memory-mapped); a file that is not a complete GGUF file is a ``ValueError``."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such GGUF file")
    try:
        return _gguf().GGUFReader(str(path))
    except (ValueError, IndexError, OSError) as error:
        raise ValueError(f"{path}: not a complete GGUF file ({error})") from None


@dataclass(frozen=True)
class GGUFTensor:
    """One tensor of a GGUF file in metalq's format, shaped as PyTorch shapes it (``(rows, columns)`` for a matrix).

    For a quantized type: ``weight`` uint32 ``(rows, columns * bits / 32)`` (MLX's sequential LSB-first codes),
    ``scales`` ``(rows, columns / group_size)`` (float, or uint8 E8M0 in mode ``"mxfp4"``) and, in affine mode,
    ``biases`` of the same shape; ``dequantize()`` equals ``gguf.quants.dequantize`` value for value. For F32 / F16
    / BF16 (and types loaded with ``dequantize_unsupported=True``): ``weight`` is the float tensor, the rest None.
    """

    ggml_type: str
    weight: torch.Tensor
    scales: Optional[torch.Tensor] = None
    biases: Optional[torch.Tensor] = None
    bits: Optional[int] = None
    group_size: Optional[int] = None
    mode: str = "affine"

    @property
    def quantized(self) -> bool:
        return self.scales is not None

    def dequantize(self) -> torch.Tensor:
        """The float32 tensor."""
        if not self.quantized:
            return self.weight.float()
        if self.mode != "affine":
            return fp_dequantize(self.weight, self.scales, self.mode, dtype=torch.float32)
        return affine_dequantize(self.weight, self.scales.float(), self.biases.float(), self.group_size, self.bits)


class _Source:
    """One tensor of the file: its name, ggml type, PyTorch shape and raw bytes (a view of the memory map)."""

    def __init__(self, path: Path, tensor):
        self.path, self.name, self.kind = path, tensor.name, tensor.tensor_type.name
        self.shape = tuple(int(n) for n in reversed(tensor.shape))  # GGUF lists the innermost dimension first
        self.data = tensor.data

    @property
    def where(self) -> str:
        return f"{self.path}: tensor {self.name!r} ({self.kind}, shape {list(self.shape)})"

    def check(self, dequantize_unsupported: bool) -> None:
        if self.kind in FLOAT_TYPES or (dequantize_unsupported and self.kind not in FORMATS):
            return
        if self.kind not in FORMATS:
            raise ValueError(f"{self.where}: the ggml type {self.kind} has no metalq format (metalq reads "
                             f"{', '.join([*FORMATS, *FLOAT_TYPES])}); pass dequantize_unsupported=True to load such "
                             f"tensors dequantized to float")
        if len(self.shape) != 2:
            raise ValueError(f"{self.where}: quantized tensors of {len(self.shape)} dimensions are not supported "
                             f"(metalq loads GGUF matrices; pass dequantize_unsupported=True to load it as float)")

    @property
    def float_dtype(self) -> torch.dtype:
        """The dtype a float tensor keeps (types loaded dequantized become float32)."""
        return FLOAT_TYPES.get(self.kind, torch.float32)

    def read_float(self) -> np.ndarray:
        """The tensor as float numpy: F32 / F16 as stored, BF16 widened exactly, other types dequantized by gguf-py."""
        data = np.asarray(self.data)
        if self.kind == "BF16":  # bfloat16 is the top half of a float32
            return (data.view(np.uint16).astype(np.uint32) << 16).view(np.float32).reshape(self.shape)
        if self.kind in FLOAT_TYPES:
            return data.reshape(self.shape)
        gguf = _gguf()
        return gguf.quants.dequantize(data, gguf.GGMLQuantizationType[self.kind]).reshape(self.shape)

    def convert(self, rows_order: Optional[torch.Tensor] = None) -> GGUFTensor:
        """The tensor in metalq's format, its rows permuted by ``rows_order`` if given."""
        if self.kind not in FORMATS:
            tensor = torch.from_numpy(np.array(self.read_float(), copy=True)).to(self.float_dtype)
            return GGUFTensor(self.kind, tensor if rows_order is None else tensor[rows_order])
        spec = FORMATS[self.kind]
        rows, columns = self.shape
        # a copy of the bytes: the memory map is read-only, and torch tensors are writable
        codes, scales, biases = decode_rows(torch.from_numpy(np.array(self.data)), self.kind, rows, columns)
        if rows_order is not None:
            codes, scales = codes[rows_order], scales[rows_order]
            biases = None if biases is None else biases[rows_order]
        return GGUFTensor(self.kind, pack(codes, spec.bits), scales, biases, spec.bits, spec.group_size, spec.mode)


def _sources(reader, path: Path, dequantize_unsupported: bool) -> list[_Source]:
    """Every tensor of the file, checked: an unsupported one raises before anything is read; with
    ``dequantize_unsupported`` they are counted in one warning."""
    sources = [_Source(path, tensor) for tensor in reader.tensors]
    for source in sources:
        source.check(dequantize_unsupported)
    fallback = sorted({s.kind for s in sources if s.kind not in FORMATS and s.kind not in FLOAT_TYPES})
    if fallback:
        count = sum(s.kind in fallback for s in sources)
        warnings.warn(f"{path}: {count} tensor(s) of type {', '.join(fallback)} have no metalq format and are "
                      f"loaded dequantized to float (dequantize_unsupported=True)", stacklevel=3)
    return sources


def read_gguf(path: PathLike, *, dequantize_unsupported: bool = False) -> dict[str, GGUFTensor]:
    """Every tensor of a GGUF file in metalq's format, by its GGUF name; no model needed.

    For users who build their own modules: a quantized tensor's ``weight`` / ``scales`` / ``biases``,
    ``bits``, ``group_size`` and ``mode`` go straight to :func:`metalq.affine_qmm_t` or a
    :class:`metalq.MetalLinear`'s buffers. Names and row orders are the file's (llama.cpp permutes the rows
    of Llama's ``attn_q`` / ``attn_k``; :func:`metalq.load_gguf` undoes that for a transformers model).

    Args:
        path: the ``.gguf`` file.
        dequantize_unsupported: load tensors of types metalq has no format for (IQ*, TQ*, ...) dequantized to
            float32, with a warning that counts them, instead of raising ``ValueError`` naming the first.

    Example:
        >>> tensors = metalq.read_gguf("model-Q4_K_M.gguf")
        >>> q = tensors["blk.0.attn_v.weight"]         # Q6_K: bits 6, group_size 16, float32 scales
        >>> y = metalq.affine_qmm_t(x, q.weight, q.scales, q.biases, q.group_size, q.bits)
    """
    path = Path(path)
    return {source.name: source.convert() for source in _sources(open_gguf(path), path, dequantize_unsupported)}


# ---- a transformers model from a GGUF file ----------------------------------------------------------------------

class _Parts:
    """Converts a source tensor once for the refs that read its pieces (weight, scales, biases), and forgets the
    result when the last piece is taken, so that one converted tensor is alive at a time."""

    def __init__(self, convert: Callable[[], GGUFTensor], pieces: list[str]):
        self.convert, self.pieces, self.left, self.value = convert, pieces, set(pieces), None

    def loader(self, piece: str) -> Callable[[], torch.Tensor]:
        def load() -> torch.Tensor:
            if self.value is None:
                self.value, self.left = self.convert(), set(self.pieces)
            tensor = getattr(self.value, piece)
            self.left.discard(piece)
            if not self.left:
                self.value = None
            return tensor

        return load


def _row_order(processor, source: _Source, context: dict[str, Any]) -> Optional[torch.Tensor]:
    """The row permutation transformers' tensor processor applies to this tensor (llama.cpp permutes Llama's q/k
    rows), found by running the processor on the row indices; None when it keeps the order. A processor that does
    anything else to a quantized tensor is an error: its rows could not stay packed."""
    rows = source.shape[0]
    probe = np.arange(rows, dtype=np.float64).reshape(rows, 1)
    result = processor.process(weights=probe, name=source.name, **context)
    order = np.asarray(result.weights)
    if result.name != source.name or order.shape != probe.shape or not np.array_equal(np.sort(order[:, 0]),
                                                                                      probe[:, 0]):
        raise ValueError(f"{source.where}: transformers' {type(processor).__name__} changes this tensor beyond "
                         f"reordering its rows, so it cannot stay quantized (pass dequantize_unsupported=True?)")
    order = order[:, 0].astype(np.int64)
    return None if np.array_equal(order, probe[:, 0]) else torch.from_numpy(order)


class GGUFCheckpoint:
    """A GGUF file's tensors under ``model``'s names, as the load planner reads checkpoints: ``refs`` (mlx-lm's
    spelling: ``{path}.weight`` uint32, ``{path}.scales``, ``{path}.biases``) and ``formats``, each quantized
    layer's ``(bits, group_size, mode)``. Tensors the model has no place for (``rope_freqs``) are left out, as
    transformers' own GGUF loader leaves them."""

    def __init__(self, path: PathLike, model: nn.Module, dequantize_unsupported: bool = False):
        from transformers.modeling_gguf_pytorch_utils import (
            TENSOR_PROCESSORS, TensorProcessor, get_gguf_hf_weights_map, load_gguf_checkpoint, read_field,
        )

        self.path = Path(path)
        reader = open_gguf(self.path)
        sources = _sources(reader, self.path, dequantize_unsupported)
        parsed = load_gguf_checkpoint(str(self.path), return_tensors=False)  # metadata only
        architecture = read_field(reader, "general.architecture")[0]
        processor = TENSOR_PROCESSORS.get(architecture, TensorProcessor)(config=parsed["config"])
        names = get_gguf_hf_weights_map(model, processor)
        context = {"tensor_key_mapping": names, "parsed_parameters": parsed}
        self.refs: dict[str, TensorRef] = {}
        self.formats: dict[str, tuple[int, int, str]] = {}
        for source in sources:
            name = names.get(source.name)
            if name is None:
                continue
            if source.kind not in FORMATS:
                self.refs[name] = TensorRef(source.float_dtype, source.shape,
                                            self._float_loader(processor, source, context), source.where)
                continue
            spec = FORMATS[source.kind]
            if not name.endswith(".weight"):
                raise ValueError(f"{source.where}: a quantized tensor that is not a weight ({name})")
            layer = name[: -len(".weight")]
            order = _row_order(processor, source, context)
            rows, columns = source.shape
            groups = (rows, columns // spec.group_size)
            shapes = {"weight": (torch.uint32, (rows, columns * spec.bits // 32)), "scales": (spec.scales_dtype, groups)}
            if spec.mode == "affine":
                shapes["biases"] = (spec.scales_dtype, groups)
            parts = _Parts(lambda source=source, order=order: source.convert(order), list(shapes))
            for piece, (dtype, shape) in shapes.items():
                self.refs[f"{layer}.{piece}"] = TensorRef(dtype, shape, parts.loader(piece), source.where)
            self.formats[layer] = (spec.bits, spec.group_size, spec.mode)

    @staticmethod
    def _float_loader(processor, source: _Source, context: dict[str, Any]) -> Callable[[], torch.Tensor]:
        def load() -> torch.Tensor:
            # transformers' processors adjust float tensors too (Gemma's norms are stored as 1 + weight)
            result = processor.process(weights=source.read_float(), name=source.name, **context)
            return torch.from_numpy(np.array(result.weights, copy=True)).to(source.float_dtype)

        return load

    def close(self) -> None:
        self.refs = {}

    def __enter__(self) -> "GGUFCheckpoint":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def load_gguf_into(
    model: nn.Module, path: PathLike, *, dequantize_unsupported: bool = False, progress: Optional[bool] = None
) -> nn.Module:
    """Load a GGUF file into ``model`` (a transformers model of the file's architecture, on any device or ``meta``),
    swapping in metalq's layers for its quantized tensors; ``model`` is returned.

    As :func:`metalq.load_quantized`: every tensor is matched, checked and read before the model changes, so an
    error (a missing tensor, a shape the model does not have, an unsupported type) leaves it untouched.
    """
    with GGUFCheckpoint(path, model, dequantize_unsupported) as checkpoint:
        formats = Counter(checkpoint.formats.values())
        bits, group_size, mode = formats.most_common(1)[0][0] if formats else (4, 32, "affine")
        # every quantized layer is listed with its format; the refs are named as mlx-lm's layout names them
        scheme = Scheme("mlx", bits, group_size, dict(checkpoint.formats), mode=mode)
        plan = _plan_load(model, checkpoint, scheme, strict=True)
        tensors = _read_all(checkpoint, plan.needed, progress)
    _apply(model, plan, tensors)
    return model


def load_gguf(path: PathLike, **kwargs: Any) -> nn.Module:
    """A GGUF file (llama.cpp, Ollama, LM Studio) as a transformers model that runs quantized through metalq:
    :func:`metalq.transformers.from_pretrained` of the ``.gguf`` file, whose keyword arguments it takes
    (``dtype``, ``device``, ``model_class``, ``dequantize_unsupported``, ...).

    The architecture and config come from the file's metadata through transformers' GGUF support (the tokenizer
    too: ``transformers.AutoTokenizer.from_pretrained(folder, gguf_file=name)``); each tensor keeps its ggml
    type's codes (see :mod:`metalq.checkpoint.gguf_blocks` for the mapping), so no float weight is made.

    Example:
        >>> model = metalq.load_gguf("Qwen2.5-0.5B-Instruct-Q4_K_M.gguf")
        >>> tokenizer = AutoTokenizer.from_pretrained(".", gguf_file="Qwen2.5-0.5B-Instruct-Q4_K_M.gguf")
    """
    from ..transformers import from_pretrained

    path = Path(path)
    if path.suffix != GGUF_SUFFIX:
        raise ValueError(f"load_gguf: {path} is not a {GGUF_SUFFIX} file")
    return from_pretrained(path, **kwargs)


def convert_gguf(
    source: PathLike, destination: PathLike, *, to: str = "mlx", max_shard_size: Union[int, str] = "5GB",
    overwrite: bool = False, progress: Optional[bool] = None,
) -> Path:
    """A GGUF file as a quantized safetensors directory (``python -m metalq convert model.gguf out/``), the packed
    tensors unchanged, with ``config.json`` and the tokenizer files transformers builds from the file's metadata.

    A layout must hold every tensor's format: mlx-lm's reads affine group sizes 32-128 only (not the 16 of
    Q2_K / Q3_K / Q6_K), the Metal layout one format for every layer. A file neither holds (a Q4_K_M mix) is an
    error naming its types, before anything is loaded; :func:`load_gguf` reads such files directly.
    """
    from .layout import layout_named
    from .mlx import MLX_AFFINE_GROUP_SIZES
    from .save import save_quantized

    source = Path(source)
    layout_named(to)
    kinds = sorted({s.kind for s in _sources(open_gguf(source), source, False) if s.kind in FORMATS})
    mixed = len({(FORMATS[k].bits, FORMATS[k].group_size, FORMATS[k].mode) for k in kinds}) > 1
    small = [k for k in kinds if FORMATS[k].mode == "affine" and FORMATS[k].group_size not in MLX_AFFINE_GROUP_SIZES]
    problem = None
    if to == "mlx" and small:
        problem = (f"its {', '.join(small)} tensors have affine group size 16, which MLX cannot read (it reads "
                   f"{', '.join(map(str, MLX_AFFINE_GROUP_SIZES))})")
    elif to == "metal" and mixed:
        problem = f"it mixes {', '.join(kinds)}, and the Metal layout holds one format for every layer"
    if problem:
        other = "metal" if to == "mlx" else "mlx"
        fits = not (mixed if other == "metal" else small)
        raise ValueError(f"{source}: cannot convert to the {to} layout: {problem}. "
                         + (f"Convert with to={other!r}, or read" if fits else "No layout holds it; read")
                         + " the file directly with metalq.load_gguf")
    model = load_gguf(source, device="cpu")
    import transformers

    with tempfile.TemporaryDirectory() as folder:
        tokenizer = transformers.AutoTokenizer.from_pretrained(str(source.parent), gguf_file=source.name)
        files = tokenizer.save_pretrained(folder)
        return save_quantized(model, destination, format=to, max_shard_size=max_shard_size, overwrite=overwrite,
                              progress=True if progress is None else progress,
                              extra_files=[f for f in map(Path, files) if f.is_file()])
