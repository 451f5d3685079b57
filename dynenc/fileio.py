"""Crash-safe file writes: a fsynced temp file in the target's directory, then ``os.replace``
(checkpoints, configs, caches)."""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import IO, Callable, Dict

Writer = Callable[[IO[bytes]], object]  # what it returns is ignored


def json_writer(obj: object) -> Writer:
    """A writer for :func:`atomic_write` of ``obj`` as indented JSON."""
    return lambda file: file.write((json.dumps(obj, indent=1) + "\n").encode())


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


def fsync_directory(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write(files: Dict[Path, Writer], remove_stale: bool = True) -> None:
    """Write every file of ``{path: write}`` or none of them: all temp files are complete
    before the first ``os.replace``. ``remove_stale`` first deletes temp files a killed earlier
    save left beside a path — only right when one process writes that path (a checkpoint);
    concurrent writers (ranks filling a cache) pass False."""
    if remove_stale:
        for path in files:
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
        fsync_directory(directory)
