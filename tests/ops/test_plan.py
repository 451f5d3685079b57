"""Routing plans (``dynenc/ops/plan.py``): build_plan (integer outputs: no autograd)."""
import pytest
import torch
from op_testing import (DEVICE, MANY_LENGTHS, SEEDS, BadCall, assert_rejected, bad_call_params, cu_seqlens_of,
                        float64_sample, generator, launcher, ragged_cu_seqlens, randint)

from dynenc.ops.plan import reference_build_plan

ops = torch.ops.dynenc
OUTPUT_NAMES = ("indices", "offsets", "active_cu_seqlens")


def assert_equal_plans(expected, actual):
    for name, e, a in zip(OUTPUT_NAMES, expected, actual):
        assert a.dtype == e.dtype and torch.equal(a.cpu(), e), f"{name}: {a} vs {e}"


@pytest.mark.parametrize("seed", SEEDS)
def test_cpp_build_plan(seed):
    gen = generator(seed)
    cu = ragged_cu_seqlens(gen, seed)
    num_layers, n = randint(gen, 1, 5), int(cu[-1])
    density = (0.0, 1.0, 0.5, 0.1)[seed % 4]
    row_mask = torch.rand(num_layers, n, generator=gen) < density
    assert_equal_plans(reference_build_plan(row_mask, cu), ops.build_plan(row_mask, cu))


@pytest.mark.parametrize("density", [0.0, 0.4, 1.0])
@pytest.mark.parametrize(
    "lengths,num_layers",
    [((5, 0, 40, 1, 3), 3), ((1,), 1), ((0,), 2), ((3, 4), 0), ((1500, 0, 7), 2), (MANY_LENGTHS, 4)],
    ids=["ragged", "T1", "empty_seq", "no_layers", "multi_block", "many_seqs"],
)
def test_triton_build_plan(lengths, num_layers, density):
    cu_seqlens = cu_seqlens_of(lengths)
    row_mask = (torch.rand(num_layers, sum(lengths), generator=generator(0)) < density).to(DEVICE)
    actual = launcher("build_plan")(row_mask, cu_seqlens)
    assert_equal_plans(reference_build_plan(row_mask.cpu(), cu_seqlens.cpu()), actual)


def test_opcheck():
    row_mask = torch.rand(3, 11, generator=generator(1)) < 0.5
    torch.library.opcheck(ops.build_plan.default, (row_mask, float64_sample(0)[1]))


_MASK = torch.ones(2, 8, dtype=torch.bool)
_CU = torch.tensor([0, 3, 8], dtype=torch.int32)
BAD_CALLS = {
    "cu end": BadCall("build_plan", (_MASK, torch.tensor([0, 3, 7], dtype=torch.int32)), ValueError, "cu_seqlens",
                      value=True),
    "cu start": BadCall("build_plan", (_MASK, torch.tensor([2, 3, 8], dtype=torch.int32)), ValueError, "cu_seqlens",
                        value=True),
    "mask dtype": BadCall("build_plan", (_MASK.float(), _CU), TypeError, "row_mask"),
    "mask rank": BadCall("build_plan", (_MASK[0], _CU), ValueError, "row_mask"),
}


@pytest.mark.parametrize("bad,entry", bad_call_params(BAD_CALLS))
def test_bad_inputs_raise(bad, entry):
    assert_rejected(bad, entry)
