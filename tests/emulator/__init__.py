"""Runs the project's Metal kernels on the CPU with Metal's execution model (test infrastructure).

A .metal file is preprocessed, rewritten (rewrite.py) and compiled as C++ by clang-19 against the
shim include/msl_emu.h, where Metal address spaces are clang address spaces, half/bfloat round after
every operation and device-memory accesses are traced. The result is linked with runtime.cpp (one
fiber per Metal thread) into a shared library, cached by content hash, and driven through ctypes.
Before that, check() runs the conformance pass (rewrite.py's kernel-signature and statement checks,
then the rewritten file parsed in clang's C++ for OpenCL mode against conformance/msl_conformance.h),
so what Apple's compiler rejects fails here too, with the .metal file and line.

Covered: kernels with [[buffer]] / [[threadgroup]] / builtin parameters, template instantiation by
host name, scalar and vector types (constructors, swizzles, half literals), threadgroup memory
(static and dynamic, NaN-poisoned), threadgroup_barrier, simd_sum/product/max/min, simd_shuffle(_up,
_down, _xor), simd_broadcast, simdgroup_barrier, simdgroup_matrix<T, 8, 8> load/store/multiply(_accumulate)
and the math used by metal/. Scheduling: between two threadgroup barriers each SIMD-group advances on
its own (SIMD-group functions synchronise the lanes of one SIMD-group only); order "forward" /
"reverse" runs each SIMD-group in turn (first to last / last to first) all the way to the next
barrier, "random" interleaves SIMD-groups step by step (seeded). Threadgroup memory is NaN-poisoned
at the start of every threadgroup. Errors (EmulatorError, naming the kernel): divergent barriers and
collectives, inactive-lane reads, a threadgroup over the pipeline's maxTotalThreadsPerThreadgroup
(thread_limit, at most 1024), setBytes payloads over 4 KB, more than 32 KiB of threadgroup memory
(static declarations plus setThreadgroupMemoryLength), misaligned accesses (a scalar or vector type
of 2..16 bytes on a multiple of its size, in device, constant and threadgroup memory), accesses just
outside a bound buffer.
Not covered: textures, atomics, function constants, quad and prefix/ballot SIMD functions, packed_*
and matrix types, `vec<T, N>(...)` constructors, struct copies out of device memory (a compile error
here, legal in MSL), fast-math numerics. Threadgroups run one after another on one OS thread.
"""
from __future__ import annotations

import ctypes
import dataclasses
import functools
import hashlib
import os
import shutil
import subprocess
import tempfile
from pathlib import Path

from .rewrite import RewriteError, rewrite

CLANG = os.environ.get("METALQ_EMULATOR_CLANG", "clang++-19")
HERE = Path(__file__).resolve().parent
CACHE = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "metalq-emulator"
ORDERS = {"forward": 0, "reverse": 1, "random": 2}
MAX_THREADS_PER_THREADGROUP = 1024  # Apple GPUs; a pipeline's maxTotalThreadsPerThreadgroup can be lower
SET_BYTES_LIMIT = 4096  # setBytes:length:atIndex: "for data smaller than 4 KB"

_CXXFLAGS = [
    "-std=c++17", "-O2", "-fPIC", "-fno-fast-math", "-ffp-contract=off",
    # half and bfloat round after every operation, as on the GPU
    "-Xclang", "-ffloat16-excess-precision=none", "-Xclang", "-fbfloat16-excess-precision=none",
    "-Wall", "-Wno-unknown-attributes", "-Wno-duplicate-decl-specifier", "-Wno-unused-function",
]
# Every load and store of kernel code calls the runtime, which counts those hitting a bound buffer.
# Its size is the accessed type's, which must be naturally aligned (runtime.cpp checks it), so no
# auto-vectorisation merges narrower accesses into wider ones.
_TRACE = ["-fsanitize-coverage=edge,trace-loads,trace-stores", "-fno-vectorize", "-fno-slp-vectorize"]
# The conformance pass: the rewritten file parsed again in clang's C++ for OpenCL mode, whose rules are
# Metal's where C++ is laxer (program-scope variables, static data members and static locals only in
# `constant`; no double, virtual functions, exceptions, new/delete, thread_local, typeid, register;
# C++ for OpenCL 2021 is C++17-based). x86-64 rather than spir64: that target has __bf16 (bfloat).
_CONFORMANCE = [
    "-cc1", "-x", "clcpp", "-cl-std=clc++2021", "-triple", "x86_64-unknown-linux-gnu", "-fsyntax-only",
    "-cl-ext=-__opencl_c_program_scope_global_variables,-__opencl_c_device_enqueue,-cl_khr_fp64,-__opencl_c_fp64",
    "-Wno-unknown-attributes", "-Wno-duplicate-decl-specifier",
]
# OpenCL's wording of a diagnostic -> Metal's.
_METAL_WORDING = [
    ("use of type 'double' requires cl_khr_fp64 and __opencl_c_fp64 support", "Metal has no type 'double'"),
    ("use of type 'long double' requires cl_khr_fp64 and __opencl_c_fp64 support", "Metal has no type 'long double'"),
    ("C++ for OpenCL version 2021", "Metal"),
    ("C++ for OpenCL", "Metal"),
    ("program scope variable must reside in constant address space",
     "program-scope variables (and static data members) must be in the constant address space"),
    ("static local variable must reside in constant address space",
     "static local variables must be in the constant address space"),
]


