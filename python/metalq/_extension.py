"""Loads metalq._C, the compiled extension, once it is known to match the torch imported.

A C++ extension works only with the torch release it was compiled against. pip's build isolation
builds metalq against the newest torch it can get, which may not be the user's: without this check
that shows up as an undefined-symbol error, or a crash.
"""
import torch

_REBUILD = ("Rebuild metalq against the installed torch: in metalq's source folder run "
            "`pip install --no-build-isolation --force-reinstall --no-deps .` "
            "(or install the torch metalq was built with: pip install torch=={built}).")


def _release(version: str) -> str:
    return version.split("+")[0]  # 2.14.1+cpu and 2.14.1 (CUDA) share the C++ ABI of their CPU part


def built_torch_version() -> str:
    """The torch version metalq._C was compiled against."""
    try:
        from ._build_info import TORCH_VERSION
    except ImportError:
        raise ImportError("metalq is not built: its _build_info.py, written by setup.py beside metalq._C, is missing. "
                          "Install metalq with `pip install --no-build-isolation .` in its source folder.") from None
    return TORCH_VERSION


def check_torch_version(built: str, running: str) -> None:
    """ImportError naming both versions when they are different releases."""
    if _release(built) != _release(running):
        raise ImportError(f"metalq was built against torch {built}, but torch {running} is installed. "
                          + _REBUILD.format(built=_release(built)))


def load():
    """Imports metalq._C (registering torch.ops.metalq.*) after the version check."""
    built = built_torch_version()
    check_torch_version(built, torch.__version__)
    try:
        from . import _C
    except (ImportError, OSError) as error:  # a same-release torch whose binary still differs
        raise ImportError(f"metalq._C (built against torch {built}) cannot be loaded with torch {torch.__version__}: "
                          f"{error}. " + _REBUILD.format(built=_release(built))) from error
    return _C
