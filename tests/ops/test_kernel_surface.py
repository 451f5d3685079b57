"""The public ``dynenc.kernels`` launchers validate what the registered ops validate: called
directly with an out-of-range index, a ``cu_seqlens`` past the rows or a too-small
``max_seqlen`` they raise a ValueError naming the argument instead of reading out of bounds."""
import pytest
import torch

from dynenc import kernels

CU = torch.tensor([0, 3, 5], dtype=torch.int32)


@pytest.mark.parametrize("call, message", [
    pytest.param(lambda: kernels.gather_rows(torch.randn(4, 8), torch.tensor([0, 9])), "index", id="gather-index"),
    pytest.param(lambda: kernels.scatter_rows(torch.randn(2, 8), torch.tensor([1, 7]), 4), "index",
                 id="scatter-index"),
    pytest.param(lambda: kernels.varlen_dwconv1d(torch.randn(4, 8), CU, torch.randn(8, 3), None), "cu_seqlens",
                 id="dwconv-cu-seqlens-past-the-rows"),
    pytest.param(lambda: kernels.varlen_attention(*(torch.randn(5, 2, 4) for _ in range(3)), CU, 2, 0.5),
                 "max_seqlen", id="attention-max-seqlen-too-small"),
])
def test_public_launchers_check_their_arguments(call, message):
    with pytest.raises(ValueError, match=message):
        call()


def test_the_raw_launchers_stay_reachable_by_name():
    assert kernels.launcher("gather_rows") is kernels.MODULES["rows"].gather_rows
    assert kernels.gather_rows is not kernels.launcher("gather_rows")
