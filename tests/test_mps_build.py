"""The macOS build and MPS backend, checked on Linux as far as that is honest.

- tools/embed_metal.py: the Metal-compiler probe and its fallback decision (with a fake `xcrun`), the
  generated header (compiled and read back), and the embedded sources (same tokens as metal/, and the
  flattened quantized.metal runs bit-exact in the emulator).
- csrc/mps/*.mm: parsed by clang-19 as Objective-C++ with ARC and blocks, against torch's real headers
  and tests/objc_stubs (declarations of exactly the Apple symbols used), for both header variants.
  Not checked here: Apple's real headers, linking, and anything at run time (see benchmarks/bench_mps.py).
"""
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import emulator
import metalq
from conftest import require

ROOT = Path(__file__).resolve().parents[1]
METAL = ROOT / "metal"
STUBS = ROOT / "tests" / "objc_stubs"
sys.path.insert(0, str(ROOT / "tools"))
import embed_metal  # noqa: E402

CLANG = emulator.CLANG
CLT_ERROR = 'xcrun: error: unable to find utility "metal", not a developer tool or in PATH'
XCODE26_ERROR = ("error: cannot execute tool 'metal' due to missing Metal Toolchain; "
                 "use: xcodebuild -downloadComponent MetalToolchain")


class FakeXcrun:
    """Records commands; `metal` fails with `metal_error` (if set), compiles "write" their -o file."""

    def __init__(self, metal_error=None, fail_on=None):
        self.metal_error, self.fail_on, self.commands = metal_error, fail_on, []

    def __call__(self, cmd):
        cmd = list(cmd)
        self.commands.append(cmd)
        if self.metal_error and "metal" in cmd:
            return subprocess.CompletedProcess(cmd, 1, "", self.metal_error + "\n")
        if self.fail_on and any(self.fail_on in part for part in cmd):
            return subprocess.CompletedProcess(cmd, 1, "", "quantized.metal:1:1: error: boom\n")
        out = Path(cmd[cmd.index("-o") + 1])
        out.write_bytes(b"MTLB" + out.name.encode())  # a stand-in for the compiler's output
        return subprocess.CompletedProcess(cmd, 0, "", "")


def _clang():
    require(emulator.available(), f"{CLANG} (apt-get install clang-19)")
    return CLANG


# ---- toolchain probe and fallback decision -----------------------------------------------------

@pytest.mark.parametrize("error", [CLT_ERROR, XCODE26_ERROR], ids=["command-line-tools", "xcode26-no-toolchain"])
def test_probe_reports_a_missing_metal_compiler(error):
    assert embed_metal.probe_metal_compiler(FakeXcrun(metal_error=error)) == (False, error)


def test_probe_without_xcrun_at_all(monkeypatch):
    monkeypatch.setenv("PATH", "/nonexistent")
    ok, reason = embed_metal.probe_metal_compiler()
    assert not ok and reason


def test_probe_compiles_metal31_for_real():
    fake = FakeXcrun()
    assert embed_metal.probe_metal_compiler(fake) == (True, "")
    (cmd,) = fake.commands
    assert cmd[:4] == ["xcrun", "-sdk", "macosx", "metal"] and "-std=metal3.1" in cmd and "-c" in cmd


@pytest.mark.parametrize("error", [CLT_ERROR, XCODE26_ERROR], ids=["command-line-tools", "xcode26-no-toolchain"])
def test_without_compiler_the_sources_are_embedded_with_one_message(tmp_path, error):
    messages = []
    assert embed_metal.generate(METAL, tmp_path, FakeXcrun(metal_error=error), messages.append) is False
    assert len(messages) == 1 and error in messages[0] and "downloadComponent MetalToolchain" in messages[0]
    text = (tmp_path / embed_metal.HEADER_NAME).read_text()
    assert "kIsMetallib = false" in text
    for src in sorted(METAL.glob("*.metal")):
        assert f'{{"{src.name}", ' in text


def test_with_compiler_one_metallib_is_embedded(tmp_path):
    fake, messages = FakeXcrun(), []
    assert embed_metal.generate(METAL, tmp_path, fake, messages.append) is True
    assert messages == []
    sources = sorted(METAL.glob("*.metal"))
    compiles = [c for c in fake.commands[1:] if "metal" in c]
    assert [Path(c[c.index("-c") + 1]) for c in compiles] == sources
    assert all("-fno-fast-math" in c and "-std=metal3.1" in c for c in compiles)
    (link,) = [c for c in fake.commands if "metallib" in c]
    assert len([p for p in link if p.endswith(".air")]) == len(sources)
    text = (tmp_path / embed_metal.HEADER_NAME).read_text()
    assert "kIsMetallib = true" in text and '{"metalq.metallib", kBlob0, sizeof(kBlob0)}' in text


