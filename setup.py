"""Builds metalq._C: CPU kernels everywhere; on macOS also the MPS backend and its Metal library.

Next to the extension the build writes ``_build_info.py`` (the torch it was compiled against, which
``import metalq`` checks) and, on macOS, the Metal library (tools/metal_library.py): a metallib file,
or the kernel sources compiled at first use when no Metal compiler works.
"""
import glob
import os
import re
import sys

from setuptools import setup
import torch
from torch.utils.cpp_extension import BuildExtension, CppExtension, include_paths

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, "tools"))
import metal_library  # noqa: E402  (metal/*.metal -> metallib or embedded sources)


def _sources():
    sources = sorted(glob.glob("csrc/*.cpp")) + sorted(glob.glob("csrc/cpu/*.cpp"))
    if sys.platform == "darwin":
        sources += sorted(glob.glob("csrc/mps/*.mm"))
    return sources


def torch_uses_openmp(torch_include_dir):
    """True when this torch was built with OpenMP as its parallel backend (ATen/Config.h)."""
    with open(os.path.join(torch_include_dir, "ATen", "Config.h")) as f:
        return re.search(r"^#define AT_PARALLEL_OPENMP 1\b", f.read(), re.M) is not None


def openmp_flags(platform, torch_include_dir):
    """(compile, link) flags giving at::parallel_for the OpenMP runtime torch itself uses.

    at::parallel_for is an inline OpenMP region: compiled without OpenMP it silently runs on one
    thread. Linux: GCC's -fopenmp (libgomp, as torch's Linux wheels). macOS: Apple clang has no
    -fopenmp driver flag and no omp.h; torch's macOS wheels ship omp.h (in the include folder every
    extension gets) and libomp.dylib, which libtorch_cpu loads. The OpenMP calls are left to bind at
    load time to that already-loaded libomp (dynamic lookup, as a Python extension binds to the
    interpreter): exactly torch's runtime, never a second one, whatever install name its libomp has.
    """
    if not torch_uses_openmp(torch_include_dir):
        return [], []
    if platform == "darwin":
        return ["-Xpreprocessor", "-fopenmp"], ["-Wl,-undefined,dynamic_lookup"]
    return ["-fopenmp"], ["-fopenmp"]


def cpu_kernel_flags(machine):
    """Off x86-64 only the generic CPU kernels run, and compilers fuse a*b+c into FMAs there by default
    (GCC, and clang on arm64): -ffp-contract=off gives them the roundings of the x86 build, bit for bit
    (tests/test_native.py checks the aarch64 build). x86-64's AVX2 variant wants its FMAs."""
    return [] if machine in ("x86_64", "AMD64") else ["-ffp-contract=off"]


def _compile_args(platform=sys.platform, machine=os.uname().machine):
    debug = os.environ.get("DEBUG", "0") == "1"
    cxx = ["-O0", "-g"] if debug else ["-O3"]
    # No -std: torch.utils.cpp_extension adds the standard its own headers need (C++20 for torch
    # 2.13+), and only when the extension gives none.
    # -Wno-psabi: the baseline CPU kernels pass 32-byte vectors between internal functions only.
    cxx += ["-fvisibility=hidden", "-Wno-psabi"]
    cxx += openmp_flags(platform, include_paths()[0])[0] + cpu_kernel_flags(machine)
    if platform == "darwin":
        # clang compiles csrc/mps/*.mm as Objective-C++ by extension; ARC manages the Metal objects
        # there (no effect on the .cpp files). The deployment target is metalq's macOS minimum.
        cxx += ["-fobjc-arc", f"-mmacosx-version-min={metal_library.MACOS_MIN}"]
    return {"cxx": cxx}


def _link_args(platform=sys.platform):
    link = openmp_flags(platform, include_paths()[0])[1]
    if platform == "darwin":
        link += ["-framework", "Metal", "-framework", "Foundation"]
    return link


class _BuildExtension(BuildExtension):
    """torch's build, plus the generated Metal library header (macOS) and the files beside _C."""

    def build_extensions(self):
        metal_kind = None
        if sys.platform == "darwin":
            generated = os.path.join(os.path.abspath(self.build_temp), "metalq_generated")
            # METALQ_METAL_SOURCES=1: embed the sources even with a Metal compiler (tests that path).
            metal_kind = metal_library.generate(os.path.join(HERE, "metal"), generated,
                                                force_sources=os.environ.get("METALQ_METAL_SOURCES") == "1")
            for ext in self.extensions:
                ext.include_dirs.append(generated)
        super().build_extensions()
        for ext in self.extensions:
            package_dir = os.path.dirname(self.get_ext_fullpath(ext.name))
            if metal_kind == "metallib":
                metal_library.install_metallib(generated, package_dir)
            write_build_info(package_dir, torch.__version__, metal_kind)

    def _files_beside_extensions(self):
        """(built path, in-place path) of each file written beside an extension."""
        build_py = self.get_finalized_command("build_py")
        for ext in self.extensions:
            inplace_file, built_file = self._get_inplace_equivalent(build_py, ext)
            for name in ("_build_info.py", metal_library.METALLIB_NAME):
                built = os.path.join(os.path.dirname(built_file), name)
                if name == "_build_info.py" or os.path.isfile(built):
                    yield built, os.path.join(os.path.dirname(inplace_file), name)

    # Wheels take everything in the build folder; in-place and editable builds copy only what these
    # name, so they name the files beside _C too.
    def copy_extensions_to_source(self):
        super().copy_extensions_to_source()
        for built, inplace in self._files_beside_extensions():
            self.copy_file(built, inplace, level=self.verbose)

    def get_output_mapping(self):
        mapping = super().get_output_mapping()
        if self.inplace:
            mapping.update(self._files_beside_extensions())
        return mapping


def write_build_info(package_dir, torch_version, metal_kind):
    """metalq/_build_info.py: what this build of the extension was compiled against."""
    with open(os.path.join(package_dir, "_build_info.py"), "w") as f:
        f.write('"""Written by setup.py when metalq._C was built. Do not edit."""\n'
                f"TORCH_VERSION = {torch_version!r}\n"
                f"# 'metallib' (metalq.metallib beside _C), 'sources' (compiled at first use), None (no MPS backend)\n"
                f"METAL_LIBRARY = {metal_kind!r}\n")


setup(
    ext_modules=[
        CppExtension(
            name="metalq._C",
            sources=_sources(),
            include_dirs=[os.path.join(HERE, "metal"), os.path.join(HERE, "csrc")],
            extra_compile_args=_compile_args(),
            extra_link_args=_link_args(),
        )
    ],
    cmdclass={"build_ext": _BuildExtension},
)
