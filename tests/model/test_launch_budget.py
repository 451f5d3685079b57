"""Kernel launches and host syncs of an inference forward, counted on CPU through a dispatch
mode (every non-view ATen or dynenc op is one launch on the CUDA path). The GPU path's budget:
<= 25 launches per layer and one host sync per forward (SPEC §9, issue #14)."""
import pytest
import torch

from dynenc import DynamicConformer

from dispatch_counting import CountOps, counting

MAX_LAUNCHES_PER_LAYER = 25


def count_forward(num_layers, routing):
    torch.manual_seed(0)
    model = DynamicConformer(input_dim=64, num_heads=4, ffn_dim=128, num_layers=num_layers,
                             depthwise_conv_kernel_size=15).eval()
    x, lengths = torch.randn(3, 50, 64), torch.tensor([50, 30, 10])
    with torch.no_grad(), counting(CountOps()) as counter:
        model(x, lengths, **routing(num_layers))
    return counter.launches, counter.syncs


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
