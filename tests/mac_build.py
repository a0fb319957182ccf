"""Helpers for checking metalq's macOS build on Linux: a fake `xcrun`, the generated Metal library
header, and csrc/mps/*.mm compiled by clang-19 as Objective-C++ (ARC, blocks, the macOS 14 runtime)
against a torch's headers and tests/objc_stubs, as a syntax check or into an object file."""
import runpy
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
METAL = ROOT / "metal"
STUBS = ROOT / "tests" / "objc_stubs"
MM_SOURCES = sorted((ROOT / "csrc" / "mps").glob("*.mm"))
sys.path.insert(0, str(ROOT / "tools"))
import metal_library  # noqa: E402

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


def generate_header(out_dir: Path, variant: str) -> Path:
    """The generated header as a Mac build writes it: variant "metallib" or "sources"."""
    fake = FakeXcrun() if variant == "metallib" else FakeXcrun(metal_error=CLT_ERROR)
    assert metal_library.generate(METAL, out_dir, fake, lambda m: None) == variant
    return out_dir


# Both header variants for the file that includes the generated header, one for the others.
MM_CASES = [(mm, variant) for mm in MM_SOURCES
            for variant in (("sources", "metallib") if metal_library.HEADER_NAME in mm.read_text() else ("sources",))]
MM_CASE_IDS = [f"{mm.name}-{variant}" for mm, variant in MM_CASES]


def compile_objcxx(clang: str, source: Path, generated: Path, torch_include: Path, output: Path | None = None):
    """-fsyntax-only, or an object file at `output` built with libc++ (macOS's C++ library, so that
    the referenced symbols are mangled as on a Mac). C++20, as torch's cpp_extension builds csrc/."""
    cmd = [clang, "-x", "objective-c++", "-std=c++20", "-fobjc-arc", "-fblocks", "-fobjc-runtime=macosx-14.0",
           "-Wall", "-Wextra", "-Werror", "-I", str(STUBS), "-isystem", str(torch_include),
           "-isystem", str(torch_include / "torch/csrc/api/include"),
           "-I", str(ROOT / "csrc"), "-I", str(METAL), "-I", str(generated), str(source)]
    cmd += ["-fsyntax-only"] if output is None else ["-stdlib=libc++", "-O1", "-c", "-o", str(output)]
    return subprocess.run(cmd, capture_output=True, text=True)


def run_setup_py(monkeypatch, platform):
    """setup.py's arguments to setup() as if run on `platform` (setup() itself is not called), and
    its module globals."""
    import setuptools
    import torch.utils.cpp_extension as cpp_extension

    cpp_extension.BuildExtension  # resolved (lazily imported) before sys.platform changes
    captured = {}
    monkeypatch.setattr(setuptools, "setup", lambda **kw: captured.update(kw))
    monkeypatch.setattr(sys, "platform", platform)
    monkeypatch.chdir(ROOT)
    module = runpy.run_path(str(ROOT / "setup.py"), run_name="__main__")
    return captured, module
