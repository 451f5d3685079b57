"""The plan sizes the forward computes on the host (``HostSizes``, from its one read of
lengths / depth / layer_mask) equal what the device plan computes: N, each layer's prefix
(sequences, rows) for ``depth`` and the ``build_plan`` offsets for ``layer_mask``."""
import pytest
import torch

import dynenc
from dynenc import ops
from dynenc.routing import HostSizes, Schedule, pack

NUM_LAYERS, MAX_FRAMES = 4, 7


def ragged_batches():
    """Ragged batches with zero-length samples, all-false mask rows and columns, depth 0 and L."""
    gen = torch.Generator().manual_seed(0)
    batches = []
    for batch_size in (1, 2, 5, 9):
        for _ in range(4):
            lengths = torch.randint(0, MAX_FRAMES + 1, (batch_size,), generator=gen)
            lengths[0] = 0
            depth = torch.randint(0, NUM_LAYERS + 1, (batch_size,), generator=gen)
            depth[-1] = NUM_LAYERS
            if batch_size > 1:
                depth[1] = 0
            mask = torch.rand(batch_size, NUM_LAYERS, generator=gen) < 0.5
            mask[-1] = False  # a sample that runs no layer
            mask[:, 1] = False  # a layer no sample runs
            batches.append((lengths, depth, mask))
    batches.append((torch.zeros(3, dtype=torch.int64), torch.zeros(3, dtype=torch.int64),
                    torch.ones(3, NUM_LAYERS, dtype=torch.bool)))
    return batches


@pytest.mark.parametrize("lengths,depth,mask", ragged_batches())
def test_host_sizes_equal_the_device_plan(lengths, depth, mask):
    x = torch.randn(lengths.shape[0], MAX_FRAMES, 8)

    full = HostSizes.from_inputs(lengths.tolist(), NUM_LAYERS)
    packed = pack(x, lengths)
    assert full.num_rows == packed.batch.num_rows
    assert full.layer_seqs == (lengths.shape[0],) * NUM_LAYERS
    assert full.layer_rows == (packed.batch.num_rows,) * NUM_LAYERS

    # depth: samples sorted by depth, each layer runs a prefix of sequences and rows.
    sizes = HostSizes.from_inputs(lengths.tolist(), NUM_LAYERS, depth=depth.tolist())
    order = torch.sort(depth, descending=True, stable=True).indices
    packed = pack(x, lengths, order)
    assert sizes.num_rows == packed.batch.num_rows
    packed_depth = packed.to_packed_order(depth)
    active_seqs = [int((packed_depth > layer).sum()) for layer in range(NUM_LAYERS)]
    assert list(sizes.layer_seqs) == active_seqs
    assert list(sizes.layer_rows) == [int(packed.batch.cu_seqlens[n]) for n in active_seqs]
    schedule = Schedule(packed.batch, NUM_LAYERS, depth=packed_depth)
    assert_same_routes(schedule.replace(sizes=sizes).routes(), schedule.routes())

    # layer_mask: the build_plan offsets are the cumulative sum of the host row counts.
    sizes = HostSizes.from_inputs(lengths.tolist(), NUM_LAYERS, layer_mask=mask.tolist())
    packed = pack(x, lengths)
    row_mask = mask.index_select(0, packed.batch.seq_ids).t().contiguous()
    _, offsets, _ = ops.build_plan(row_mask, packed.batch.cu_seqlens)
    assert offsets.tolist() == [0, *torch.tensor(sizes.layer_rows).cumsum(0).tolist()]
    schedule = Schedule(packed.batch, NUM_LAYERS, sample_mask=mask)
    for start in (0, 2):
        assert_same_routes(schedule.replace(sizes=sizes).routes(start), schedule.routes(start))


def assert_same_routes(host, device):
    assert len(host) == len(device)
    for a, b in zip(host, device):
        if a is None or b is None:
            assert a is None and b is None
            continue
        assert (a.num_rows, a.batch.num_seqs) == (b.num_rows, b.batch.num_seqs)
        assert torch.equal(a.batch.cu_seqlens, b.batch.cu_seqlens)
        assert torch.equal(a.batch.seq_ids, b.batch.seq_ids)
        assert (a.index is None) == (b.index is None)
        if a.index is not None:
            assert torch.equal(a.index, b.index)