def test_sources_can_be_forced_for_testing_the_fallback(tmp_path):
    fake, messages = FakeXcrun(), []
    assert embed_metal.generate(METAL, tmp_path, fake, messages.append, force_sources=True) is False
    assert fake.commands == [] and len(messages) == 1 and "METALQ_METAL_SOURCES=1" in messages[0]


def test_a_kernel_compile_error_fails_the_build(tmp_path):
    # The probe passed, so the toolchain works: an error in metal/ is a bug, not a reason to fall back.
    with pytest.raises(RuntimeError, match="boom"):
        embed_metal.generate(METAL, tmp_path, FakeXcrun(fail_on="quantized.metal"), lambda m: None)


def test_header_is_rewritten_only_when_it_changes(tmp_path):
    fake = FakeXcrun(metal_error=CLT_ERROR)
    embed_metal.generate(METAL, tmp_path, fake, lambda m: None)
    header = tmp_path / embed_metal.HEADER_NAME
    before = header.stat().st_mtime_ns
    embed_metal.generate(METAL, tmp_path, fake, lambda m: None)
    assert header.stat().st_mtime_ns == before


def _run_setup_py(monkeypatch, platform):
    """setup.py's arguments to setup() as if run on `platform` (setup() itself is not called)."""
    import runpy
    import setuptools
    import torch.utils.cpp_extension as cpp_extension

    cpp_extension.BuildExtension  # resolved (lazily imported) before sys.platform changes
    captured = {}
    monkeypatch.setattr(setuptools, "setup", lambda **kw: captured.update(kw))
    monkeypatch.setattr(sys, "platform", platform)
    monkeypatch.chdir(ROOT)
    runpy.run_path(str(ROOT / "setup.py"), run_name="__main__")
    return captured


def test_setup_py_on_macos_builds_the_mps_backend_and_embeds_the_library(monkeypatch, tmp_path):
    kw = _run_setup_py(monkeypatch, "darwin")
    (ext,) = kw["ext_modules"]
    assert {"csrc/mps/library.mm", "csrc/mps/quantized.mm"} <= set(ext.sources)
    assert "-fobjc-arc" in ext.extra_compile_args["cxx"]
    assert ext.extra_link_args == ["-framework", "Metal", "-framework", "Foundation"]
    # build_ext on this machine (no xcrun): the header with the sources, then torch's build.
    from torch.utils.cpp_extension import BuildExtension

    built = []
    monkeypatch.setattr(BuildExtension, "build_extensions", lambda self: built.append(self))
    cmd = object.__new__(kw["cmdclass"]["build_ext"])
    cmd.build_temp, cmd.extensions = str(tmp_path), [ext]
    cmd.build_extensions()
    generated = tmp_path / "metalq_generated"
    assert built == [cmd] and str(generated) in ext.include_dirs
    assert "kIsMetallib = false" in (generated / embed_metal.HEADER_NAME).read_text()


def test_setup_py_on_linux_is_unchanged(monkeypatch):
    kw = _run_setup_py(monkeypatch, "linux")
    (ext,) = kw["ext_modules"]
    assert not any(s.endswith(".mm") for s in ext.sources)
    assert "-fobjc-arc" not in ext.extra_compile_args["cxx"] and ext.extra_link_args == ["-fopenmp"]


# ---- the generated header and the embedded sources ---------------------------------------------

def _sources_header(tmp_path):
    embed_metal.generate(METAL, tmp_path, FakeXcrun(metal_error=CLT_ERROR), lambda m: None)
    return tmp_path


def test_header_compiles_and_holds_the_flattened_sources(tmp_path):
    clang = _clang()
    gen = _sources_header(tmp_path / "gen")
    dump = tmp_path / "dump.cpp"
    dump.write_text('#include <cstdio>\n#include "metalq_metal_embed.h"\n'
                    "int main() { for (const auto& b : metalq::embedded::kBlobs) {\n"
                    '  std::printf("%s %zu\\n", b.name, b.size); std::fwrite(b.data, 1, b.size, stdout); } }\n')
    exe = tmp_path / "dump"
    subprocess.run([clang, "-std=c++17", "-Wall", "-Werror", "-I", str(gen), str(dump), "-o", str(exe)], check=True)
    out = subprocess.run([str(exe)], capture_output=True, check=True).stdout
    expected = b"".join(f"{s.name} {len(t)}\n".encode() + t for s in sorted(METAL.glob("*.metal"))
                        for t in [embed_metal.inline_includes(s, [METAL]).encode()])
    assert out == expected


