"""Checkpoints: ``<name>.pt`` holds state dicts (+ RNG and training state, for a bit-exact
resume) and ``<name>.json`` beside it the model's :class:`~dynenc.asr.ModelConfig`.

Both files are written atomically (a fsynced temp file in the same directory, then
``os.replace``), so a crash while saving leaves the previous checkpoint intact. Loading uses
``torch.load(..., weights_only=True)``; every way a file can be wrong is a ``ValueError``
naming the file.

Sharded checkpoints (FSDP2 training): ``<name>.dcp/`` is a ``torch.distributed.checkpoint``
directory: every rank writes its own shards of the model and optimizer; rank 0 adds the
model config (``config.json``) and the rest of the training state (``state.pt``, plain
``torch.save``). It is written to ``.<name>.dcp.tmp`` and renamed into place (the previous
one is moved aside first and removed after, and read if a crash came between the two
renames). :func:`load_checkpoint` loads either kind into a single-process
:class:`CTCModel`.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple

import torch
import torch.distributed as dist
from torch import nn

from ..config import config_json, load_config
from ..fileio import atomic_write, fsync_directory
from .config import ModelConfig
from .ctc_model import CTCModel

SHARDED_SUFFIX = ".dcp"
SHARDED_CONFIG = "config.json"
SHARDED_STATE = "state.pt"


def save_checkpoint(path: Path, model: CTCModel, optimizer: Optional[torch.optim.Optimizer] = None, **state) -> None:
    """Save ``model`` (+ ``optimizer`` and any extra ``state``) to ``path`` and its config beside."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    payload = {"model": model.state_dict(), "rng": torch.get_rng_state(), **state}
    if optimizer is not None:
        payload["optimizer"] = optimizer.state_dict()
    config_text = config_json(model.config)
    atomic_write(
        {
            path: lambda file: torch.save(payload, file),
            path.with_suffix(".json"): lambda file: file.write(config_text.encode()),
        }
    )


def read_model_config(path: Path) -> ModelConfig:
    """The :class:`ModelConfig` saved beside checkpoint ``path`` (inside a sharded one)."""
    path = Path(path)
    config_path = path / SHARDED_CONFIG if path.is_dir() else path.with_suffix(".json")
    try:
        return load_config(ModelConfig, config_path)
    except (TypeError, ValueError) as error:
        raise ValueError(f"checkpoint {path}: bad model config {config_path}: {error}") from error


def read_payload(path: Path, map_location: str = "cpu", key: Optional[str] = "model") -> dict:
    """The dictionary saved by :func:`save_checkpoint` (at least a ``key`` state dict, unless
    ``key`` is None)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {path} does not exist")
    try:
        payload = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as error:  # torch raises several types for a file that is not a checkpoint
        raise ValueError(f"cannot read checkpoint {path} with torch.load(weights_only=True): {error}") from error
    if not isinstance(payload, dict) or (key is not None and not isinstance(payload.get(key), dict)):
        found = sorted(payload) if isinstance(payload, dict) else type(payload).__name__
        wanted = "a dict" if key is None else f"a dict with a {key!r} state dict"
        raise ValueError(f"checkpoint {path} must hold {wanted}, got {found}")
    return payload


def check_shapes(module: nn.Module, state: dict, path: Path) -> None:
    """Raise ``ValueError`` naming ``path``, the first entry of ``state`` whose shape differs from
    ``module``'s entry of that name, and both shapes (entries only one side has are not compared)."""
    own = module.state_dict()
    for name, value in state.items():
        if name in own and hasattr(value, "shape") and tuple(value.shape) != tuple(own[name].shape):
            raise ValueError(
                f"checkpoint {path} does not match the model {type(module).__name__}: {name} has shape "
                f"{tuple(value.shape)} there and {tuple(own[name].shape)} here"
            )


def restore_state(module: nn.Module, state: dict, path: Path, strict: bool = True) -> List[str]:
    """``module.load_state_dict(state, strict)`` naming ``path`` (and, for a shape, the first
    mismatched entry) when they do not match; the names of ``module``'s entries ``state`` lacks."""
    check_shapes(module, state, path)
    try:
        return list(module.load_state_dict(state, strict=strict).missing_keys)
    except RuntimeError as error:
        raise ValueError(
            f"checkpoint {path} does not match the model {type(module).__name__} built from its config: {error}"
        ) from error


