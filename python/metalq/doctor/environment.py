"""The environment report of ``python -m metalq doctor``: versions, build, CPU kernels, threads, the
platform, the MPS state, the GPU and the kind of Metal library."""
from __future__ import annotations

import importlib.metadata
import os
import platform
import subprocess
import sys
from pathlib import Path

import torch

import metalq
from .. import _extension


def _metalq_version() -> str:
    try:
        return importlib.metadata.version("metalq")
    except importlib.metadata.PackageNotFoundError:
        return "unknown (not installed: a source checkout?)"


def _threads() -> str:
    info = torch.__config__.parallel_info().splitlines()
    openmp = [line.strip() for line in info if "OpenMP" in line or "omp_" in line]
    parts = [f"{torch.get_num_threads()} intra-op, {torch.get_num_interop_threads()} inter-op"] + openmp
    for var in ("OMP_NUM_THREADS", "METALQ_CPU_ISA"):
        if os.environ.get(var):
            parts.append(f"{var}={os.environ[var]}")
    return "; ".join(parts)


def mps_state() -> tuple[bool, str]:
    if torch.backends.mps.is_available():
        return True, "available"
    if not torch.backends.mps.is_built():
        return False, "not available (this torch is built without MPS)"
    return False, "not available (torch.backends.mps.is_available() is False: macOS < 14, or no Metal device)"


def _gpu_name() -> str:
    try:
        out = subprocess.run(["system_profiler", "SPDisplaysDataType"], capture_output=True, text=True,
                             timeout=10).stdout
    except (OSError, subprocess.SubprocessError):
        out = ""
    fields = dict(line.strip().split(": ", 1) for line in out.splitlines() if ": " in line)
    name = fields.get("Chipset Model")
    if not name:
        return "Apple GPU (MPS available)"
    cores = fields.get("Total Number of Cores")
    return f"{name}, {cores} GPU cores" if cores else name


_METAL_LIBRARY_KINDS = {
    "metallib": "prebuilt metallib (metalq.metallib beside metalq._C)",
    "sources": "embedded sources (each kernel compiled by Metal at its first use)",
    None: "n/a (no MPS backend in this build: not built on macOS)",
}


def _metal_library_kind() -> str:
    from .. import _build_info

    kind = _build_info.METAL_LIBRARY
    if kind == "metallib" and not (Path(metalq._C.__file__).parent / "metalq.metallib").is_file():
        return "prebuilt metallib, MISSING beside metalq._C: reinstall metalq"
    return _METAL_LIBRARY_KINDS.get(kind, f"unknown ({kind!r})")


def environment(mps: str) -> list[tuple[str, str]]:
    info = [
        ("metalq", f"{_metalq_version()} ({Path(metalq.__file__).parent})"),
        ("torch", torch.__version__),
        ("built against torch", _extension.built_torch_version()),
        ("python", f"{platform.python_version()} ({platform.python_implementation()}, {sys.executable})"),
        ("platform", f"{platform.platform()} ({platform.machine()})"),
        ("cpu kernels", metalq._C.cpu_kernel_isa()),
        ("threads", _threads()),
    ]
    if sys.platform == "darwin":
        release, _, machine = platform.mac_ver()
        note = "  << an x86-64 Python (Rosetta): MPS needs an arm64 one" if machine == "x86_64" else ""
        info.append(("macOS", f"{release} ({machine}){note}"))
        info.append(("gpu", _gpu_name() if torch.backends.mps.is_available() else "n/a (MPS not available)"))
    info.append(("mps", mps))
    info.append(("metal library", _metal_library_kind()))
    return info
