"""Build step of the macOS extension: metal/*.metal -> the header csrc/mps/library.mm embeds.

With a working Metal compiler (`xcrun -sdk macosx metal`, full Xcode with its Metal toolchain) the
sources become one metallib whose bytes the header holds. Without one (Command Line Tools only, or
Xcode 26 without the Metal toolchain) the header holds each .metal file with its quoted #includes
inlined, which the extension compiles at first use. Either way installation does not need `metal`.
Pure Python with an injectable command runner, so the decision and the header are tested on Linux.
"""
from __future__ import annotations

import re
import subprocess
import tempfile
from pathlib import Path
from typing import Callable, Sequence

HEADER_NAME = "metalq_metal_embed.h"
# macOS 14+ (bfloat); -fno-fast-math keeps the roundings the emulator checks. Mirrors CMakeLists.txt.
METAL_FLAGS = ["-std=metal3.1", "-fno-fast-math", "-Wall", "-Wextra"]
_PROBE_SOURCE = "#include <metal_stdlib>\nkernel void metalq_probe(device bfloat* x [[buffer(0)]]) { x[0] = 1; }\n"

_INCLUDE = re.compile(r'^\s*#\s*include\s*"([^"]+)"\s*$')
_PRAGMA_ONCE = re.compile(r"^\s*#\s*pragma\s+once\s*$")

Runner = Callable[[Sequence[str]], "subprocess.CompletedProcess[str]"]


def _run(cmd: Sequence[str]) -> "subprocess.CompletedProcess[str]":
    try:
        return subprocess.run(list(cmd), capture_output=True, text=True)
    except OSError as e:  # no xcrun at all
        return subprocess.CompletedProcess(list(cmd), 127, "", str(e))


def probe_metal_compiler(run: Runner = _run) -> tuple[bool, str]:
    """(True, "") when `xcrun -sdk macosx metal` compiles a Metal 3.1 kernel, else (False, why).

    A real compile, not `xcrun --find metal`: Xcode 26 without the Metal toolchain finds the tool
    but fails to run it ("missing Metal Toolchain").
    """
    with tempfile.TemporaryDirectory() as tmp:
        src = Path(tmp) / "probe.metal"
        src.write_text(_PROBE_SOURCE)
        proc = run(["xcrun", "-sdk", "macosx", "metal", *METAL_FLAGS, "-c", str(src), "-o", str(Path(tmp) / "probe.air")])
    if proc.returncode == 0:
        return True, ""
    lines = (proc.stderr or proc.stdout or f"exit status {proc.returncode}").strip().splitlines()
    return False, lines[0] if lines else f"exit status {proc.returncode}"


def fallback_message(reason: str) -> str:
    """The one build message printed when the sources are embedded instead of a metallib."""
    return ("metalq: no usable Metal compiler (" + reason + "); embedding metal/*.metal sources, compiled at "
            "first use instead. For a precompiled library install Xcode, run "
            "`sudo xcode-select --switch /Applications/Xcode.app/Contents/Developer` and, on Xcode 26, "
            "`xcodebuild -downloadComponent MetalToolchain`, then rebuild.")


def build_metallib(sources: Sequence[Path], include_dir: Path, out_dir: Path, run: Runner = _run) -> Path:
    """Compiles each source to .air and links one metalq.metallib; raises on a compile error."""
    out_dir.mkdir(parents=True, exist_ok=True)
    airs = []
    for src in sources:
        air = out_dir / (Path(src).stem + ".air")
        _check(run(["xcrun", "-sdk", "macosx", "metal", *METAL_FLAGS, "-I", str(include_dir), "-c", str(src),
                    "-o", str(air)]))
        airs.append(str(air))
    lib = out_dir / "metalq.metallib"
    _check(run(["xcrun", "-sdk", "macosx", "metallib", *airs, "-o", str(lib)]))
    return lib


