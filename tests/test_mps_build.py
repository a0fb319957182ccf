"""The macOS build and MPS backend, checked on Linux as far as that is honest.

- tools/metal_library.py: the metallib build and its fallback to embedded sources on any Metal
  compiler failure (with a fake `xcrun`), the generated header (compiled and read back), and the
  embedded sources (every kernel of metal/, each compiling alone and running bit-exact in the emulator).
- setup.py: the flags of its macOS and Linux branches and the files it writes beside the extension.
- csrc/mps/*.mm: parsed by clang-19 as Objective-C++ with ARC and blocks, against the installed
  torch's headers and tests/objc_stubs (declarations of exactly the Apple symbols used), for both
  header variants; tests/test_macos_torch.py repeats that against the real macOS torch wheels.
  Not checked here: Apple's real headers, linking, and anything at run time (see benchmarks/bench_mps.py).
"""
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import emulator
import metalq
from conftest import require

from mac_build import (CLT_ERROR, METAL, MM_CASE_IDS, MM_CASES, ROOT, XCODE26_ERROR, FakeXcrun, compile_objcxx,
                       generate_header, metal_library, run_setup_py)

CLANG = emulator.CLANG
TORCH_INCLUDE = Path(torch.__file__).parent / "include"


def _clang():
    require(emulator.available(), f"{CLANG} (apt-get install clang-19)")
    return CLANG


# ---- metallib build and fallback decision ------------------------------------------------------

def test_with_compiler_one_metallib_is_built_for_the_minimum_macos(tmp_path):
    fake, messages = FakeXcrun(), []
    assert metal_library.generate(METAL, tmp_path, fake, messages.append) == "metallib"
    assert messages == []
    sources = sorted(METAL.glob("*.metal"))
    compiles = [c for c in fake.commands if "metal" in c]
    assert [Path(c[c.index("-c") + 1]) for c in compiles] == sources
    assert all({"-fno-fast-math", "-std=metal3.1", "-mmacosx-version-min=14.0"} <= set(c) for c in compiles)
    (link,) = [c for c in fake.commands if "metallib" in c]
    assert len([p for p in link if p.endswith(".air")]) == len(sources)
    text = (tmp_path / metal_library.HEADER_NAME).read_text()
    assert "kIsMetallib = true" in text and "kKernelCount = 0" in text
    package = tmp_path / "package"
    package.mkdir()
    installed = metal_library.install_metallib(tmp_path, package)
    assert installed == package / "metalq.metallib" and installed.read_bytes() == b"MTLBmetalq.metallib"


@pytest.mark.parametrize("error", [CLT_ERROR, XCODE26_ERROR], ids=["command-line-tools", "xcode26-no-toolchain"])
def test_without_compiler_the_sources_are_embedded_with_one_message(tmp_path, error):
    messages = []
    assert metal_library.generate(METAL, tmp_path, FakeXcrun(metal_error=error), messages.append) == "sources"
    assert len(messages) == 1 and error in messages[0] and "downloadComponent MetalToolchain" in messages[0]
    assert "kIsMetallib = false" in (tmp_path / metal_library.HEADER_NAME).read_text()


def test_no_xcrun_at_all_embeds_the_sources(tmp_path, monkeypatch):
    cpp = metal_library.preprocessor()
    cpp[0] = shutil.which(cpp[0])  # the preprocessor stays reachable; xcrun is on no PATH
    monkeypatch.setenv("PATH", str(tmp_path))
    messages = []
    assert metal_library.generate(METAL, tmp_path, log=messages.append, cpp=cpp) == "sources"
    assert len(messages) == 1 and "xcrun" in messages[0]


@pytest.mark.parametrize("fail_on", ["quantized.metal", "metallib"], ids=["kernel-compile-error", "link-error"])
def test_any_metal_build_failure_embeds_the_sources_with_its_first_diagnostics(tmp_path, fail_on):
    # Install must never fail because of Metal: a compiler that rejects metal/ falls back too.
    messages = []
    assert metal_library.generate(METAL, tmp_path, FakeXcrun(fail_on=fail_on), messages.append) == "sources"
    (message,) = messages
    assert "quantized.metal:1:1: error: boom" in message
    assert "kIsMetallib = false" in (tmp_path / metal_library.HEADER_NAME).read_text()


def test_diagnostics_are_cut_to_the_first_lines():
    error = metal_library.MetalBuildError(["metal"], "\n".join(f"line {i}" for i in range(100)))
    assert error.diagnostics.splitlines() == [f"line {i}" for i in range(metal_library.DIAGNOSTIC_LINES)]


