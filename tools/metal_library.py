"""Build step of the macOS extension: metal/*.metal -> metalq's Metal library.

With a working Metal compiler (`xcrun -sdk macosx metal`, full Xcode with its Metal toolchain) the
sources become metalq.metallib, installed beside metalq/_C as a package file that the extension loads
by path. When that fails for any reason (Command Line Tools only, Xcode 26 without the Metal toolchain,
a compiler that rejects the kernels), the build prints the compiler's first diagnostics once and embeds
the sources instead: the kernel templates of each .metal file (its prelude) and one instantiation line
per kernel, so that the first use of a kernel compiles that kernel alone (a fraction of a second), not
the ~1,900 of the whole library. Either way installation never fails because of Metal.

A .metal file is a list of quoted #includes (the templates) followed by instantiation macros: the
build expands the macros with the C preprocessor of the compiler that builds the extension.
Pure Python with injectable command runners, so every decision and the header are tested on Linux.
"""
from __future__ import annotations

import os
import re
import shutil
import subprocess
from pathlib import Path
from typing import Callable, Sequence

HEADER_NAME = "metalq_metal_library.h"
METALLIB_NAME = "metalq.metallib"
# Metal 3.1 (bfloat) needs macOS 14. -fno-fast-math keeps the roundings the emulator checks.
MACOS_MIN = "14.0"
METAL_FLAGS = ["-std=metal3.1", f"-mmacosx-version-min={MACOS_MIN}", "-fno-fast-math", "-Wall", "-Wextra"]
DIAGNOSTIC_LINES = 8  # of the Metal compiler's output, in the one fallback message

_INCLUDE = re.compile(r'^\s*#\s*include\s*"([^"]+)"\s*$')
_PRAGMA_ONCE = re.compile(r"^\s*#\s*pragma\s+once\s*$")
_INSTANTIATION = re.compile(r'template\s*\[\[\s*host_name\s*\((?P<name>(?:\s*"[^"]*")+)\s*\)\s*\]\][^;]*;')
_RAW_DELIMITER = "metalq"

Runner = Callable[[Sequence[str]], "subprocess.CompletedProcess[str]"]


def _run(cmd: Sequence[str], stdin: str | None = None) -> "subprocess.CompletedProcess[str]":
    try:
        return subprocess.run(list(cmd), input=stdin, capture_output=True, text=True)
    except OSError as e:  # no such program
        return subprocess.CompletedProcess(list(cmd), 127, "", str(e))


class MetalBuildError(RuntimeError):
    """The Metal compiler or linker failed; `diagnostics` is its first output lines."""

    def __init__(self, cmd: Sequence[str], output: str):
        lines = [line for line in output.strip().splitlines() if line.strip()] or ["(no output)"]
        self.diagnostics = "\n".join(lines[:DIAGNOSTIC_LINES])
        super().__init__(f"{' '.join(cmd)} failed:\n{self.diagnostics}")


def _check(proc: "subprocess.CompletedProcess[str]") -> None:
    if proc.returncode:
        raise MetalBuildError(proc.args, proc.stderr or proc.stdout or f"exit status {proc.returncode}")


def build_metallib(sources: Sequence[Path], include_dir: Path, out_dir: Path, run: Runner = _run) -> Path:
    """Compiles each source to .air and links out_dir/metalq.metallib; MetalBuildError on any failure."""
    out_dir.mkdir(parents=True, exist_ok=True)
    airs = []
    for src in sources:
        air = out_dir / (Path(src).stem + ".air")
        _check(run(["xcrun", "-sdk", "macosx", "metal", *METAL_FLAGS, "-I", str(include_dir), "-c", str(src),
                    "-o", str(air)]))
        airs.append(str(air))
    lib = out_dir / METALLIB_NAME
    _check(run(["xcrun", "-sdk", "macosx", "metallib", *airs, "-o", str(lib)]))
    return lib


def fallback_message(diagnostics: str) -> str:
    """The one build message printed when the sources are embedded instead of a metallib."""
    return ("metalq: no metallib was built; the Metal compiler said:\n" + diagnostics + "\n"
            "metalq embeds the metal/ sources instead: each kernel is compiled the first time it runs. For a "
            "precompiled library install Xcode, run `sudo xcode-select --switch /Applications/Xcode.app/Contents/"
            "Developer` and, on Xcode 26, `xcodebuild -downloadComponent MetalToolchain`, then rebuild.")


def inline_includes(path: Path, include_dirs: Sequence[Path] = (), includes_only: bool = False) -> str:
    """The file with its `#include "..."` replaced by the files (once each, as `#pragma once` does).

    includes_only keeps only the top file's includes (the prelude of a .metal file, without its
    instantiation macros). Angle-bracket includes (<metal_stdlib>) stay. `#line` markers keep compiler
    messages pointing at the original file names (no directories: no build-machine paths in the binary).
    """
    seen: set[Path] = set()

    def expand(file: Path, top: bool) -> list[str]:
        file = file.resolve()
        if file in seen:
            return []
        seen.add(file)
        out = [f'#line 1 "{file.name}"\n']
        for number, line in enumerate(file.read_text().splitlines(keepends=True), start=1):
            m = _INCLUDE.match(line)
            if _PRAGMA_ONCE.match(line) or (not m and top and includes_only):
                out.append("\n")
                continue
            if not m:
                out.append(line if line.endswith("\n") else line + "\n")
                continue
            for directory in (file.parent, *map(Path, include_dirs)):
                target = directory / m.group(1)
                if target.is_file():
                    break
            else:
                raise FileNotFoundError(f'{file.name}:{number}: #include "{m.group(1)}" not found')
            out += expand(target, False)
            out.append(f'#line {number + 1} "{file.name}"\n')
        return out

    return "".join(expand(Path(path), True))


