"""Builds dynenc with its C++ CPU backend ``dynenc._C`` (from csrc/) and maps kernels/ to
``dynenc.kernels`` and bench/ to ``dynenc.bench``. Install with
``pip install --no-build-isolation -e .`` (torch first)."""
import glob

from setuptools import find_packages, setup
from torch.utils.cpp_extension import BuildExtension, CppExtension

setup(
    # Every subpackage of dynenc/ is found; kernels/ and bench/ (with its subpackages) are mapped in by hand.
    packages=find_packages(include=["dynenc", "dynenc.*"]) + ["dynenc.kernels", "dynenc.bench"]
    + [f"dynenc.bench.{name}" for name in find_packages("bench")],
    package_dir={"dynenc": "dynenc", "dynenc.kernels": "kernels", "dynenc.bench": "bench"},
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