def test_sources_can_be_forced_for_testing_that_path(tmp_path):
    fake, messages = FakeXcrun(), []
    assert metal_library.generate(METAL, tmp_path, fake, messages.append, force_sources=True) == "sources"
    assert fake.commands == [] and len(messages) == 1 and "METALQ_METAL_SOURCES=1" in messages[0]


def test_header_is_rewritten_only_when_it_changes(tmp_path):
    generate_header(tmp_path, "sources")
    header = tmp_path / metal_library.HEADER_NAME
    before = header.stat().st_mtime_ns
    generate_header(tmp_path, "sources")
    assert header.stat().st_mtime_ns == before


# ---- setup.py's branches ------------------------------------------------------------------------

def test_setup_py_on_macos_builds_the_mps_backend_with_openmp(monkeypatch, tmp_path):
    kw, _ = run_setup_py(monkeypatch, "darwin")
    (ext,) = kw["ext_modules"]
    cxx = ext.extra_compile_args["cxx"]
    assert {"csrc/mps/library.mm", "csrc/mps/quantized.mm"} <= set(ext.sources)
    assert "-fobjc-arc" in cxx and "-mmacosx-version-min=14.0" in cxx
    # The standard is torch's own choice (cpp_extension adds it only when none is given).
    assert not any(flag.startswith("-std") for flag in cxx)
    # This torch uses OpenMP (as the macOS wheels do, tests/test_macos_torch.py): Apple clang's spelling.
    assert cxx[cxx.index("-fopenmp") - 1] == "-Xpreprocessor"
    assert ext.extra_link_args == ["-Wl,-undefined,dynamic_lookup", "-framework", "Metal", "-framework", "Foundation"]
    # build_ext on this machine (no xcrun): the header with the sources, torch's build, _build_info.py.
    from torch.utils.cpp_extension import BuildExtension

    built = []
    monkeypatch.setattr(BuildExtension, "build_extensions", lambda self: built.append(self))
    cmd = object.__new__(kw["cmdclass"]["build_ext"])
    cmd.build_temp, cmd.extensions = str(tmp_path), [ext]
    cmd.get_ext_fullpath = lambda name: str(tmp_path / "lib" / "metalq" / "_C.so")
    (tmp_path / "lib" / "metalq").mkdir(parents=True)
    cmd.build_extensions()
    generated = tmp_path / "metalq_generated"
    assert built == [cmd] and str(generated) in ext.include_dirs
    assert "kIsMetallib = false" in (generated / metal_library.HEADER_NAME).read_text()
    info = {}
    exec((tmp_path / "lib" / "metalq" / "_build_info.py").read_text(), info)
    assert info["TORCH_VERSION"] == torch.__version__ and info["METAL_LIBRARY"] == "sources"


def test_setup_py_on_linux(monkeypatch):
    kw, _ = run_setup_py(monkeypatch, "linux")
    (ext,) = kw["ext_modules"]
    cxx = ext.extra_compile_args["cxx"]
    assert not any(s.endswith(".mm") for s in ext.sources)
    assert "-fobjc-arc" not in cxx and "-fopenmp" in cxx and ext.extra_link_args == ["-fopenmp"]
    assert not any(flag.startswith("-std") for flag in cxx)


def test_setup_py_keeps_the_generic_kernels_unfused_off_x86(monkeypatch):
    _, setup_py = run_setup_py(monkeypatch, "darwin")
    assert "-ffp-contract=off" in setup_py["_compile_args"]("darwin", "arm64")["cxx"]
    assert "-ffp-contract=off" in setup_py["_compile_args"]("linux", "aarch64")["cxx"]
    assert "-ffp-contract=off" not in setup_py["_compile_args"]("linux", "x86_64")["cxx"]


def test_setup_py_adds_no_openmp_for_a_torch_without_it(monkeypatch, tmp_path):
    _, setup_py = run_setup_py(monkeypatch, "linux")
    (tmp_path / "ATen").mkdir()
    (tmp_path / "ATen" / "Config.h").write_text("#define AT_PARALLEL_OPENMP 0\n#define AT_PARALLEL_NATIVE 1\n")
    assert setup_py["openmp_flags"]("darwin", str(tmp_path)) == ([], [])
    assert setup_py["openmp_flags"]("linux", str(tmp_path)) == ([], [])


# ---- the generated header and the embedded sources ---------------------------------------------

