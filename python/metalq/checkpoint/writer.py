"""Writing checkpoint directories: output tensors announced up front and produced one at a time (:class:`Entry`),
streamed into safetensors shards (:func:`write_checkpoint`) inside a temporary sibling directory that is renamed
into place at the end (:func:`atomic_directory`), so that an interrupted write leaves no output directory."""
from __future__ import annotations

import contextlib
import json
import math
import os
import re
import shutil
import struct
import uuid
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator, Optional, Union

import torch
from tqdm.auto import tqdm

from .layout import layout_named
from .reader import CONFIG_NAME, DTYPES, INDEX_NAME, PROGRESS_MIN_BYTES, SINGLE_FILE, PathLike

SHARD_NAME = "model-{:05d}-of-{:05d}.safetensors"
DEFAULT_MAX_SHARD_SIZE = 5 << 30  # as transformers' save_pretrained and mlx-lm's make_shards
_DTYPE_NAMES = {dtype: name for name, dtype in DTYPES.items()}


@dataclass
class Entry:
    """One output tensor: its name, dtype and shape up front (for the header), its data on demand."""

    name: str
    dtype: torch.dtype
    shape: tuple[int, ...]
    produce: Callable[[], torch.Tensor]

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * self.dtype.itemsize


@contextlib.contextmanager
def atomic_directory(directory: PathLike, overwrite: bool = False) -> Iterator[Path]:
    """Yield an empty temporary sibling of ``directory``; rename it to ``directory`` when the block succeeds,
    delete it when the block raises (``KeyboardInterrupt`` included)."""
    directory = Path(directory)
    if directory.exists() and not overwrite:
        raise FileExistsError(f"{directory}: already exists (pass overwrite=True / --overwrite to replace it)")
    if directory.exists() and not directory.is_dir():
        raise FileExistsError(f"{directory}: exists and is not a directory")
    directory.parent.mkdir(parents=True, exist_ok=True)
    token = uuid.uuid4().hex[:8]
    tmp = directory.parent / f".{directory.name}.tmp-{token}"
    tmp.mkdir()
    try:
        yield tmp
        if directory.exists():  # overwrite: swap, then drop the old directory
            old = directory.parent / f".{directory.name}.old-{token}"
            directory.rename(old)
            tmp.rename(directory)
            shutil.rmtree(old, ignore_errors=True)
        else:
            tmp.rename(directory)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def write_checkpoint(
    directory: Path,
    entries: list[Entry],
    config: Optional[dict[str, Any]],
    format: str,
    max_shard_size: int = DEFAULT_MAX_SHARD_SIZE,
    progress: Optional[bool] = None,
) -> None:
    """Write ``entries`` as safetensors shards (and the index when there are several) plus ``config.json``, for
    layout ``format``."""
    # through the package, where tests replace the file writer to fail a write midway
    from . import _write_safetensors

    metadata = {"format": layout_named(format).safetensors_format}
    names = Counter(entry.name for entry in entries)
    duplicates = [name for name, count in names.items() if count > 1]
    if duplicates:
        raise ValueError(f"tensor names written twice: {duplicates}")
    shards: list[list[Entry]] = []
    size = 0
    for entry in entries:
        if not shards or (shards[-1] and size + entry.nbytes > max_shard_size):
            shards.append([])
            size = 0
        shards[-1].append(entry)
        size += entry.nbytes
    if not shards:
        shards.append([])
    total = sum(entry.nbytes for entry in entries)
    show = total >= PROGRESS_MIN_BYTES if progress is None else progress
    weight_map = {}
    with tqdm(total=total, unit="B", unit_scale=True, desc="writing", disable=not show) as bar:
        for i, shard in enumerate(shards):
            file_name = SINGLE_FILE if len(shards) == 1 else SHARD_NAME.format(i + 1, len(shards))
            _write_safetensors(directory / file_name, shard, metadata, bar)
            weight_map.update({entry.name: file_name for entry in shard})
    if len(shards) > 1:
        index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
        write_json(directory / INDEX_NAME, index)
    if config is not None:
        write_json(directory / CONFIG_NAME, config)


def write_json(path: Path, content: Any) -> None:
    """``content`` as indented JSON with a final newline, as transformers and mlx-lm write their files."""
    with open(path, "w", encoding="utf-8") as f:
        json.dump(content, f, indent=2)
        f.write("\n")


def _write_safetensors(path: Path, entries: list[Entry], metadata: dict[str, str], bar) -> None:
    """safetensors: u64 header length, JSON header (padded to 8 bytes), then the tensors back to back."""
    header: dict[str, Any] = {"__metadata__": metadata}
    offset = 0
    for entry in entries:
        dtype = _DTYPE_NAMES.get(entry.dtype)
        if dtype is None:
            raise ValueError(f"tensor {entry.name!r}: dtype {entry.dtype} cannot be stored in safetensors")
        end = offset + entry.nbytes
        header[entry.name] = {"dtype": dtype, "shape": list(entry.shape), "data_offsets": [offset, end]}
        offset += entry.nbytes
    encoded = json.dumps(header, separators=(",", ":")).encode()
    encoded += b" " * (-len(encoded) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(encoded)))
        f.write(encoded)
        for entry in entries:
            tensor = entry.produce()
            if tensor.dtype != entry.dtype or tuple(tensor.shape) != entry.shape:
                raise RuntimeError(
                    f"tensor {entry.name!r}: produced {tensor.dtype} {tuple(tensor.shape)}, "
                    f"announced {entry.dtype} {entry.shape}"
                )
            if tensor.numel():
                data = tensor.detach().to("cpu").contiguous().reshape(-1).view(torch.uint8)
                f.write(memoryview(data.numpy()))
            bar.update(entry.nbytes)
            del tensor
        f.flush()
        os.fsync(f.fileno())


def parse_size(size: Union[int, str]) -> int:
    """Bytes from an int or a string such as ``"500MB"``, ``"2GB"`` or ``"1GiB"``."""
    if isinstance(size, bool):
        raise ValueError(f"max_shard_size: expected bytes or a size such as '2GB', got {size!r}")
    if isinstance(size, int):
        value = size
    else:
        match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]?)(i?)B?\s*", str(size), re.IGNORECASE)
        if not match:
            raise ValueError(f"max_shard_size: expected bytes or a size such as '2GB', got {size!r}")
        number, prefix, binary = match.groups()
        base = 1024 if binary else 1000
        value = int(float(number) * base ** " KMGT".index(prefix.upper() or " "))
    if value <= 0:
        raise ValueError(f"max_shard_size must be positive, got {size!r}")
    return value