def _preprocess(clang, source: Path, *include_dirs):
    cmd = [clang, "-E", "-P", "-x", "c++", "-std=c++17", "-D__METAL__", "-D__METAL_VERSION__=310",
           "-I", str(emulator.HERE / "stub"), *(f"-I{d}" for d in include_dirs), str(source)]
    return subprocess.run(cmd, capture_output=True, text=True, check=True).stdout.split()  # tokens, not layout


@pytest.mark.parametrize("path", sorted(METAL.glob("*.metal")), ids=lambda p: p.name)
def test_flattened_source_is_self_contained_and_identical(tmp_path, path):
    clang = _clang()
    flat = embed_metal.inline_includes(path, [METAL])
    assert '#include "' not in flat and str(ROOT) not in flat  # no build-machine paths
    copy = tmp_path / path.name
    copy.write_text(flat)
    # Only <metal_stdlib> from outside: the same tokens as the original with -I metal.
    assert _preprocess(clang, copy) == _preprocess(clang, path, METAL)


def test_flattened_quantized_metal_runs_bit_exact(tmp_path):
    _clang()
    copy = tmp_path / "quantized.metal"
    copy.write_text(embed_metal.inline_includes(METAL / "quantized.metal", [METAL]))
    lib = emulator.load(copy)
    g = torch.Generator().manual_seed(0)
    wq = torch.randint(0, 2**32, (4, 256 * 4 // 32), generator=g, dtype=torch.int64).to(torch.uint32)
    scales, biases = torch.randn(2, 4, 256 // 64, generator=g).to(torch.float16)
    out = torch.empty(4, 256, dtype=torch.float16)
    lib.run(metalq._C.plan_affine_dequantize(wq, scales, biases, out, 64, 4))
    assert torch.equal(out, torch.ops.metalq.affine_dequantize(wq, scales, biases, 64, 4))


# ---- Objective-C++ syntax check ---------------------------------------------------------------

def _objcxx_syntax_check(clang, source: Path, generated: Path):
    torch_include = Path(torch.__file__).parent / "include"
    cmd = [clang, "-x", "objective-c++", "-std=c++17", "-fsyntax-only", "-fobjc-arc", "-fblocks",
           "-fobjc-runtime=macosx-14.0", "-Wall", "-Wextra", "-Werror",
           "-I", str(STUBS), "-isystem", str(torch_include), "-isystem", str(torch_include / "torch/csrc/api/include"),
           "-I", str(ROOT / "csrc"), "-I", str(METAL), "-I", str(generated), str(source)]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr


# Both header variants for the file that includes the generated header, one for the others.
OBJCXX_CASES = [(mm, variant) for mm in sorted((ROOT / "csrc" / "mps").glob("*.mm"))
                for variant in (("sources", "metallib") if embed_metal.HEADER_NAME in mm.read_text() else ("sources",))]


@pytest.mark.parametrize("source, variant", OBJCXX_CASES, ids=[f"{mm.name}-{v}" for mm, v in OBJCXX_CASES])
def test_objective_cpp_parses_against_torch_and_sdk_stubs(tmp_path, source, variant):
    clang = _clang()
    fake = FakeXcrun() if variant == "metallib" else FakeXcrun(metal_error=CLT_ERROR)
    embed_metal.generate(METAL, tmp_path, fake, lambda m: None)
    _objcxx_syntax_check(clang, source, tmp_path)


def test_stubs_reject_what_the_mps_stream_owns(tmp_path):
    # The stubs declare no endEncoding/commit, so csrc/mps cannot call them (under ARC an unknown
    # selector is an error): this is that guard working.
    clang = _clang()
    embed_metal.generate(METAL, tmp_path, FakeXcrun(metal_error=CLT_ERROR), lambda m: None)
    bad = tmp_path / "bad.mm"
    bad.write_text('#include "mps/library.h"\nvoid f(id<MTLComputeCommandEncoder> e) { [e endEncoding]; }\n')
    with pytest.raises(AssertionError, match="endEncoding"):
        _objcxx_syntax_check(clang, bad, tmp_path)


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
def test_mps_bad_input_raises_the_shared_error():
    q = [t.to("mps") for t in metalq.affine_quantize(torch.randn(64, 128), 64, 4)]
    with pytest.raises(ValueError, match="affine_qmm"):
        metalq.affine_qmm_t(torch.randn(1, 100, device="mps"), *q, 64, 4)