def _kernel_table(header: Path, tmp_path: Path):
    """The header compiled into a program that prints its kernel table: [(name, prelude, line)]."""
    clang = _clang()
    dump = tmp_path / "dump.cpp"
    dump.write_text('#include <cstdio>\n#include "metalq_metal_library.h"\n'
                    "using namespace metalq::metal_library;\n"
                    "int main() { for (size_t i = 0; i < kKernelCount; ++i)\n"
                    '  std::printf("%s\\t%d\\t%s\\n", kKernels[i].name, kKernels[i].prelude, '
                    "kKernels[i].instantiation); }\n")
    exe = tmp_path / "dump"
    subprocess.run([clang, "-std=c++17", "-Wall", "-Werror", "-I", str(header.parent), str(dump), "-o", str(exe)],
                   check=True)
    out = subprocess.run([str(exe)], capture_output=True, text=True, check=True).stdout
    return [tuple(line.split("\t")) for line in out.splitlines()]


def test_embedded_kernels_are_exactly_the_metallib_kernels(tmp_path, lib):
    gen = generate_header(tmp_path / "gen", "sources")
    table = _kernel_table(gen / metal_library.HEADER_NAME, tmp_path)
    names = [name for name, _, _ in table]
    assert names == sorted(names)  # the extension binary-searches them
    assert set(names) == lib.kernels  # the emulator's build of the whole metal/quantized.metal
    assert all(f'host_name("' in line and line.endswith(";") for _, _, line in table)


def _prelude(gen: Path, index: int) -> str:
    """kPreludes[index] of a generated header, read back through a compiled program."""
    clang = _clang()
    dump = gen / "prelude.cpp"
    dump.write_text('#include <cstdio>\n#include "metalq_metal_library.h"\n'
                    f"int main() {{ std::fputs(metalq::metal_library::kPreludes[{index}], stdout); }}\n")
    exe = gen / "prelude"
    subprocess.run([clang, "-std=c++17", "-I", str(gen), str(dump), "-o", str(exe)], check=True)
    return subprocess.run([str(exe)], capture_output=True, text=True, check=True).stdout