def load_checkpoint(path: Path, map_location: str = "cpu") -> Tuple[CTCModel, dict]:
    """``(model, payload)`` of a checkpoint written by :func:`save_checkpoint`, or of a sharded
    one (a ``.dcp`` directory written by :func:`save_sharded_checkpoint`, gathered into one
    process; its payload then holds the model and the scalar entries)."""
    path = Path(path)
    if path.suffix == SHARDED_SUFFIX:
        return load_sharded_checkpoint(path)
    payload = read_payload(path, map_location)
    model = CTCModel(read_model_config(path))
    restore_state(model, payload["model"], path)
    return model, payload


def find_checkpoint(run_dir: Path, name: str) -> Optional[Path]:
    """``run_dir/<name>.pt``, else the sharded ``run_dir/<name>.dcp`` (or the copy a crash
    left aside while replacing it), else None."""
    plain = Path(run_dir) / f"{name}.pt"
    if plain.is_file():
        return plain
    sharded = Path(run_dir) / f"{name}{SHARDED_SUFFIX}"
    return sharded if sharded.is_dir() or _aside(sharded).is_dir() else None


def _aside(path: Path) -> Path:
    return path.with_name(f".{path.name}.old")


def _readable(path: Path) -> Path:
    """A sharded checkpoint's directory, or the previous one if a crash came between the renames."""
    if path.is_dir():
        return path
    if _aside(path).is_dir():
        return _aside(path)
    raise FileNotFoundError(f"sharded checkpoint {path} does not exist")


def save_sharded_checkpoint(
    path: Path,
    model: nn.Module,
    config_model: CTCModel,
    optimizer: Optional[torch.optim.Optimizer] = None,
    **state: Any,
) -> None:
    """Collective (every rank calls it): save FSDP2-sharded ``model`` (+ ``optimizer``) as the
    DCP directory ``path``, and any extra ``state`` (rank 0's; a dict of tensors and plain
    values, the same on every rank) beside the shards.

    ``model`` is the sharded :class:`CTCModel` (``config_model`` names the one whose config
    is stored; the same module in the recipe). Every rank writes its own shards: ``path``
    must be on a file system every rank sees.
    """
    from torch.distributed.checkpoint import save
    from torch.distributed.checkpoint.state_dict import get_model_state_dict, get_state_dict

    path = Path(path)
    temp = path.with_name(f".{path.name}.tmp")
    leader = dist.get_rank() == 0
    if leader:
        shutil.rmtree(temp, ignore_errors=True)  # leftovers of a save that was killed
        temp.mkdir(parents=True)
    dist.barrier()
    if optimizer is None:
        payload: Dict[str, Any] = {"model": get_model_state_dict(model)}
    else:
        model_state, optimizer_state = get_state_dict(model, optimizer)
        payload = {"model": model_state, "optimizer": optimizer_state}
    save(payload, checkpoint_id=temp)
    if leader:
        atomic_write(
            {
                temp / SHARDED_CONFIG: lambda file: file.write(config_json(config_model.config).encode()),
                temp / SHARDED_STATE: lambda file: torch.save(state, file),
            }
        )
        aside = _aside(path)
        shutil.rmtree(aside, ignore_errors=True)
        if path.exists():
            os.rename(path, aside)
        os.rename(temp, path)
        fsync_directory(path.parent)
        shutil.rmtree(aside, ignore_errors=True)
    dist.barrier()


def load_sharded_state(path: Path, model: nn.Module, optimizer: Optional[torch.optim.Optimizer] = None) -> dict:
    """Load the sharded checkpoint ``path`` into ``model`` (sharded or not; a collective under
    a process group) and ``optimizer``; returns the extra state saved with it."""
    from torch.distributed.checkpoint import load
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

    path = Path(path)
    directory = _readable(path)
    model_state, optimizer_state = get_state_dict(model, optimizer if optimizer is not None else [])
    wanted: Dict[str, Any] = {"model": model_state}
    if optimizer is not None:
        wanted["optimizer"] = optimizer_state
    try:
        load(wanted, checkpoint_id=directory)
    except Exception as error:  # DCP raises several types for a missing or mismatched entry
        raise ValueError(f"cannot load sharded checkpoint {path} into {type(model).__name__}: {error}") from error
    set_state_dict(
        model,
        optimizer if optimizer is not None else [],
        model_state_dict=wanted["model"],
        optim_state_dict=wanted.get("optimizer", {}),
    )
    return read_payload(directory / SHARDED_STATE, key=None)


def load_sharded_checkpoint(path: Path) -> Tuple[CTCModel, dict]:
    """``(model, payload)`` of a sharded checkpoint, gathered into this process (no process
    group needed): the model built from its config; ``payload`` its state dict and the extra
    state saved with it (``epoch``, ...)."""
    model = CTCModel(read_model_config(_readable(Path(path))))
    state = load_sharded_state(path, model)
    return model, {**state, "model": model.state_dict()}
