"""Builds dynenc's C++ CPU backend ``dynenc._C`` (from csrc/) and lays out the packages:
every package under dynenc/, kernels/ as ``dynenc.kernels`` and bench/ as ``dynenc.bench``.
The metadata (name, version, dependencies, extras) is in pyproject.toml.

Develop with ``pip install --no-build-isolation -e '.[dev]'`` (torch installed first); a plain
``pip install .`` builds in an isolated environment with the pinned torch."""
import glob
import os

from setuptools import find_packages, setup
from setuptools.command.build_py import build_py
from torch.utils.cpp_extension import BuildExtension, CppExtension


class BuildPyWithoutTests(build_py):
    """Leaves pytest files (``test_*.py``, ``conftest.py``) out of the wheel, wherever they lie
    in a package (bench/'s pytest-benchmark suites live in bench/suites/, not a package)."""

    def find_package_modules(self, package, package_dir):
        return [(pkg, module, path) for pkg, module, path in super().find_package_modules(package, package_dir)
                if not (module.startswith("test_") or module == "conftest")]


setup(
    # Every subpackage of dynenc/ is found; kernels/ and bench/ (with its subpackages) are mapped in by hand.
    packages=find_packages(include=["dynenc", "dynenc.*"]) + ["dynenc.kernels", "dynenc.bench"]
    + [f"dynenc.bench.{name}" for name in find_packages("bench")],
    package_dir={"dynenc": "dynenc", "dynenc.kernels": "kernels", "dynenc.bench": "bench"},
    # PEP 561: dynenc ships its annotations.
    package_data={"dynenc": ["py.typed"]},
    ext_modules=[
        CppExtension(
            "dynenc._C",
            sorted(glob.glob("csrc/*.cpp")),
            depends=sorted(glob.glob(os.path.join("csrc", "*.h"))),  # rebuilt on a header change; shipped in the sdist
            extra_compile_args=["-O3", "-g0", "-fopenmp"],  # without -fopenmp at::parallel_for is serial
            extra_link_args=["-fopenmp"],
        )
    ],
    cmdclass={"build_ext": BuildExtension.with_options(use_ninja=True), "build_py": BuildPyWithoutTests},
)
