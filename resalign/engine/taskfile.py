"""The task file of a node run under torchrun, as data: JSON, never a pickle.

The driver writes ``runs/launch/<kind>/<key>/task.json`` for its ranks (see :mod:`.launch`).
Anyone who can write to a shared store could once have run code through the pickle that was
there; now a rank reads JSON and rebuilds the task from it with :func:`decode`, which only
creates plain values (str, numbers, lists, dicts, tuples, paths), dataclass instances and
pydantic models (validated from their JSON dump), and imports a class only by the module and
name recorded, from what is installed (code never comes from the store itself).
"""

from __future__ import annotations

import dataclasses
import importlib
import json
from pathlib import Path
from typing import Any

FORMAT = 1


def _qualname(cls: type) -> str:
    return f"{cls.__module__}:{cls.__qualname__}"


def encode(value: Any) -> Any:
    """``value`` as JSON-able data that :func:`decode` turns back into an equal value."""
    from pydantic import BaseModel

    if value is None or isinstance(value, bool | int | float | str):
        return value
    if isinstance(value, Path):
        return {"__path__": str(value)}
    if isinstance(value, BaseModel):
        return {"__model__": _qualname(type(value)), "data": value.model_dump(mode="json")}
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {
            "__dataclass__": _qualname(type(value)),
            "fields": {f.name: encode(getattr(value, f.name)) for f in dataclasses.fields(value)},
        }
    if isinstance(value, tuple):
        return {"__tuple__": [encode(v) for v in value]}
    if isinstance(value, list):
        return [encode(v) for v in value]
    if isinstance(value, dict) or hasattr(value, "items"):
        return {"__items__": [[encode(k), encode(v)] for k, v in value.items()]}
    if isinstance(value, set | frozenset):
        return {"__set__": [encode(v) for v in sorted(value, key=repr)]}
    raise TypeError(f"cannot write a {type(value).__name__} into a task file: {value!r:.80}")


def _class(name: str, kind: str) -> type:
    module, _, qual = name.partition(":")
    obj: Any = importlib.import_module(module)
    for part in qual.split("."):
        obj = getattr(obj, part)
    if not isinstance(obj, type):
        raise TypeError(f"task file names {name!r}, which is not a class")
    from pydantic import BaseModel

    if kind == "model" and not issubclass(obj, BaseModel):
        raise TypeError(f"task file names {name!r} as a pydantic model; it is not one")
    if kind == "dataclass" and not dataclasses.is_dataclass(obj):
        raise TypeError(f"task file names {name!r} as a dataclass; it is not one")
    return obj


def decode(data: Any) -> Any:
    """The inverse of :func:`encode`."""
    if isinstance(data, list):
        return [decode(v) for v in data]
    if not isinstance(data, dict):
        return data
    if "__path__" in data:
        return Path(data["__path__"])
    if "__model__" in data:
        return _class(data["__model__"], "model").model_validate(data["data"])
    if "__dataclass__" in data:
        cls = _class(data["__dataclass__"], "dataclass")
        fields = {k: decode(v) for k, v in data["fields"].items()}
        init = {f.name for f in dataclasses.fields(cls) if f.init}
        obj = cls(**{k: v for k, v in fields.items() if k in init})
        for k, v in fields.items():
            if k not in init:
                object.__setattr__(obj, k, v)
        return obj
    if "__tuple__" in data:
        return tuple(decode(v) for v in data["__tuple__"])
    if "__set__" in data:
        return {decode(v) for v in data["__set__"]}
    if "__items__" in data:
        return {_hashable(decode(k)): decode(v) for k, v in data["__items__"]}
    raise ValueError(f"unknown entry in task file: {sorted(data)[:5]}")


def _hashable(k: Any) -> Any:
    return tuple(k) if isinstance(k, list) else k


def dumps_task(task: Any, staging: Path) -> str:
    """The task file's text for ``task`` (a NodeTask) and the staging folder of rank 0."""
    return json.dumps(
        {"format": FORMAT, "staging": str(staging), "task": encode(task)}, sort_keys=True
    )


def loads_task(text: str) -> tuple[Any, Path]:
    """``(task, staging)`` from a task file's text."""
    payload = json.loads(text)
    if payload.get("format") != FORMAT:
        raise ValueError(f"task file format {payload.get('format')!r}, expected {FORMAT}")
    return decode(payload["task"]), Path(payload["staging"])
