"""The one JSON loader for every configuration dataclass (the model's
:class:`dynenc.asr.ModelConfig`, training's ``TrainConfig``, the bench's ``BenchConfig``).

A dataclass may list ``renamed_fields = {"old": "new"}`` (a ``ClassVar``): files written
before a rename still load, their old keys read as the new ones.
"""

from __future__ import annotations

import dataclasses
import json
import typing
from dataclasses import asdict
from pathlib import Path
from typing import Any, Dict, Mapping, Tuple, Type, TypeVar, cast

from .fileio import atomic_write

Config = TypeVar("Config")


def _expected_type(annotation: Any) -> Tuple[type, ...]:
    """The runtime types a field annotation admits (``int`` also for ``float`` fields)."""
    origin = typing.get_origin(annotation)
    if origin in (tuple, Tuple):
        return (list, tuple)
    if origin is dict or annotation is dict:
        return (dict,)
    if annotation is float:
        return (int, float)
    return (annotation,)


def config_from_dict(cls: Type[Config], data: Mapping[str, Any], what: str) -> Config:
    """Build dataclass ``cls`` from a JSON-like mapping, naming the first bad key or value.

    Unknown keys and ``null`` values raise ``ValueError``, values of the wrong type
    ``TypeError``, naming ``what`` (e.g. the file) and the field. Keys in ``cls.renamed_fields``
    are read under their new names.
    """
    if not isinstance(data, Mapping):
        raise TypeError(f"{what} must be a JSON object, got {type(data).__name__}")
    renamed: Mapping[str, str] = getattr(cls, "renamed_fields", {})
    data = {renamed.get(key, key): value for key, value in data.items()}
    fields = {f.name: f for f in dataclasses.fields(cast(Any, cls))}
    unknown = sorted(set(data) - set(fields))
    if unknown:
        raise ValueError(f"{what} has unknown keys {unknown}; expected a subset of {sorted(fields)}")
    hints = typing.get_type_hints(cls)
    values: Dict[str, Any] = {}
    for name, value in data.items():
        nested: Any = hints[name]
        if isinstance(nested, type) and dataclasses.is_dataclass(nested) and isinstance(value, Mapping):
            values[name] = config_from_dict(nested, value, f"{what} field {name!r}")
            continue
        expected = _expected_type(nested)
        if value is None or isinstance(value, bool) != (bool in expected) or not isinstance(value, expected):
            names = " or ".join(t.__name__ for t in expected)
            raise TypeError(f"{what} field {name!r} must be {names}, got {value!r}")
        values[name] = tuple(cast(Any, value)) if list in expected else value
    return cls(**values)


def load_config(cls: Type[Config], path: Path) -> Config:
    """Read dataclass ``cls`` from the JSON file ``path`` (see :func:`config_from_dict`)."""
    try:
        data = json.loads(Path(path).read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise ValueError(f"cannot read config file {path}: {error}") from error
    return config_from_dict(cls, data, f"config file {path}")


def config_json(config: Any) -> str:
    """The JSON text of a configuration dataclass (what :func:`load_config` reads back)."""
    return json.dumps(asdict(config), indent=2) + "\n"


def save_config(config: Any, path: Path) -> None:
    atomic_write({Path(path): lambda file: file.write(config_json(config).encode())})
