"""Builds dynenc with its C++ CPU backend ``dynenc._C`` (from csrc/) and maps kernels/ to
``dynenc.kernels``. Install with ``pip install --no-build-isolation -e .`` (torch first)."""
import glob

from setuptools import setup
from torch.utils.cpp_extension import BuildExtension, CppExtension

setup(
    packages=["dynenc", "dynenc.methods", "dynenc.recipe", "dynenc.kernels"],
    package_dir={"dynenc": "dynenc", "dynenc.kernels": "kernels"},
    ext_modules=[
        CppExtension(
            "dynenc._C",
            sorted(glob.glob("csrc/*.cpp")),
            extra_compile_args=["-O3", "-g0", "-fopenmp"],
            extra_link_args=["-fopenmp"],
        )
    ],
    cmdclass={"build_ext": BuildExtension.with_options(use_ninja=True)},
)
