"""Checkpoints: ``<name>.pt`` holds state dicts (+ RNG and training state, for a bit-exact
resume) and ``<name>.json`` beside it the model's :class:`~dynenc.config.ModelConfig`.

Both files are written atomically (a fsynced temp file in the same directory, then
``os.replace``), so a crash while saving leaves the previous checkpoint intact. Loading uses
``torch.load(..., weights_only=True)``; every way a file can be wrong is a ``ValueError``
naming the file.
"""
from __future__ import annotations

import json
import os
import tempfile
from dataclasses import asdict
from pathlib import Path
from typing import IO, Callable, Dict, Optional, Tuple

import torch
from torch import nn

from ..config import ModelConfig, load_config
from .ctc_model import CTCModel

Writer = Callable[[IO[bytes]], None]


def _write_temp(path: Path, write: Writer) -> Path:
    """Run ``write`` on a new temp file beside ``path``, flushed and fsynced; its path."""
    fd, name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as file:
            write(file)
            file.flush()
            os.fsync(file.fileno())
    except BaseException:
        os.unlink(name)
        raise
    return Path(name)


def atomic_write(files: Dict[Path, Writer]) -> None:
    """Write every file of ``{path: write}`` or none of them: all temp files are complete
    before the first ``os.replace``."""
    for path in files:  # leftovers of a save that was killed (one writer per path)
        for stale in path.parent.glob(f".{path.name}.*.tmp"):
            stale.unlink(missing_ok=True)
    temps = []
    try:
        for path, write in files.items():
            temps.append((_write_temp(path, write), path))
    except BaseException:
        for temp, _ in temps:
            temp.unlink()
        raise
    for temp, path in temps:
        os.replace(temp, path)
    for directory in {path.parent for path in files}:  # make the renames durable too
        fd = os.open(directory, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def save_checkpoint(path: Path, model: CTCModel, optimizer: Optional[torch.optim.Optimizer] = None, **state) -> None:
    """Save ``model`` (+ ``optimizer`` and any extra ``state``) to ``path`` and its config beside."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    payload = {"model": model.state_dict(), "rng": torch.get_rng_state(), **state}
    if optimizer is not None:
        payload["optimizer"] = optimizer.state_dict()
    config_text = json.dumps(asdict(model.config), indent=2) + "\n"
    atomic_write({path: lambda file: torch.save(payload, file),
                  path.with_suffix(".json"): lambda file: file.write(config_text.encode())})


def read_model_config(path: Path) -> ModelConfig:
    """The :class:`ModelConfig` saved beside checkpoint ``path``."""
    config_path = Path(path).with_suffix(".json")
    try:
        return load_config(ModelConfig, config_path)
    except (TypeError, ValueError) as error:
        raise ValueError(f"checkpoint {path}: bad model config {config_path}: {error}") from error


def read_payload(path: Path, map_location: str = "cpu") -> dict:
    """The dictionary saved by :func:`save_checkpoint` (at least a ``model`` state dict)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {path} does not exist")
    try:
        payload = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as error:  # torch raises several types for a file that is not a checkpoint
        raise ValueError(f"cannot read checkpoint {path} with torch.load(weights_only=True): {error}") from error
    if not isinstance(payload, dict) or not isinstance(payload.get("model"), dict):
        found = sorted(payload) if isinstance(payload, dict) else type(payload).__name__
        raise ValueError(f"checkpoint {path} must hold a dict with a 'model' state dict, got {found}")
    return payload


def restore_state(module: nn.Module, state: dict, path: Path) -> None:
    """``module.load_state_dict(state, strict=True)`` naming ``path`` when they do not match."""
    try:
        module.load_state_dict(state, strict=True)
    except RuntimeError as error:
        raise ValueError(f"checkpoint {path} does not match the model {type(module).__name__} built from its "
                         f"config: {error}") from error


def load_checkpoint(path: Path, map_location: str = "cpu") -> Tuple[CTCModel, dict]:
    """``(model, payload)`` of a checkpoint written by :func:`save_checkpoint`."""
    payload = read_payload(path, map_location)
    model = CTCModel(read_model_config(path))
    restore_state(model, payload["model"], path)
    return model, payload
