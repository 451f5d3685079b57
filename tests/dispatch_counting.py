"""Counting what a forward dispatches: launches (every non-view ATen or dynenc op is one
kernel launch on the CUDA path) and host syncs (ops that make the host wait for the device,
plus ``Tensor.tolist``, which reads CPU memory without dispatching but syncs on CUDA)."""
import collections
import contextlib

import torch
from torch.utils._python_dispatch import TorchDispatchMode

# Ops that only re-describe memory (no launch on CUDA).
VIEWS = {"aten.t", "aten.view", "aten.squeeze", "aten.unsqueeze", "aten.select", "aten.slice", "aten.unbind",
         "aten.alias", "aten.expand", "aten.permute", "aten.transpose", "aten._unsafe_view", "aten.as_strided",
         "aten.detach", "aten.split", "aten.split_with_sizes", "aten.unflatten", "aten.reshape"}
# Ops that make the host wait for the device.
SYNCS = {"aten._local_scalar_dense", "aten.nonzero", "aten.masked_select", "aten.item"}


class CountOps(TorchDispatchMode):
    """``ops``: op packet name -> calls, for everything dispatched inside the mode."""

    def __init__(self):
        super().__init__()
        self.ops = collections.Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops[str(func.overloadpacket)] += 1
        return func(*args, **(kwargs or {}))

    @property
    def launches(self) -> int:
        return sum(n for op, n in self.ops.items()
                   if op not in VIEWS | SYNCS | {"tolist"} and not op.startswith("profiler."))  # record_function

    @property
    def syncs(self) -> int:
        return sum(self.ops[op] for op in SYNCS | {"tolist"})


@contextlib.contextmanager
def counting(counter: CountOps):
    """``counter`` active, with ``Tensor.tolist`` counted as a sync."""
    original = torch.Tensor.tolist

    def tolist(self):
        counter.ops["tolist"] += 1
        return original(self)

    torch.Tensor.tolist = tolist
    try:
        with counter:
            yield counter
    finally:
        torch.Tensor.tolist = original
