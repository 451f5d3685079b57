"""dynenc: a dynamic-depth Conformer encoder with ragged per-sample / per-frame depth.

Layout: ``dynenc.ops`` (the op registry: one module per op with its plain-PyTorch reference;
C++ ``dynenc._C`` on CPU, Triton ``dynenc.kernels`` on CUDA), ``dynenc.routing`` (packing,
routing plans), ``dynenc.model`` (``DynamicConformer``; its layer in ``dynenc.layer``);
docs/architecture.md has the map.
"""

import torch  # noqa: F401  (the C++ extension needs torch's symbols loaded first)

from . import ops, routing
from .foundation import from_huggingface, from_torchaudio
from .layer import DynamicConformerLayer
from .model import DynamicConformer, EncoderOutput, ExecutedWork
from .ops import current_backend, use_backend
from .routing import LayerRoute, PackedBatch, Schedule, VarlenBatch, pack

__version__ = "0.1.0"  # the one place: pyproject.toml reads it (static, without importing dynenc)

__all__ = [
    "DynamicConformer",
    "DynamicConformerLayer",
    "EncoderOutput",
    "ExecutedWork",
    "LayerRoute",
    "PackedBatch",
    "Schedule",
    "VarlenBatch",
    "current_backend",
    "from_huggingface",
    "from_torchaudio",
    "ops",
    "pack",
    "routing",
    "use_backend",
]
