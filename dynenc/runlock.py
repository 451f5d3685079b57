"""One job per run directory: an exclusive lock on ``<dir>/.dynenc.lock`` for a job's lifetime.

The lock is an OS file lock (``fcntl.flock``), which the kernel releases when its process ends
however it ends, so a killed job never leaves its directory locked. The file also records the
holder (host, PID, start time): a second job is refused with an error naming them, and a record
left by a job that died (the lock was free) is taken over with a warning. Under ``torchrun``
rank 0 holds the lock for the whole job and every rank learns the outcome, so all ranks fail
alike.

Typical use::

    with hold_run_directory(out_dir):
        ...  # write checkpoints, logs
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import socket
import time
import warnings
from pathlib import Path
from typing import Iterator, Optional

import torch.distributed as dist

from .errors import RunDirectoryLocked

__all__ = ["LOCK_FILE", "hold_run_directory"]

LOCK_FILE = ".dynenc.lock"


def _describe(holder: dict) -> str:
    started = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(holder.get("started", 0)))
    return f"host {holder.get('host', '?')}, PID {holder.get('pid', '?')}, started {started}"


def _read_holder(fd: int) -> Optional[dict]:
    os.lseek(fd, 0, os.SEEK_SET)
    text = os.read(fd, 4096).decode(errors="replace").strip()
    if not text:
        return None
    try:
        holder = json.loads(text)
    except json.JSONDecodeError:
        return {"host": "?", "pid": "?", "started": 0}
    return holder if isinstance(holder, dict) else None


def _write_holder(fd: int, holder: Optional[dict]) -> None:
    os.ftruncate(fd, 0)
    if holder is not None:
        os.pwrite(fd, json.dumps(holder).encode(), 0)
        os.fsync(fd)


def _acquire(directory: Path) -> int:
    """Lock ``directory`` for this process; the open lock file's descriptor."""
    directory.mkdir(parents=True, exist_ok=True)
    fd = os.open(directory / LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = _read_holder(fd)
        os.close(fd)
        who = _describe(holder) if holder else "holder unknown"
        raise RunDirectoryLocked(
            f"run directory {directory} is in use by another job ({who}); wait for it to "
            "end or choose another output directory"
        ) from None
    stale = _read_holder(fd)
    if stale is not None:
        warnings.warn(
            f"run directory {directory}: taking over the lock of a job that is gone ({_describe(stale)})", stacklevel=3
        )
    _write_holder(fd, {"host": socket.gethostname(), "pid": os.getpid(), "started": time.time()})
    return fd


@contextlib.contextmanager
def hold_run_directory(directory: Path, rank: int = 0, world: int = 1) -> Iterator[None]:
    """Hold ``directory``'s lock (creating the directory) while the block runs.

    Args:
        directory: the run directory.
        rank, world: this process's place in a ``torch.distributed`` job (the default process
            group must be initialised when ``world > 1``); rank 0 takes the lock for all.

    Raises:
        RunDirectoryLocked: another job holds it (on every rank of this job).
    """
    directory = Path(directory)
    fd, error = None, None
    if rank == 0:
        try:
            fd = _acquire(directory)
        except RunDirectoryLocked as locked:
            error = str(locked)
    if world > 1:
        outcome = [error]
        dist.broadcast_object_list(outcome, src=0)
        error = outcome[0]
    if error is not None:
        raise RunDirectoryLocked(error)
    try:
        yield
    finally:
        if fd is not None:
            _write_holder(fd, None)  # a clean end leaves no record to take over
            fcntl.flock(fd, fcntl.LOCK_UN)
            os.close(fd)
