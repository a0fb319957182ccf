"""Builds the torch-free CPU kernels with CMake and runs their native test (tests/native/test_cpu_kernels.cpp):
on the host under ASan + UBSan, and cross-compiled for aarch64 (the NEON path Apple CPUs run) under qemu-user,
whose generic-variant outputs must be bit-identical to the host build's (the --digest lines)."""
import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest

from conftest import require

ROOT = Path(__file__).resolve().parents[1]
AARCH64_TOOLCHAIN = ROOT / "tests" / "native" / "aarch64-toolchain.cmake"
JOBS = str(os.cpu_count() or 1)


def run(cmd, **kwargs):
    proc = subprocess.run([str(c) for c in cmd], capture_output=True, text=True, **kwargs)
    assert proc.returncode == 0, f"{' '.join(map(str, cmd))}\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    return proc


def build_test(build_dir: Path, *cmake_args) -> Path:
    run(["cmake", "-S", ROOT, "-B", build_dir, *cmake_args])
    run(["cmake", "--build", build_dir, "--target", "test_cpu_kernels", "-j", JOBS])
    return build_dir / "test_cpu_kernels"


def assert_passed(stdout: str):
    assert re.search(r"^\d+ passed, 0 failed$", stdout, re.MULTILINE), stdout[-3000:]


def digests(stdout: str):
    return [line for line in stdout.splitlines() if line.startswith("digest ")]


@pytest.fixture(scope="module")
def host_run(tmp_path_factory):
    """The host build under the sanitizers, run once with --digest for both tests."""
    require(shutil.which("cmake") is not None, "cmake")
    binary = build_test(tmp_path_factory.mktemp("native-host"), "-DMETALQ_SANITIZE=ON")
    return run([binary, "--digest"], timeout=600)


def test_cpu_kernels_under_sanitizers(host_run):
    assert_passed(host_run.stdout)
    assert digests(host_run.stdout)


def test_aarch64_build_under_qemu_is_bit_exact(tmp_path, request):
    require(shutil.which("cmake") is not None, "cmake")
    require(shutil.which("aarch64-linux-gnu-g++") is not None, "aarch64-linux-gnu-g++ (apt-get install g++-aarch64-linux-gnu)")
    require(shutil.which("qemu-aarch64") is not None, "qemu-aarch64 (apt-get install qemu-user)")
    binary = build_test(tmp_path, f"-DCMAKE_TOOLCHAIN_FILE={AARCH64_TOOLCHAIN}", "-DMETALQ_SANITIZE=OFF")
    arm = run(["qemu-aarch64", binary, "--digest"], timeout=600)
    assert_passed(arm.stdout)
    assert "kernels(): generic" in arm.stdout
    host = request.getfixturevalue("host_run")  # after the requires: no host build just to skip
    host_lines, arm_lines = digests(host.stdout), digests(arm.stdout)
    assert host_lines and len(host_lines) == len(arm_lines)
    differ = [(h, a) for h, a in zip(host_lines, arm_lines) if h != a]
    assert not differ, f"{len(differ)} of {len(host_lines)} cases differ, e.g.\nx86-64:  {differ[0][0]}\naarch64: {differ[0][1]}"
