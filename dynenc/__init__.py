"""dynenc: a dynamic-depth Conformer encoder with ragged per-sample / per-frame depth."""
import torch  # noqa: F401  (the C++ extension needs torch's symbols loaded first)

__version__ = "0.1.0"
