"""Shared test helpers."""
import importlib.util
import os

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