def test_replace_drops_sizes_when_what_runs_changes():
    packed = pack(torch.randn(2, 3, 4), torch.tensor([3, 1]))
    sizes = HostSizes.from_inputs([3, 1], 2, layer_mask=[[1, 1], [1, 0]])
    schedule = Schedule(packed.batch, 2, sample_mask=torch.tensor([[True, True], [True, False]]), sizes=sizes)
    assert schedule.replace(gates=torch.ones(2, 2)).sizes is sizes
    assert schedule.replace(sample_mask=torch.ones(2, 2, dtype=torch.bool)).sizes is None
    assert schedule.replace(row_alive=torch.ones(4, dtype=torch.bool)).sizes is None


@pytest.mark.parametrize("routing", ["full", "depth", "layer_mask"])
def test_forward_with_host_sizes_matches_device_sizes(routing):
    """The forward (host sizes) gives the routes of a forward whose plan syncs for its sizes."""
    torch.manual_seed(0)
    model = dynenc.DynamicConformer(input_dim=16, num_heads=2, ffn_dim=32, num_layers=NUM_LAYERS,
                                    depthwise_conv_kernel_size=3).eval()
    lengths, depth, mask = ragged_batches()[10]
    x = torch.randn(lengths.shape[0], MAX_FRAMES, 16)
    kwargs = {"full": {}, "depth": {"depth": depth}, "layer_mask": {"layer_mask": mask}}[routing]
    with torch.no_grad():
        out = model(x, lengths, return_report=True, **kwargs)
        device_schedule = Schedule(out.packed.batch, NUM_LAYERS,  # no sizes: the plan reads them on the device
                                   depth=out.packed.to_packed_order(depth) if routing == "depth" else None,
                                   sample_mask=mask if routing == "layer_mask" else None)
    assert out.report.total_tokens == int(lengths.sum())
    assert_same_routes(out.routes, device_schedule.routes())


def test_validation_reads_no_value_on_the_host_the_routing_reads_once(monkeypatch):
    """The forward's one host sync belongs to the routing (it sizes the plan); checking the
    arguments reads nothing back."""
    from dynenc import validation
    from dynenc.routing import read_host_inputs

    x, lengths = torch.randn(3, MAX_FRAMES, 8), torch.tensor([7, 0, 4])
    depth, mask = torch.tensor([4, 1, 0]), torch.rand(3, NUM_LAYERS) < 0.5
    reads = []
    for name in ("tolist", "item"):
        real = getattr(torch.Tensor, name)
        monkeypatch.setattr(torch.Tensor, name, lambda self, real=real, name=name: reads.append(name) or real(self))
    frames = validation.check_encoder_inputs(x, lengths, 8, NUM_LAYERS, torch.float32, depth=depth)
    validation.check_encoder_inputs(x, lengths, 8, NUM_LAYERS, torch.float32, layer_mask=mask)
    assert reads == []
    host = read_host_inputs(frames, depth, None)
    assert reads == ["tolist"] and host.lengths == [7, 0, 4] and host.depth == [4, 1, 0]
    assert read_host_inputs(frames, None, mask).layer_mask == mask.long().tolist()
    with pytest.raises(ValueError, match=r"depth must lie in \[0, num_layers=4\], got min 0 max 5"):
        validation.check_host_ranges([1, 2], [5, 0], MAX_FRAMES, NUM_LAYERS)


def test_every_route_knows_its_rows_sequences():
    lengths, mask = torch.tensor([3, 0, 5, 2]), torch.tensor([[1, 0], [1, 1], [0, 1], [1, 1]], dtype=torch.bool)
    packed = pack(torch.randn(4, 5, 8), lengths)
    for depth, sample_mask in ((torch.tensor([2, 1, 1, 0]), None), (None, mask)):
        schedule = Schedule(packed.batch, 2, depth=depth, sample_mask=sample_mask)
        for route in schedule.routes():
            batch = route.batch
            assert torch.equal(batch.seq_ids, ops.rows.sequence_ids(batch.cu_seqlens, batch.num_rows))