def preprocessor() -> list[str]:
    """The C++ preprocessor of the compiler that builds the extension (as torch's build picks it)."""
    return [os.environ.get("CXX", "c++"), "-E", "-P", "-x", "c++", "-"]


def instantiations(source: Path, cpp: Sequence[str] | None = None) -> list[tuple[str, str]]:
    """(host name, instantiation statement) of every kernel a .metal file instantiates, in order."""
    body = "".join(line for line in source.read_text().splitlines(keepends=True) if not _INCLUDE.match(line))
    cmd = list(cpp or preprocessor())
    proc = _run(cmd, stdin=body)
    if proc.returncode:
        raise RuntimeError(f"metalq: `{' '.join(cmd)}` could not expand {source.name}:\n{proc.stderr.strip()}")
    kernels = []
    for m in _INSTANTIATION.finditer(proc.stdout):
        name = "".join(re.findall(r'"([^"]*)"', m.group("name")))
        kernels.append((name, " ".join(m.group(0).split())))
    if not kernels:
        raise RuntimeError(f"metalq: {source.name} instantiates no kernel")
    return kernels


def _raw_string(text: str) -> str:
    if f'){_RAW_DELIMITER}"' in text:
        raise ValueError(f"a Metal source contains the raw-string delimiter ){_RAW_DELIMITER}\"")
    return f'R"{_RAW_DELIMITER}({text}){_RAW_DELIMITER}"'


def header_text(metallib: bool, preludes: Sequence[str] = (), kernels: Sequence[tuple[str, int, str]] = ()) -> str:
    """C++ header declaring metalq::metal_library::{kIsMetallib, kMetallibName, kPreludes, kKernels}.

    kernels: (host name, index into preludes, instantiation statement), written sorted by name so the
    extension finds one by binary search.
    """
    major, minor = MACOS_MIN.split(".")
    lines = [
        "// Generated at build time by tools/metal_library.py from metal/. Do not edit.",
        "#pragma once",
        "",
        "#include <cstddef>",
        "",
        "namespace metalq::metal_library {",
        "",
        "// The oldest macOS the Metal kernels run on (Metal 3.1).",
        f"inline constexpr long kMacosMinMajor = {major}, kMacosMinMinor = {minor};",
        "// true: the kernels are in kMetallibName beside the extension; false: compiled from kPreludes",
        "// plus the kernel's own instantiation line (kKernels) at its first use.",
        f"inline constexpr bool kIsMetallib = {'true' if metallib else 'false'};",
        f'inline constexpr const char* kMetallibName = "{METALLIB_NAME}";',
        "",
        "struct Kernel {",
        "  const char* name;",
        "  int prelude;",
        "  const char* instantiation;",
        "};",
        "",
        "inline constexpr const char* kPreludes[] = {",
        *(f"    {_raw_string(p)}," for p in preludes),
        '    nullptr,',
        "};",
        "inline constexpr Kernel kKernels[] = {",
        *(f'    {{"{name}", {index}, {_raw_string(line)}}},' for name, index, line in sorted(kernels)),
        '    {nullptr, 0, nullptr},',
        "};",
        f"inline constexpr size_t kKernelCount = {len(kernels)};",
        "",
        "}  // namespace metalq::metal_library",
        "",
    ]
    return "\n".join(lines)


def sources_header(metal_dir: Path, cpp: Sequence[str] | None = None) -> str:
    """The header of the embedded-sources library: a prelude per .metal file, a line per kernel."""
    preludes, kernels = [], []
    for index, source in enumerate(sorted(Path(metal_dir).glob("*.metal"))):
        preludes.append(inline_includes(source, [metal_dir], includes_only=True))
        kernels += [(name, index, line) for name, line in instantiations(source, cpp)]
    names = [name for name, _, _ in kernels]
    duplicates = sorted({n for n in names if names.count(n) > 1})
    if duplicates:
        raise RuntimeError(f"metalq: Metal kernels instantiated twice: {', '.join(duplicates[:5])}")
    return header_text(False, preludes, kernels)


def generate(metal_dir: Path, out_dir: Path, run: Runner = _run, log: Callable[[str], None] = print,
             force_sources: bool = False, cpp: Sequence[str] | None = None) -> str:
    """Writes out_dir/metalq_metal_library.h (only if its text changed) and, for a metallib,
    out_dir/metal/metalq.metallib; returns "metallib" or "sources".

    force_sources embeds the sources even when `metal` works (to test that path on a Mac).
    """
    metal_dir, out_dir = Path(metal_dir), Path(out_dir)
    sources = sorted(metal_dir.glob("*.metal"))
    if not sources:
        raise FileNotFoundError(f"no .metal files in {metal_dir}")
    kind = "sources"
    if force_sources:
        log(fallback_message("(not run: METALQ_METAL_SOURCES=1)"))
    else:
        try:
            build_metallib(sources, metal_dir, out_dir / "metal", run)
            kind = "metallib"
        except MetalBuildError as error:
            log(fallback_message(error.diagnostics))
    text = header_text(True) if kind == "metallib" else sources_header(metal_dir, cpp)
    out_dir.mkdir(parents=True, exist_ok=True)
    header = out_dir / HEADER_NAME
    if not header.is_file() or header.read_text() != text:
        header.write_text(text)
    return kind


def install_metallib(out_dir: Path, package_dir: Path) -> Path:
    """Copies the metallib that generate() built into the package, beside metalq/_C."""
    target = Path(package_dir) / METALLIB_NAME
    shutil.copyfile(Path(out_dir) / "metal" / METALLIB_NAME, target)
    return target
