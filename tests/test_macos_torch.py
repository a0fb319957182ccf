"""csrc/mps and setup.py's macOS branch against the real macOS arm64 wheels of the tested torch releases
(pyproject.toml, [tool.metalq] tested-torch): the Objective-C++ parses against each wheel's own
headers, every torch / c10 symbol it references is exported by that wheel's dylibs, and the OpenMP
flags give the OpenMP runtime the wheel ships.

Each wheel is downloaded from PyPI once and cached in ~/.cache/metalq/macos-torch (or
$METALQ_MACOS_TORCH_CACHE): its headers, the export lists of libtorch_cpu / libc10 / libomp and
libtorch_cpu's dylib dependencies. When PyPI cannot be reached the tests are skipped, saying so.
"""
import os
import re
import shutil
import subprocess
import sys
import tempfile
import tomllib
import zipfile
from pathlib import Path

import pytest

import emulator
from conftest import require
from mac_build import MM_CASE_IDS, MM_CASES, ROOT, compile_objcxx, generate_header, run_setup_py

VERSIONS = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["metalq"]["tested-torch"]
CACHE = Path(os.environ.get("METALQ_MACOS_TORCH_CACHE", Path.home() / ".cache" / "metalq" / "macos-torch"))
DYLIBS = ("libtorch_cpu.dylib", "libc10.dylib", "libomp.dylib")
LLVM_NM, LLVM_OBJDUMP, CXXFILT = "llvm-nm-19", "llvm-objdump-19", "llvm-cxxfilt-19"
# Demangled names of what torch's libraries define (symbols of libc++, the ObjC runtime, libdispatch
# and the Metal frameworks are resolved elsewhere).
TORCH_SYMBOL = re.compile(r"^(?:vtable for |typeinfo for |typeinfo name for |VTT for )?(?:at|c10|caffe2|torch)::")


def _tools():
    for tool in (emulator.CLANG, LLVM_NM, LLVM_OBJDUMP, CXXFILT):
        require(shutil.which(tool) is not None, f"{tool} (apt-get install clang-19 llvm-19)")
    return emulator.CLANG


def _lines(cmd, stdin: str | None = None) -> list[str]:
    return subprocess.run(cmd, input=stdin, capture_output=True, text=True, check=True).stdout.splitlines()


def _demangle(names) -> list[str]:
    return _lines([CXXFILT], stdin="\n".join(names) + "\n")


def _fetch(version: str) -> Path:
    """The cached extract of torch==version's macOS arm64 wheel, downloading it the first time."""
    folder = CACHE / version
    if (folder / "complete").is_file():
        return folder
    CACHE.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=CACHE) as tmp:
        tmp = Path(tmp)
        proc = subprocess.run(
            [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "--platform",
             "macosx_14_0_arm64", "--python-version", "3.11", f"torch=={version}", "-d", str(tmp / "wheel")],
            capture_output=True, text=True, timeout=1200)
        if proc.returncode:
            why = (proc.stderr.strip().splitlines() or ["no output"])[-1]
            pytest.skip(f"the macOS arm64 wheel of torch {version} cannot be downloaded from PyPI: {why}")
        (wheel,) = (tmp / "wheel").glob("*.whl")
        staging = tmp / "extract"
        with zipfile.ZipFile(wheel) as z:
            libs = {f"torch/lib/{name}" for name in DYLIBS}
            z.extractall(staging, [n for n in z.namelist() if n.startswith("torch/include/") or n in libs])
        lib = staging / "torch" / "lib"
        for name in DYLIBS:  # Mach-O exports carry a leading underscore
            exports = [s[1:] for s in _lines([LLVM_NM, "-gU", "--just-symbol-name", str(lib / name)])]
            (staging / f"{name}.exports").write_text("\n".join(exports) + "\n")
        deps = _lines([LLVM_OBJDUMP, "--macho", "--dylibs-used", str(lib / "libtorch_cpu.dylib")])
        (staging / "libtorch_cpu.dylib.deps").write_text("\n".join(deps) + "\n")
        shutil.rmtree(lib)  # libtorch_cpu alone is ~400 MB: keep its export list only
        (staging / "complete").touch()
        shutil.rmtree(folder, ignore_errors=True)
        staging.rename(folder)
    return folder


@pytest.fixture(scope="module", params=VERSIONS, ids=lambda v: f"torch{v}")
def macos_torch(request):
    _tools()
    return _fetch(request.param)


def _exports(folder: Path, *dylibs: str) -> set[str]:
    return {s for name in dylibs for s in (folder / f"{name}.exports").read_text().split()}


def _undefined(obj: Path) -> list[str]:
    return _lines([LLVM_NM, "-u", "--just-symbol-name", str(obj)])


