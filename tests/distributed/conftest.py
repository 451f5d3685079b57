"""Two-process (gloo, CPU) runs shared by the distributed tests."""
import sys
from pathlib import Path

import pytest
import torch

# The tiny models and toy batches of the method tests (tests/ is not a package).
sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "methods"))


@pytest.fixture(autouse=True)
def one_thread():
    """The single-process references use one thread like each rank (tiny matmuls: OpenMP
    threads only contend on a shared 2-core machine)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
