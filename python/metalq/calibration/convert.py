"""``python -m metalq convert --method gptq --calibration data.txt``: a float Hugging Face directory, loaded,
calibrated and written. Unlike the streaming conversion this holds the float model in memory."""
from __future__ import annotations

from pathlib import Path
from typing import Iterable, Optional

from ..checkpoint.convert import WEIGHT_SUFFIXES
from ..checkpoint.layout import layout_named
from ..checkpoint.reader import CONFIG_NAME, INDEX_NAME, PathLike, read_config
from ..checkpoint.save import save_quantized
from ..config import MetalConfig


def read_calibration_file(path: PathLike) -> list[str]:
    """The samples of a calibration text file: one per non-empty line."""
    texts = [line.strip() for line in Path(path).read_text(encoding="utf-8").splitlines() if line.strip()]
    if not texts:
        raise ValueError(f"calibration: {path} holds no text (one sample per non-empty line)")
    return texts


def convert_calibrated(source: PathLike, destination: PathLike, *, method: str, calibration: Optional[PathLike],
                       to: str = "metal", bits: Optional[int] = None, group_size: Optional[int] = None,
                       bpw: Optional[float] = None, skip: Optional[Iterable[str]] = None, embeddings: bool = False,
                       max_shard_size="5GB", overwrite: bool = False, progress: Optional[bool] = None) -> Path:
    """Load the float model of ``source`` with transformers (the class its ``config.json`` names) and its
    tokenizer, :func:`metalq.calibrate` it on the lines of ``calibration``, and write ``destination`` in
    layout ``to`` with the source's other files (tokenizer, generation config)."""
    import transformers

    from . import calibrate

    source = Path(source)
    config = read_config(source)
    if "quantization_config" in config or "quantization" in config:
        raise ValueError(f"{source} is already quantized; --method needs a float checkpoint")
    architectures = config.get("architectures") or []
    model_class = getattr(transformers, architectures[0], None) if architectures else None
    if model_class is None:
        raise ValueError(f"{source / CONFIG_NAME}: names no transformers class in 'architectures' ({architectures})")
    texts = read_calibration_file(calibration) if calibration is not None else None
    layout_named(to)
    model = model_class.from_pretrained(str(source), dtype="auto").eval()
    tokenizer = transformers.AutoTokenizer.from_pretrained(str(source))
    kept = layout_named(to).kept_float(model, skip)
    calibrate(model, MetalConfig(bits=bits, group_size=group_size, modules_to_not_convert=kept), texts,
              tokenizer=tokenizer, method=method, bpw=bpw, embeddings=embeddings)
    extra = [f for f in sorted(source.iterdir()) if f.is_file() and f.name not in (CONFIG_NAME, INDEX_NAME)
             and f.suffix not in WEIGHT_SUFFIXES]
    return save_quantized(model, destination, format=to, max_shard_size=max_shard_size, overwrite=overwrite,
                          progress=progress, extra_files=extra)
