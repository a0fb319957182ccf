"""`import metalq` checks that metalq._C was built against the torch being imported."""
import subprocess
import sys

import pytest
import torch

from metalq import _extension


def test_a_different_torch_release_is_an_import_error_naming_both():
    with pytest.raises(ImportError) as info:
        _extension.check_torch_version("2.14.1", "2.13.0+cpu")
    message = str(info.value)
    assert "built against torch 2.14.1" in message and "torch 2.13.0+cpu is installed" in message
    assert "pip install --no-build-isolation --force-reinstall --no-deps ." in message
    assert "pip install torch==2.14.1" in message


def test_builds_of_one_release_are_compatible():
    _extension.check_torch_version("2.14.1", "2.14.1+cpu")
    _extension.check_torch_version("2.13.0+cpu", "2.13.0")


def test_this_build_records_the_torch_it_runs_with():
    assert _extension.built_torch_version().split("+")[0] == torch.__version__.split("+")[0]


def _import_metalq_with(build_info: str) -> subprocess.CompletedProcess:
    # A fresh interpreter whose metalq._build_info says `build_info` (None: the file is missing).
    code = ("import sys, types\n"
            f"info = {build_info!r}\n"
            "if info is None:\n"
            "    sys.modules['metalq._build_info'] = None\n"
            "else:\n"
            "    module = types.ModuleType('metalq._build_info'); module.TORCH_VERSION = info\n"
            "    sys.modules['metalq._build_info'] = module\n"
            "import metalq\n")
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)


def test_import_fails_cleanly_for_a_build_of_another_torch():
    proc = _import_metalq_with("1.99.0")
    assert proc.returncode != 0
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("ImportError: metalq was built against torch 1.99.0")
    assert f"torch {torch.__version__} is installed" in last


def test_import_fails_cleanly_without_build_info():
    proc = _import_metalq_with(None)
    assert proc.returncode != 0 and "ImportError: metalq is not built" in proc.stderr
