"""The CTC speech model around ``DynamicConformer``, split by concern:

* :mod:`.frontend` — the 4x subsampling convolutional front-end;
* :mod:`.heads` — the modules beside the encoder (blank head, layer selector);
* :mod:`.ctc_model` — :class:`CTCModel` (front-end + encoder + heads);
* :mod:`.losses` — CTC loss, masked means, distillation KL;
* :mod:`.checkpoint` — atomic save / validated load.

Nothing here imports :mod:`dynenc.methods` (the methods build on this package).
"""
from ..config import ModelConfig
from .checkpoint import load_checkpoint, save_checkpoint
from .ctc_model import CTCModel
from .frontend import Conv2dSubsampling
from .heads import BlankHead, LayerSelector
from .losses import ctc_loss, distillation_kl, masked_mean

__all__ = [
    "BlankHead", "CTCModel", "Conv2dSubsampling", "LayerSelector", "ModelConfig", "ctc_loss", "distillation_kl",
    "load_checkpoint", "masked_mean", "save_checkpoint",
]
