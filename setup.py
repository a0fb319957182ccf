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
    return {"cxx": cxx}


setup(
    ext_modules=[
        CppExtension(
            name="metalq._C",
            sources=_sources(),
            include_dirs=[os.path.join(HERE, "metal"), os.path.join(HERE, "csrc")],
            extra_compile_args=_compile_args(),
            extra_link_args=["-fopenmp"] if sys.platform.startswith("linux") else [],
        )
    ],
    cmdclass={"build_ext": BuildExtension},
)
