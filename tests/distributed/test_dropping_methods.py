"""Every dropping method under DDP and FSDP2 (2 ranks, gloo, CPU) with different masks per
rank, a layer without rows on each rank included: no collective mismatch, the parameters
after a few steps equal a single-process run with the same masks and are equal on the ranks."""
import pytest
import torch
import torch.multiprocessing as mp

import two_ranks


@pytest.fixture(scope="module", params=["ddp", "fsdp2"])
def run(request, tmp_path_factory):
    """``(strategy, [rank 0 results, rank 1 results])`` of every case (one spawn per strategy)."""
    out = tmp_path_factory.mktemp(request.param)
    mp.spawn(two_ranks.worker, args=(request.param, str(out / "init"), str(out)), nprocs=two_ranks.WORLD, join=True)
    return request.param, [torch.load(out / f"rank{r}.pt", weights_only=True) for r in range(two_ranks.WORLD)]


@pytest.mark.parametrize("case", two_ranks.CASES)
def test_ranks_match_a_single_process_run(run, case):
    strategy, ranks = run
    if not ranks[0][case]:
        pytest.skip(f"{case} does not apply to {strategy}")
    reference = two_ranks.train_reference(case)
    initial = two_ranks.full_parameters(two_ranks.build(case)[0])
    for rank, result in enumerate(ranks):
        params = result[case]["params"]
        assert params.keys() == reference.keys()
        for name, value in params.items():
            torch.testing.assert_close(value, reference[name], rtol=1e-5, atol=1e-6, msg=f"rank {rank}: {name}")
            assert torch.equal(value, ranks[0][case]["params"][name]), f"ranks differ: {name}"
    assert any(not torch.equal(initial[name], value) for name, value in ranks[0][case]["params"].items())


@pytest.mark.parametrize("case", ["layer_drop", "wavlm_layer_drop"])
def test_a_layer_ran_on_zero_rows_on_one_rank_only(run, case):
    """The masks do what the cases need: some layer call had no rows on one rank and some on the other."""
    _, ranks = run
    rows = [ranks[r][case]["rows"] for r in range(two_ranks.WORLD)]
    assert len(rows[0]) == len(rows[1]), "every rank calls every layer"
    assert any(a == 0 < b for a, b in zip(*rows)) and any(b == 0 < a for a, b in zip(*rows))


def test_no_output_is_a_view_under_the_wrappers(run):
    """FSDP2 warns about (and an in-place op on a view defeats) a view output: none is returned,
    so the in-place case above also matches one process."""
    _, ranks = run
    counts = {case: result[case]["view_warnings"] for result in ranks for case in result if result[case]}
    assert counts and not any(counts.values()), counts