class BuildError(RuntimeError):
    """clang rejected a .metal file; the message holds its diagnostics (with .metal file:line)."""


class EmulatorError(RuntimeError):
    """A dispatch broke a Metal rule (divergent barrier, inactive-lane read, limits, ...)."""


@dataclasses.dataclass(frozen=True)
class Traffic:
    """Device-memory bytes of one buffer binding in one dispatch."""

    read: int
    written: int
    distinct_read: int
    distinct_written: int


def available() -> bool:
    return shutil.which(CLANG) is not None


def _run(cmd: list[str], cwd=None) -> str:
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=cwd)
    if proc.returncode:
        raise BuildError(proc.stderr)
    return proc.stdout


@functools.lru_cache(maxsize=None)
def _clang_version() -> str:
    return _run([CLANG, "--version"])


def _cached(name: str, key: str, build) -> Path:
    """CACHE/name-<hash of key>, built by build(tmp_path) on a miss and renamed atomically."""
    CACHE.mkdir(parents=True, exist_ok=True)
    path = CACHE / name.format(hashlib.sha256(key.encode()).hexdigest()[:20])
    if not path.exists():
        fd, tmp = tempfile.mkstemp(dir=CACHE, suffix=path.suffix)
        os.close(fd)
        try:
            build(tmp)
            os.replace(tmp, path)
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)
    return path


def _runtime_object() -> Path:
    source = HERE / "runtime.cpp"
    key = source.read_text() + (HERE / "include" / "msl_emu_abi.h").read_text() + _clang_version() + str(_CXXFLAGS)
    return _cached("runtime-{}.o", key, lambda out: _run(
        [CLANG, *_CXXFLAGS, "-I", str(HERE / "include"), "-c", str(source), "-o", out]))


def translate(metal: Path, include_dirs=()) -> str:
    """The C++ the emulator compiles for `metal`.

    Preprocessed from the file's own directory, so diagnostics name `file.metal:line` and the cache
    key does not depend on where the file lives.
    """
    return _rewrite(_preprocess(metal, include_dirs))


def _preprocess(metal: Path, include_dirs) -> str:
    metal = Path(metal).resolve()
    return _run(
        [CLANG, "-E", "-x", "c++", "-std=c++17", "-D__METAL__", "-D__METAL_VERSION__=310",
         "-I", str(HERE / "stub"), *(f"-I{Path(d).resolve()}" for d in include_dirs), metal.name], cwd=metal.parent)


def _rewrite(preprocessed: str, conformance: bool = False) -> str:
    try:
        return rewrite(preprocessed, conformance)
    except RewriteError as err:
        raise BuildError(str(err)) from None


def check(metal: Path, include_dirs=(), preprocessed: str | None = None) -> None:
    """The conformance pass (cached): raises BuildError, naming the .metal line, for what Apple's
    compiler rejects and the emulator's C++ build would accept."""
    if preprocessed is None:
        preprocessed = _preprocess(metal, include_dirs)
    source = _rewrite(preprocessed, conformance=True)
    header = HERE / "conformance" / "msl_conformance.h"

    def parse(out: str) -> None:
        cpp = Path(out).with_suffix(".cpp")
        cpp.write_text(source)
        try:
            proc = subprocess.run([CLANG, *_CONFORMANCE, "-I", str(header.parent), str(cpp)],
                                  capture_output=True, text=True)
        finally:
            cpp.unlink()
        if proc.returncode:
            message = proc.stderr
            for opencl, metal_words in _METAL_WORDING:
                message = message.replace(opencl, metal_words)
            raise BuildError(f"{Path(metal).name} is not valid Metal (conformance pass):\n{message}")

    _cached("conformance-{}.ok", source + header.read_text() + str(_CONFORMANCE) + _clang_version(), parse)


def build(metal: Path, include_dirs=()) -> Path:
    """Checks `metal` (check()) and compiles it into a kernel library (cached); raises BuildError
    with the diagnostics, which name the .metal file and line."""
    preprocessed = _preprocess(Path(metal), include_dirs)
    check(Path(metal), include_dirs, preprocessed)
    source = _rewrite(preprocessed)
    shim = "".join(p.read_text() for p in sorted((HERE / "include").iterdir()))
    runtime = _runtime_object()

    def compile_and_link(out: str) -> None:
        cpp = Path(out).with_suffix(".cpp")
        cpp.write_text(source)
        try:
            _run([CLANG, *_CXXFLAGS, *_TRACE, "-I", str(HERE / "include"), "-shared", "-Wl,-z,defs",
                  str(cpp), str(runtime), "-o", out])
        finally:
            cpp.unlink()

    return _cached(Path(metal).stem + "-{}.so", source + shim + str(runtime) + str(_TRACE), compile_and_link)


