"""Shared test helpers."""
import importlib.util
import os
from pathlib import Path

import pytest


def require(condition: bool, what: str) -> None:
    """Skip when an optional oracle or tool is missing locally; in CI (env CI set) that is a failure."""
    if condition:
        return
    if os.environ.get("CI"):
        pytest.fail(f"{what} is required in CI but is not available")
    pytest.skip(f"{what} is not available")


def require_mlx():
    """Returns mlx.core, the independent oracle for the format and the numerics."""
    require(importlib.util.find_spec("mlx") is not None, "MLX (pip install 'mlx[cpu]')")
    import mlx.core as mx

    return mx


METAL_DIR = Path(__file__).resolve().parents[1] / "metal"


def metal_library(path: Path = METAL_DIR / "quantized.metal"):
    """A metal/ source compiled for the Metal emulator (cached by content), which needs clang-19."""
    import emulator

    require(emulator.available(), f"{emulator.CLANG} (apt-get install clang-19)")
    return emulator.load(path, (str(METAL_DIR),))


@pytest.fixture(scope="session")
def lib():
    """metal/quantized.metal on the Metal emulator."""
    return metal_library()
