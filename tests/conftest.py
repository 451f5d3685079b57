"""Test-wide set-up: the Triton interpreter on CPU, tests/ importable for the shared helper
modules, and the ``backend`` fixture."""
import os
import sys

# Triton kernels run on CPU tensors only under the interpreter, which must be chosen before
# any @triton.jit function is defined (AOT-compile tests run in a subprocess without it).
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest

import dynenc

# Helper modules live beside this file (tests/ is not a package); importing them as
# ``conftest`` would break as soon as a subfolder has its own conftest.py.
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(params=["native", "reference"])
def backend(request):
    with dynenc.use_backend(request.param):
        yield request.param
