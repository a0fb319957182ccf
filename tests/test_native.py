"""Builds the torch-free CPU kernels with CMake under ASan + UBSan and runs their native test."""
import os
import shutil
import subprocess
from pathlib import Path

from conftest import require

ROOT = Path(__file__).resolve().parents[1]


def test_cpu_kernels_under_sanitizers(tmp_path):
    require(shutil.which("cmake") is not None, "cmake")
    jobs = str(os.cpu_count() or 1)
    subprocess.run(["cmake", "-S", str(ROOT), "-B", str(tmp_path), "-DMETALQ_SANITIZE=ON"], check=True,
                   capture_output=True)
    subprocess.run(["cmake", "--build", str(tmp_path), "--target", "test_cpu_kernels", "-j", jobs], check=True,
                   capture_output=True)
    run = subprocess.run([str(tmp_path / "test_cpu_kernels")], capture_output=True, text=True)
    assert run.returncode == 0, run.stdout + run.stderr
    assert "0 failed" in run.stdout
