"""Builds metalq._C: CPU kernels everywhere; on macOS also the MPS backend and its Metal library."""
import glob
import os
import sys

from setuptools import setup
from torch.utils.cpp_extension import BuildExtension, CppExtension

HERE = os.path.dirname(os.path.abspath(__file__))


def _sources():
    sources = sorted(glob.glob("csrc/*.cpp")) + sorted(glob.glob("csrc/cpu/*.cpp"))
    if sys.platform == "darwin":
        sources += sorted(glob.glob("csrc/mps/*.mm"))
    return sources


def _compile_args():
    debug = os.environ.get("DEBUG", "0") == "1"
    cxx = ["-O0", "-g"] if debug else ["-O3"]
    # -Wno-psabi: the baseline CPU kernels pass 32-byte vectors between internal functions only.
    cxx += ["-std=c++17", "-fvisibility=hidden", "-Wno-psabi"]
    if sys.platform.startswith("linux"):
        # at::parallel_for is an inline OpenMP region: without -fopenmp it silently runs on one thread.
        cxx.append("-fopenmp")
    if sys.platform == "darwin":
        # clang compiles csrc/mps/*.mm as Objective-C++ by extension; ARC manages the Metal objects
        # there (no effect on the .cpp files).
        cxx.append("-fobjc-arc")
    return {"cxx": cxx}


def _link_args():
    if sys.platform == "darwin":
        return ["-framework", "Metal", "-framework", "Foundation"]
    return ["-fopenmp"] if sys.platform.startswith("linux") else []


class _BuildExtension(BuildExtension):
    """On macOS, first writes the embedded Metal library header (tools/embed_metal.py) into the build tree."""

    def build_extensions(self):
        if sys.platform == "darwin":
            sys.path.insert(0, os.path.join(HERE, "tools"))
            import embed_metal  # metal/*.metal -> the header csrc/mps embeds (metallib, else sources)

            generated = os.path.join(os.path.abspath(self.build_temp), "metalq_generated")
            # METALQ_METAL_SOURCES=1: embed the sources even with a Metal compiler (tests that path).
            embed_metal.generate(os.path.join(HERE, "metal"), generated,
                                 force_sources=os.environ.get("METALQ_METAL_SOURCES") == "1")
            for ext in self.extensions:
                ext.include_dirs.append(generated)
        super().build_extensions()


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
