"""The CTC speech model around ``DynamicConformer`` and what trains it on any corpus, split by
concern:

* :mod:`.config` — :class:`ModelConfig` (and the layer / depth numbering convention);
* :mod:`.frontend` — the 4x subsampling convolutional front-end;
* :mod:`.heads` — the modules beside the encoder (blank head, layer selector);
* :mod:`.ctc_model` — :class:`CTCModel` (front-end + encoder + heads);
* :mod:`.losses` — CTC loss, masked means, distillation KL;
* :mod:`.checkpoint` — atomic save / validated load;
* :mod:`.manifest`, :mod:`.features`, :mod:`.tokenizer`, :mod:`.batching` — data directories
  (JSON-lines manifests), fbank and its cache, CTC units, length-sorted batches;
* :mod:`.prepare`, :mod:`.train`, :mod:`.evaluate` — ``dynenc prepare`` / ``train`` / ``eval``.

The model modules import nothing from :mod:`dynenc.methods` (the methods build on them); only
the training and evaluation commands use the methods. This package namespace exports the model
side; the commands' modules are imported by name.
"""

from .checkpoint import load_checkpoint, save_checkpoint
from .config import ModelConfig
from .ctc_model import CTCModel
from .frontend import Conv2dSubsampling
from .heads import CTCHead, LayerSelector
from .losses import ctc_loss, distillation_kl, masked_mean

__all__ = [
    "CTCHead",
    "CTCModel",
    "Conv2dSubsampling",
    "LayerSelector",
    "ModelConfig",
    "ctc_loss",
    "distillation_kl",
    "load_checkpoint",
    "masked_mean",
    "save_checkpoint",
]
