"""Triton GPU kernels of the dynenc ops (importable as ``dynenc.kernels``)."""
