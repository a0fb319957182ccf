"""Reading checkpoint directories: ``config.json`` (:func:`read_config`) and the safetensors tensors, single-file or
sharded, each known by name, dtype and shape and read on demand (:class:`Checkpoint`, :class:`TensorRef`)."""
from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional, Union

import torch

PathLike = Union[str, os.PathLike]

CONFIG_NAME = "config.json"
SINGLE_FILE = "model.safetensors"
INDEX_NAME = "model.safetensors.index.json"
PROGRESS_MIN_BYTES = 1 << 30  # reading and writing show a progress bar from 1 GiB on

DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "U16": torch.uint16, "U32": torch.uint32, "U64": torch.uint64, "BOOL": torch.bool,
    "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2,
}


def read_config(directory: PathLike) -> dict[str, Any]:
    """The parsed ``config.json`` of ``directory`` (errors name the file)."""
    path = Path(directory) / CONFIG_NAME
    if not Path(directory).is_dir():
        raise FileNotFoundError(f"{directory}: no such directory")
    if not path.is_file():
        raise FileNotFoundError(f"{path}: missing (every checkpoint directory needs a config.json)")
    try:
        with open(path, encoding="utf-8") as f:
            config = json.load(f)
    except json.JSONDecodeError as error:
        raise ValueError(f"{path}: not valid JSON ({error})") from None
    if not isinstance(config, dict):
        raise ValueError(f"{path}: expected a JSON object")
    return config


@dataclass
class TensorRef:
    """A tensor known by dtype and shape, read on demand."""

    dtype: torch.dtype
    shape: tuple[int, ...]
    load: Callable[[], torch.Tensor]
    where: str

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * self.dtype.itemsize


class Checkpoint:
    """The tensors of a safetensors directory: ``model.safetensors``, or shards listed by
    ``model.safetensors.index.json``, or (as mlx-lm globs) ``model*.safetensors``.

    Every header is parsed and checked against its file size on opening (a truncated file is an error that
    names it). Use as a context manager; ``refs`` maps each tensor name to a :class:`TensorRef`.
    """

    def __init__(self, directory: PathLike):
        try:
            from safetensors import SafetensorError, safe_open
        except ImportError:
            raise ImportError("reading checkpoints needs safetensors: pip install safetensors") from None

        self.directory = Path(directory)
        self._handles: dict[Path, Any] = {}
        self.refs: dict[str, TensorRef] = {}
        self.metadata: dict[Path, dict[str, str]] = {}
        index_path = self.directory / INDEX_NAME
        weight_map: Optional[dict[str, str]] = None
        if index_path.is_file():
            try:
                with open(index_path, encoding="utf-8") as f:
                    weight_map = json.load(f)["weight_map"]
            except (json.JSONDecodeError, KeyError, TypeError) as error:
                raise ValueError(f"{index_path}: not a safetensors index ({error!r})") from None
            files = sorted({self.directory / name for name in weight_map.values()})
        elif (self.directory / SINGLE_FILE).is_file():
            files = [self.directory / SINGLE_FILE]
        else:
            files = sorted(self.directory.glob("model*.safetensors"))
        if not files:
            raise FileNotFoundError(f"{self.directory}: no {SINGLE_FILE}, {INDEX_NAME} or model*.safetensors")
        try:
            for file in files:
                if not file.is_file():
                    raise FileNotFoundError(f"{file}: listed in {INDEX_NAME} but missing")
                try:
                    handle = safe_open(str(file), framework="pt")
                except SafetensorError as error:
                    raise ValueError(f"{file}: not a complete safetensors file ({error})") from None
                self._handles[file] = handle
                self.metadata[file] = handle.metadata() or {}
                for name in handle.keys():
                    if name in self.refs:
                        raise ValueError(f"tensor {name!r} is stored twice: in {self.refs[name].where} and {file}")
                    piece = handle.get_slice(name)
                    dtype = DTYPES.get(piece.get_dtype())
                    if dtype is None:
                        raise ValueError(f"{file}: tensor {name!r} has unsupported dtype {piece.get_dtype()}")
                    self.refs[name] = TensorRef(
                        dtype, tuple(piece.get_shape()), _loader(handle, name), str(file)
                    )
            for name, file_name in (weight_map or {}).items():
                ref = self.refs.get(name)
                if ref is None or Path(ref.where).name != file_name:
                    raise ValueError(f"{index_path}: tensor {name!r} is not in {file_name}")
        except BaseException:
            self.close()
            raise

    def close(self) -> None:
        self._handles.clear()

    def __enter__(self) -> "Checkpoint":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _loader(handle, name: str) -> Callable[[], torch.Tensor]:
    return lambda: handle.get_tensor(name)