def _check(proc: "subprocess.CompletedProcess[str]") -> None:
    if proc.returncode:
        raise RuntimeError(f"metalq: {' '.join(proc.args)} failed:\n{proc.stderr}{proc.stdout}")


def inline_includes(path: Path, include_dirs: Sequence[Path] = ()) -> str:
    """The file with its `#include "..."` replaced by the files (once each, as `#pragma once` does).

    Angle-bracket includes (<metal_stdlib>) stay. `#line` markers keep compiler messages pointing at
    the original file names (no directories, so no build-machine paths end up in the binary).
    """
    seen: set[Path] = set()

    def expand(file: Path) -> list[str]:
        file = file.resolve()
        if file in seen:
            return []
        seen.add(file)
        out = [f'#line 1 "{file.name}"\n']
        for number, line in enumerate(file.read_text().splitlines(keepends=True), start=1):
            if _PRAGMA_ONCE.match(line):
                out.append("\n")
                continue
            m = _INCLUDE.match(line)
            if not m:
                out.append(line if line.endswith("\n") else line + "\n")
                continue
            for directory in (file.parent, *map(Path, include_dirs)):
                target = directory / m.group(1)
                if target.is_file():
                    break
            else:
                raise FileNotFoundError(f'{file.name}:{number}: #include "{m.group(1)}" not found')
            out += expand(target)
            out.append(f'#line {number + 1} "{file.name}"\n')
        return out

    return "".join(expand(Path(path)))


def header_text(blobs: Sequence[tuple[str, bytes]], is_metallib: bool) -> str:
    """C++ header declaring metalq::embedded::kBlobs (name, bytes) and kIsMetallib."""
    lines = [
        "// Generated at build time by tools/embed_metal.py from metal/. Do not edit.",
        "#pragma once",
        "",
        "#include <cstddef>",
        "",
        "namespace metalq::embedded {",
        "",
        "struct Blob {",
        "  const char* name;",
        "  const unsigned char* data;",
        "  size_t size;",
        "};",
        "",
        "// true: kBlobs holds one metallib; false: one Metal source per metal/*.metal file.",
        f"inline constexpr bool kIsMetallib = {'true' if is_metallib else 'false'};",
        "",
    ]
    for i, (_, data) in enumerate(blobs):
        lines.append(f"inline constexpr unsigned char kBlob{i}[] = {{")
        for start in range(0, len(data), 24):
            lines.append("  " + ",".join(str(b) for b in data[start:start + 24]) + ",")
        lines.append("};")
    lines.append("inline constexpr Blob kBlobs[] = {")
    for i, (name, _) in enumerate(blobs):
        lines.append(f'  {{"{name}", kBlob{i}, sizeof(kBlob{i})}},')
    lines += ["};", "", "}  // namespace metalq::embedded", ""]
    return "\n".join(lines)


def generate(metal_dir: Path, out_dir: Path, run: Runner = _run, log: Callable[[str], None] = print,
             force_sources: bool = False) -> bool:
    """Writes out_dir/metalq_metal_embed.h (only if its text changed); returns True for a metallib.

    force_sources embeds the sources even when `metal` works (to test the fallback on a Mac).
    """
    metal_dir, out_dir = Path(metal_dir), Path(out_dir)
    sources = sorted(metal_dir.glob("*.metal"))
    if not sources:
        raise FileNotFoundError(f"no .metal files in {metal_dir}")
    ok, reason = (False, "METALQ_METAL_SOURCES=1") if force_sources else probe_metal_compiler(run)
    if ok:
        lib = build_metallib(sources, metal_dir, out_dir / "metal", run)
        text = header_text([(lib.name, lib.read_bytes())], is_metallib=True)
    else:
        log(fallback_message(reason))
        text = header_text([(s.name, inline_includes(s, [metal_dir]).encode()) for s in sources], is_metallib=False)
    out_dir.mkdir(parents=True, exist_ok=True)
    header = out_dir / HEADER_NAME
    if not header.is_file() or header.read_text() != text:
        header.write_text(text)
    return ok