@functools.lru_cache(maxsize=None)
def load(metal: Path, include_dirs=()) -> "Library":
    return Library(build(Path(metal), include_dirs))


class Library:
    """A compiled kernel library: dispatches its kernels on CPU memory."""

    def __init__(self, path: Path):
        lib = ctypes.CDLL(str(path))
        lib.msl_emu_kernel_name.restype = ctypes.c_char_p
        lib.msl_emu_dispatch.restype = ctypes.c_int
        self._lib = lib
        self.kernels = frozenset(lib.msl_emu_kernel_name(i).decode() for i in range(lib.msl_emu_kernel_count()))

    def dispatch(self, kernel: str, threadgroups, threads_per_threadgroup, buffers: dict, threadgroup_memory=None,
                 order: str = "forward", seed: int = 0,
                 thread_limit: int = MAX_THREADS_PER_THREADGROUP) -> dict[int, Traffic]:
        """dispatchThreadgroups(threadgroups, threads_per_threadgroup) with buffers {index: tensor or bytes}.

        Tensors must be contiguous CPU tensors (used in place); bytes are copied as setBytes does
        (at most 4 KB each). thread_limit is the pipeline's maxTotalThreadsPerThreadgroup: a larger
        threadgroup is an error, as on the Mac. Returns the device-memory traffic of each buffer index.
        """
        if not 0 < thread_limit <= MAX_THREADS_PER_THREADGROUP:
            raise ValueError(f"thread_limit must be 1..{MAX_THREADS_PER_THREADGROUP}, got {thread_limit}")
        keep_alive, pointers, sizes = [], [], []
        for index, value in buffers.items():
            if isinstance(value, (bytes, bytearray)):
                if len(value) > SET_BYTES_LIMIT:
                    raise EmulatorError(f"{kernel}: setBytes payload for buffer({index}) is {len(value)} bytes; "
                                        f"Metal allows at most {SET_BYTES_LIMIT} (bind a buffer instead)")
                data = ctypes.create_string_buffer(bytes(value), len(value))
                keep_alive.append(data)
                pointers.append(ctypes.cast(data, ctypes.c_void_p))
                sizes.append(len(value))
            else:
                if not value.is_contiguous() or value.device.type != "cpu":
                    raise ValueError("the emulator binds contiguous CPU tensors")
                pointers.append(ctypes.c_void_p(value.data_ptr()))
                sizes.append(value.numel() * value.element_size())
        n = len(buffers)
        tg = threadgroup_memory or {}
        traffic = (ctypes.c_uint64 * (4 * n))()
        error = ctypes.create_string_buffer(1024)
        rc = self._lib.msl_emu_dispatch(
            kernel.encode(), (ctypes.c_uint32 * 3)(*threadgroups), (ctypes.c_uint32 * 3)(*threads_per_threadgroup),
            n, (ctypes.c_int * n)(*buffers), (ctypes.c_void_p * n)(*pointers), (ctypes.c_uint64 * n)(*sizes),
            len(tg), (ctypes.c_int * len(tg))(*tg), (ctypes.c_uint32 * len(tg))(*tg.values()),
            ctypes.c_uint32(thread_limit), ORDERS[order], ctypes.c_uint64(seed), traffic, error,
            ctypes.c_size_t(len(error)))
        if rc:
            raise EmulatorError(error.value.decode())
        return {index: Traffic(*traffic[4 * i:4 * i + 4]) for i, index in enumerate(buffers)}

    def run(self, plan: dict, order: str = "forward", seed: int = 0,
            thread_limit: int = MAX_THREADS_PER_THREADGROUP) -> dict[int, Traffic]:
        """Encodes a DispatchPlan (metalq._C.plan_*) exactly as the Mac encoder does and runs it: fitted
        to the pipeline's maxTotalThreadsPerThreadgroup (thread_limit) with metalq._C.fit_thread_limit,
        then dispatched on a pipeline with that limit."""
        import metalq  # the host side that plans dispatches; only plans need it

        plan = metalq._C.fit_thread_limit(plan, thread_limit)
        buffers = {index: tensor for index, tensor in plan["buffers"]}
        buffers.update({index: data for index, data in plan["bytes"]})
        return self.dispatch(plan["kernel"], plan["threadgroups"], plan["threads_per_threadgroup"], buffers,
                             dict(plan["threadgroup_memory"]), order, seed, thread_limit)
