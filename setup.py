"""Build of aurora_core._C: one pybind11 extension over csrc/*.cpp, no libtorch."""

import glob
import os
import platform
import sys

from pybind11.setup_helpers import Pybind11Extension, build_ext
from setuptools import setup

flags = ["-O3", "-fno-math-errno", "-fvisibility=hidden"]
# The extension is built on the machine that runs it (pip install builds from source), so native
# SIMD is safe; AURORA_PORTABLE=1 builds a binary that runs on any x86-64-v2 CPU.
if platform.machine() in ("x86_64", "AMD64"):
    flags.append("-march=x86-64-v2" if os.environ.get("AURORA_PORTABLE") else "-march=native")

ext = Pybind11Extension(
    "aurora_core._C",
    sorted(glob.glob("csrc/*.cpp")),
    cxx_std=17,
    extra_compile_args=flags,
    # -ldl: dlopen of Pillow's libjpeg-turbo (csrc/jpeg_region.cpp); in libc itself from glibc 2.34.
    extra_link_args=["-pthread"] + (["-ldl"] if sys.platform.startswith("linux") else []),
)

setup(ext_modules=[ext], cmdclass={"build_ext": build_ext})