def missing_torch_symbols(obj: Path, folder: Path) -> list[str]:
    """Demangled torch / c10 symbols that the object references and the wheel's dylibs do not export.

    The object is built on Linux, so two differences of the Mach-O ABI are allowed for: a thread_local
    variable that ELF code reads directly is reached on macOS through its exported TLS wrapper
    (_ZTW...), and int64_t is `long` on Linux but `long long` on macOS, so a symbol not found by its
    mangled name is looked up again by its demangled name with those spelled alike.
    """
    exports = _exports(folder, "libtorch_cpu.dylib", "libc10.dylib")
    names = _undefined(obj)
    demangled = _demangle(names)
    missing = [d for m, d in zip(names, demangled)
               if TORCH_SYMBOL.match(d) and m not in exports and "_ZTW" + m[2:] not in exports]
    if not missing:
        return []
    spelled = lambda name: name.replace("long long", "long")  # noqa: E731
    exported = {spelled(d) for d in _demangle(sorted(exports))}
    return [d for d in missing if spelled(d) not in exported]


@pytest.mark.parametrize("source, variant", MM_CASES, ids=MM_CASE_IDS)
def test_objective_cpp_parses_against_the_wheel_headers(macos_torch, tmp_path, source, variant):
    include = macos_torch / "torch" / "include"
    proc = compile_objcxx(_tools(), source, generate_header(tmp_path, variant), include)
    assert proc.returncode == 0, proc.stderr


@pytest.mark.parametrize("source, variant", MM_CASES, ids=MM_CASE_IDS)
def test_objective_cpp_uses_only_symbols_the_wheel_exports(macos_torch, tmp_path, source, variant):
    obj = tmp_path / "mps.o"
    include = macos_torch / "torch" / "include"
    proc = compile_objcxx(_tools(), source, generate_header(tmp_path, variant), include, output=obj)
    assert proc.returncode == 0, proc.stderr
    referenced = [s for s in _undefined(obj) if s.startswith(("_ZN2at", "_ZN3c10", "_ZNK3c10", "_ZN6caffe2"))]
    assert referenced, "the check must see torch symbols to mean anything"
    assert missing_torch_symbols(obj, macos_torch) == []


def test_the_symbol_check_catches_what_the_wheel_lacks(macos_torch, tmp_path):
    # torch 2.10 moved dispatch_sync_with_rethrow between namespaces: a reference to the other
    # spelling (or to anything the wheel lacks) must be reported.
    bad = tmp_path / "bad.mm"
    bad.write_text('#include "mps/library.h"\nnamespace at::mps { void metalq_not_exported(long); }\n'
                   "void f() { at::mps::metalq_not_exported(1); }\n")
    obj = tmp_path / "bad.o"
    proc = compile_objcxx(_tools(), bad, generate_header(tmp_path, "sources"), macos_torch / "torch" / "include",
                          output=obj)
    assert proc.returncode == 0, proc.stderr
    assert missing_torch_symbols(obj, macos_torch) == ["at::mps::metalq_not_exported(long)"]


def test_macos_openmp_flags_bind_to_the_libomp_torch_ships(macos_torch, monkeypatch, tmp_path):
    include = macos_torch / "torch" / "include"
    # The wheel's torch parallelises with OpenMP and ships its runtime, which libtorch_cpu loads.
    assert "#define AT_PARALLEL_OPENMP 1" in (include / "ATen" / "Config.h").read_text()
    assert (include / "omp.h").is_file()
    assert re.search(r"^\s*@(rpath|loader_path)/libomp\.dylib ", (macos_torch / "libtorch_cpu.dylib.deps").read_text(),
                     re.M)
    _, setup_py = run_setup_py(monkeypatch, "darwin")
    compile_flags, link_flags = setup_py["openmp_flags"]("darwin", str(include))
    assert link_flags == ["-Wl,-undefined,dynamic_lookup"]  # bound to the libomp libtorch_cpu loaded
    # A parallel loop compiled with those flags against the wheel's omp.h calls only OpenMP entry
    # points that the wheel's libomp exports, so they resolve to torch's runtime.
    loop = tmp_path / "loop.cpp"
    loop.write_text("#include <omp.h>\nvoid scale(float* x, long n) {\n#pragma omp parallel for\n"
                    "  for (long i = 0; i < n; ++i) x[i] *= float(omp_get_thread_num() + 1);\n}\n")
    obj = tmp_path / "loop.o"
    subprocess.run([_tools(), *compile_flags, "-isystem", str(include), "-O2", "-c", str(loop), "-o", str(obj)],
                   check=True)
    runtime = [s for s in _undefined(obj) if s.startswith(("__kmpc", "omp_"))]
    assert "__kmpc_fork_call" in runtime
    assert set(runtime) <= _exports(macos_torch, "libomp.dylib")
