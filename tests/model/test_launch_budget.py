"""Kernel launches and host syncs of an inference forward, counted on CPU through a dispatch
mode (every non-view ATen or dynenc op is one launch on the CUDA path). The GPU path's budget:
<= 25 launches per layer and one host sync per forward (SPEC §9, issue #14)."""
import collections
import contextlib

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from dynenc import DynamicConformer

# Ops that only re-describe memory (no launch on CUDA).
VIEWS = {"aten.t", "aten.view", "aten.squeeze", "aten.unsqueeze", "aten.select", "aten.slice", "aten.unbind",
         "aten.alias", "aten.expand", "aten.permute", "aten.transpose", "aten._unsafe_view", "aten.as_strided",
         "aten.detach", "aten.split", "aten.split_with_sizes", "aten.unflatten", "aten.reshape"}
# Ops that make the host wait for the device.
SYNCS = {"aten._local_scalar_dense", "aten.nonzero", "aten.masked_select", "aten.item"}
MAX_LAUNCHES_PER_LAYER = 25


class CountOps(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.ops = collections.Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops[str(func.overloadpacket)] += 1
        return func(*args, **(kwargs or {}))


@contextlib.contextmanager
def counting_tolist(counter):
    """``Tensor.tolist`` reads CPU memory without dispatching an op; on CUDA it is a sync."""
    original = torch.Tensor.tolist

    def tolist(self):
        counter["tolist"] += 1
        return original(self)

    torch.Tensor.tolist = tolist
    try:
        yield
    finally:
        torch.Tensor.tolist = original


def count_forward(num_layers, routing):
    torch.manual_seed(0)
    model = DynamicConformer(input_dim=64, num_heads=4, ffn_dim=128, num_layers=num_layers,
                             depthwise_conv_kernel_size=15).eval()
    x, lengths = torch.randn(3, 50, 64), torch.tensor([50, 30, 10])
    counter = CountOps()
    with torch.no_grad(), counter, counting_tolist(counter.ops):
        model(x, lengths, **routing(num_layers))
    launches = sum(n for op, n in counter.ops.items()
                   if op not in VIEWS | SYNCS | {"tolist"} and not op.startswith("profiler."))  # record_function
    syncs = sum(counter.ops[op] for op in SYNCS | {"tolist"})
    return launches, syncs


ROUTINGS = {
    "full": lambda layers: {},
    "depth": lambda layers: {"depth": torch.tensor([layers, layers // 2, 1])},
    "layer_mask": lambda layers: {"layer_mask": torch.ones(3, layers, dtype=torch.bool).index_fill_(0, torch.tensor([1]),
                                                                                                    False)},
}


@pytest.mark.parametrize("routing", ROUTINGS.values(), ids=ROUTINGS.keys())
def test_launches_per_layer_and_host_syncs_per_forward(routing):
    (short, short_syncs), (deep, deep_syncs) = count_forward(2, routing), count_forward(4, routing)
    per_layer = (deep - short) / 2
    assert per_layer <= MAX_LAUNCHES_PER_LAYER, f"{per_layer} launches per layer"
    assert short_syncs == deep_syncs == 1, f"{short_syncs}, {deep_syncs} host syncs per forward"