def test_an_embedded_kernel_compiles_alone_and_runs_bit_exact(tmp_path):
    # What the extension compiles at a kernel's first use: its prelude plus its instantiation line.
    gen = generate_header(tmp_path / "gen", "sources")
    table = {name: (int(p), line) for name, p, line in _kernel_table(gen / metal_library.HEADER_NAME, tmp_path)}
    prelude, line = table["affine_dequantize_half_gs_64_b_4"]
    source = _prelude(gen, prelude)
    assert '#include "' not in source and str(ROOT) not in source  # self-contained, no build-machine paths
    one = tmp_path / "one_kernel.metal"
    one.write_text(source + "\n" + line + "\n")
    kernel_lib = emulator.load(one)
    assert kernel_lib.kernels == {"affine_dequantize_half_gs_64_b_4"}
    g = torch.Generator().manual_seed(0)
    wq = torch.randint(0, 2**32, (4, 256 * 4 // 32), generator=g, dtype=torch.int64).to(torch.uint32)
    scales, biases = torch.randn(2, 4, 256 // 64, generator=g).to(torch.float16)
    out = torch.empty(4, 256, dtype=torch.float16)
    kernel_lib.run(metalq._C.plan_affine_dequantize(wq, scales, biases, out, 64, 4))
    assert torch.equal(out, torch.ops.metalq.affine_dequantize(wq, scales, biases, 64, 4))


# ---- Objective-C++ syntax check ---------------------------------------------------------------

@pytest.mark.parametrize("source, variant", MM_CASES, ids=MM_CASE_IDS)
def test_objective_cpp_parses_against_torch_and_sdk_stubs(tmp_path, source, variant):
    proc = compile_objcxx(_clang(), source, generate_header(tmp_path, variant), TORCH_INCLUDE)
    assert proc.returncode == 0, proc.stderr


def test_stubs_reject_what_the_mps_stream_owns(tmp_path):
    # The stubs declare no endEncoding/commit, so csrc/mps cannot call them (under ARC an unknown
    # selector is an error): this is that guard working.
    bad = tmp_path / "bad.mm"
    bad.write_text('#include "mps/library.h"\nvoid f(id<MTLComputeCommandEncoder> e) { [e endEncoding]; }\n')
    proc = compile_objcxx(_clang(), bad, generate_header(tmp_path, "sources"), TORCH_INCLUDE)
    assert proc.returncode != 0 and "endEncoding" in proc.stderr


# ---- on a Mac: the MPS backend at run time (skipped elsewhere) -----------------------------------

mac = pytest.mark.skipif(not torch.backends.mps.is_available(), reason="needs Apple silicon with PyTorch's MPS")
MPS_DTYPES = [torch.float32, torch.float16, torch.bfloat16]
MPS_TOLERANCE = {torch.float32: 1e-4, torch.float16: 3e-3, torch.bfloat16: 2e-2}


def _rel_err(got, ref):
    return float((got.float().cpu() - ref.float()).abs().max() / ref.float().abs().max().clamp_min(1e-30))


@mac
@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("dtype", MPS_DTYPES, ids=str)
def test_mps_quantize_and_dequantize_are_bit_exact(dtype, bits):
    w = torch.randn(6, 256, generator=torch.Generator().manual_seed(bits)).to(dtype)
    q = metalq.affine_quantize(w, 64, bits)
    assert all(torch.equal(a, b.cpu()) for a, b in zip(q, metalq.affine_quantize(w.to("mps"), 64, bits)))
    got = metalq.affine_dequantize(*(t.to("mps") for t in q), 64, bits)
    assert torch.equal(got.cpu(), metalq.affine_dequantize(*q, 64, bits))


@mac
@pytest.mark.parametrize("M", [1, 2, 5, 8, 33, 130])
@pytest.mark.parametrize("dtype", MPS_DTYPES, ids=str)
@pytest.mark.parametrize("transpose", [True, False], ids=["qmm_t", "qmm_n"])
def test_mps_qmm_matches_cpu_with_storage_offsets(transpose, dtype, M):
    g = torch.Generator().manual_seed(M)
    K, N = 256, 192
    op = metalq.affine_qmm_t if transpose else metalq.affine_qmm_n
    w = torch.randn((N, K) if transpose else (K, N), generator=g).to(dtype)
    q = metalq.affine_quantize(w, 64, 4)
    x_full = torch.randn(M + 3, K, generator=g).to(dtype)
    # Views that start inside their MTLBuffer: the encoder must bind storage_offset() bytes in.
    x_mps = x_full.to("mps")[3:]
    q_mps = [torch.cat([t[:1], t]).to("mps")[1:] for t in q]
    assert x_mps.storage_offset() and all(t.storage_offset() for t in q_mps)
    got = op(x_mps, *q_mps, 64, 4)
    ref = op(x_full[3:], *q, 64, 4)
    assert got.device.type == "mps" and got.dtype == dtype and got.shape == ref.shape
    assert _rel_err(got, ref) <= MPS_TOLERANCE[dtype]


@mac
def test_mps_batched_empty_and_pack():
    q = metalq.affine_quantize(torch.randn(64, 128), 64, 4)
    q_mps = [t.to("mps") for t in q]
    x = torch.randn(2, 3, 128)
    assert _rel_err(metalq.affine_qmm_t(x.to("mps"), *q_mps, 64, 4), metalq.affine_qmm_t(x, *q, 64, 4)) <= 1e-4
    assert metalq.affine_qmm_t(torch.empty(0, 128, device="mps"), *q_mps, 64, 4).shape == (0, 64)
    codes = torch.randint(0, 16, (4, 64), dtype=torch.uint8)
    assert torch.equal(metalq.pack(codes.to("mps"), 4).cpu(), metalq.pack(codes, 4))
    assert torch.equal(metalq.unpack(metalq.pack(codes, 4).to("mps"), 4).cpu(), codes)


@mac
@pytest.mark.parametrize("bits", [1, 2, 3, 4, 5, 6, 8])
def test_mps_pack_and_unpack_are_bit_exact_and_check_values(bits):
    # The Metal kernels pack_b_<bits> / unpack_b_<bits>, batched with an odd row count, from a view.
    g = torch.Generator().manual_seed(bits)
    codes = torch.randint(0, 2**bits, (2, 3, 65), generator=g, dtype=torch.int64).to(torch.uint8)[..., 1:]
    packed = metalq.pack(codes.to("mps"), bits)
    assert packed.device.type == "mps" and torch.equal(packed.cpu(), metalq.pack(codes, bits))
    assert torch.equal(metalq.unpack(packed, bits).cpu(), codes)
    if bits < 8:
        with pytest.raises(ValueError, match=rf"\[pack\] q has values >= 2\*\*bits = {2**bits}"):
            metalq.pack(torch.full((1, 32), 2**bits, dtype=torch.uint8, device="mps"), bits)


@mac
def test_mps_bad_input_raises_the_shared_error():
    q = [t.to("mps") for t in metalq.affine_quantize(torch.randn(64, 128), 64, 4)]
    with pytest.raises(ValueError, match="affine_qmm"):
        metalq.affine_qmm_t(torch.randn(1, 100, device="mps"), *q, 64, 4)
