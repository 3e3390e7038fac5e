"""Content keys of graph nodes and fingerprints of the files they read.

A key is ``sha256`` of the canonical JSON (sorted keys, no whitespace) of the node's kind, its
step's code version, the parameters it reads (its params minus what the step class declares
in ``key_exclude``: labels, checkpoint cadence, bitwise-neutral levers; see
:func:`key_params`) and its upstream (role, key) pairs, except the roles in
:data:`ORDER_ROLES`. Locations are not
content: a parameter ``path`` / ``pretrained`` with a sibling ``fingerprint``, or ``<x>_path``
with a sibling ``<x>_fingerprint``, is left out of the key and the fingerprint stands for it, so
moving the project keeps keys while another checkpoint at the same path changes them.
"""

from __future__ import annotations

import copy
import hashlib
import json
import os
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

# Small files are hashed whole; larger ones (checkpoints) by size plus head and tail, which
# distinguishes real checkpoints without reading gigabytes at plan time.
_WHOLE_LIMIT = 8 << 20
_EDGE = 1 << 20
_META_NAMES = {"metadata.jsonl", "metadata.csv"}
_SKIP_DIRS = {".git", ".cache", "__pycache__"}


# Dependencies that order a node and let it start from the upstream's saved state without
# changing its result: an attack segment's ``resume`` (the previous segment, which it
# continues bitwise and could equally recompute). Not in the key, so adding an evaluation step
# between two others leaves the later segment's key as it was.
ORDER_ROLES = frozenset({"resume"})


def canonical_json(obj: Any) -> str:
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=False)


def _sha_file(path: Path, size: int) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        if size <= _WHOLE_LIMIT:
            h.update(f.read())
        else:
            h.update(f.read(_EDGE))
            f.seek(size - _EDGE)
            h.update(f.read(_EDGE))
    return h.hexdigest()


def fingerprint(location: str, *, revision: str | None = None, variant: str | None = None) -> dict:
    """What identifies the data or weights at ``location`` (a file, a folder or a hub id).

    File: name, size, sha256 (of head+tail for files over 8 MiB). Folder: number of files,
    total bytes, sha256 of the sorted (relative name, size) listing, and the sha256 of every
    metadata / JSON config file in it. Hub id (``org/name`` that is not a local path): the id,
    revision and variant (any relative location is taken as a hub id). A path that does not exist: ``{"missing": <name>}``; such keys change
    once the data arrives.
    """
    p = Path(location)
    if not p.is_absolute():  # the resolve pass made every local path absolute
        return {"hub": location, "revision": revision or "main", "variant": variant}
    if p.is_file():
        size = p.stat().st_size
        return {"file": p.name, "size": size, "sha256": _sha_file(p, size)}
    if p.is_dir():
        listing: list[tuple[str, int]] = []
        small: dict[str, str] = {}
        for root, dirs, files in os.walk(p):
            dirs[:] = sorted(d for d in dirs if d not in _SKIP_DIRS)
            for fname in files:
                fp = Path(root, fname)
                rel = fp.relative_to(p).as_posix()
                size = fp.stat().st_size
                listing.append((rel, size))
                if (fname in _META_NAMES or fname.endswith(".json")) and size <= _WHOLE_LIMIT:
                    small[rel] = _sha_file(fp, size)
        listing.sort()
        return {
            "folder": p.name,
            "files": len(listing),
            "bytes": sum(s for _, s in listing),
            "listing_sha256": hashlib.sha256(canonical_json(listing).encode()).hexdigest(),
            "meta_sha256": small,
        }
    return {"missing": p.name}


def key_view(params: Any) -> Any:
    """``params`` without the location fields that a fingerprint stands for."""
    if isinstance(params, Mapping):
        out = {}
        for k, v in params.items():
            if k in ("path", "pretrained") and "fingerprint" in params:
                continue
            if k.endswith("_path") and f"{k[: -len('_path')]}_fingerprint" in params:
                continue
            out[k] = key_view(v)
        return out
    if isinstance(params, list | tuple):
        return [key_view(v) for v in params]
    return params


def _step_class(kind: str) -> Any:
    try:
        import resalign.steps  # noqa: F401  (registers the steps; torch-free at import)
    except ImportError:
        pass
    from ..steps.base import STEPS

    return STEPS.get(kind)


def step_version(kind: str) -> str:
    """The registered step's ``version`` ("1" while no step of that kind is registered)."""
    cls = _step_class(kind)
    return str(cls.version) if cls is not None else "1"


def drop_paths(params: Mapping[str, Any], paths: Iterable[str]) -> dict[str, Any]:
    """A deep copy of ``params`` without the dotted ``paths`` (absent paths are ignored)."""
    out = copy.deepcopy(dict(params))
    for path in paths:
        *parents, last = path.split(".")
        cur: Any = out
        for p in parents:
            cur = cur.get(p) if isinstance(cur, Mapping) else None
        if isinstance(cur, dict):
            cur.pop(last, None)
    return out


def key_params(kind: str, params: Mapping[str, Any]) -> dict[str, Any]:
    """The parameters of a ``kind`` node that enter its key: ``params`` without what its step
    declares it does not depend on. A step class declares ``key_exclude``: dotted paths into
    its params, or a function of the params returning them (for what depends on the method);
    without a declaration every parameter counts."""
    exclude = getattr(_step_class(kind), "key_exclude", ())
    if callable(exclude):
        exclude = exclude(params)
    return drop_paths(params, exclude)


def node_key(kind: str, params: Mapping[str, Any], upstream: Mapping[str, str]) -> str:
    """sha256 of kind, step version, the key view of the step's key parameters
    (:func:`key_params`) and sorted (role, upstream key) without :data:`ORDER_ROLES`."""
    payload = {
        "kind": kind,
        "version": step_version(kind),
        "params": key_view(key_params(kind, params)),
        "upstream": sorted(
            [role, key] for role, key in upstream.items() if role not in ORDER_ROLES
        ),
    }
    return hashlib.sha256(canonical_json(payload).encode()).hexdigest()
