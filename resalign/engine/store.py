"""The local store: the source of truth for every node's results.

Layout (see docs/architecture.md)::

    runs/<kind>/<key>/          a completed node: its outputs, node.json, metrics.jsonl, DONE
    runs/<kind>/.tmp-<key>-*    staging folders of nodes being executed (or killed mid-way)
    runs/state/<kind>/<key>/    resume checkpoints and the live metrics.jsonl of a running node
    runs/index/<spec>.json      node name -> last key and params (explains "parameter changed")
    runs/locks/                 one lock file per key being executed (concurrent invocations)

A node is complete exactly when ``runs/<kind>/<key>/DONE`` exists. The step writes into a
staging folder; the engine writes ``DONE`` into it last (after fsync of every file) and then
renames the whole folder into place, so a crash at any moment leaves either nothing or a
complete result at the final path, never a half-written one that looks complete.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import shutil
import tempfile
import uuid
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

DONE = "DONE"


def fsync_dir(path: Path) -> None:
    """fsync a directory so that renames and creations inside it are durable."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` through a temporary name in the same folder, fsync, rename."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    fsync_dir(path.parent)


def atomic_write_text(path: Path, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: Path, obj: Any) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=True, default=str) + "\n")


def read_json(path: Path, default: Any = None) -> Any:
    try:
        return json.loads(Path(path).read_text(encoding="utf-8"))
    except FileNotFoundError:
        return default


def fsync_tree(root: Path) -> None:
    """fsync every file and folder under ``root`` (before it is declared complete)."""
    for dirpath, _dirnames, filenames in os.walk(root):
        for name in filenames:
            p = os.path.join(dirpath, name)
            if os.path.islink(p):
                continue
            fd = os.open(p, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        fsync_dir(Path(dirpath))


class Store:
    """Keyed, atomic storage of node results under ``root`` (normally ``runs/``)."""

    def __init__(self, root: Path | str):
        self.root = Path(root).resolve()

    # -- paths ---------------------------------------------------------------------------
    def node_dir(self, kind: str, key: str) -> Path:
        return self.root / kind / key

    def state_dir(self, kind: str, key: str) -> Path:
        return self.root / "state" / kind / key

    def index_path(self, spec_name: str) -> Path:
        return self.root / "index" / f"{spec_name}.json"

    def is_complete(self, kind: str, key: str) -> bool:
        return (self.node_dir(kind, key) / DONE).is_file()

    def has_state(self, kind: str, key: str) -> bool:
        d = self.state_dir(kind, key)
        return d.is_dir() and any(p.name != "metrics.jsonl" for p in d.iterdir())

    # -- staging and commit --------------------------------------------------------------
    def new_staging(self, kind: str, key: str) -> Path:
        """A fresh staging folder for ``key``; stale ones left by killed runs are removed."""
        parent = self.root / kind
        parent.mkdir(parents=True, exist_ok=True)
        for stale in parent.glob(f".tmp-{key}-*"):
            shutil.rmtree(stale, ignore_errors=True)
        d = parent / f".tmp-{key}-{uuid.uuid4().hex[:8]}"
        d.mkdir()
        return d

    def commit(self, staging: Path, kind: str, key: str) -> Path:
        """Make ``staging`` the complete result of ``key``: fsync all, write DONE, rename.

        An existing result (a forced re-run) is moved aside first and deleted after the new
        one is in place, so at every moment the final path holds a complete result or none.
        """
        fsync_tree(staging)
        atomic_write_text(staging / DONE, "ok\n")
        final = self.node_dir(kind, key)
        trash = None
        if final.exists():
            trash = final.parent / f".old-{key}-{uuid.uuid4().hex[:8]}"
            os.replace(final, trash)
        os.replace(staging, final)
        fsync_dir(final.parent)
        if trash is not None:
            shutil.rmtree(trash, ignore_errors=True)
        return final

    def discard_state(self, kind: str, key: str) -> None:
        shutil.rmtree(self.state_dir(kind, key), ignore_errors=True)

    @contextlib.contextmanager
    def lock(self, kind: str, key: str, *, on_wait: Any = None) -> Iterator[None]:
        """Exclusive lock on ``key`` across processes (two invocations sharing a node).

        ``on_wait`` is called once if another process holds the lock and we have to wait.
        """
        d = self.root / "locks"
        d.mkdir(parents=True, exist_ok=True)
        with open(d / f"{kind}-{key}.lock", "a+") as f:
            try:
                fcntl.flock(f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                if on_wait is not None:
                    on_wait()
                fcntl.flock(f.fileno(), fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(f.fileno(), fcntl.LOCK_UN)

    def is_locked(self, kind: str, key: str) -> bool:
        """Whether some process is executing ``key`` right now (holds its lock)."""
        path = self.root / "locks" / f"{kind}-{key}.lock"
        if not path.exists():
            return False
        with open(path, "a+") as f:
            try:
                fcntl.flock(f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                return True
            fcntl.flock(f.fileno(), fcntl.LOCK_UN)
            return False

    # -- index of previous keys by node name -----------------------------------------------
    def read_index(self, spec_name: str) -> dict[str, Any]:
        return read_json(self.index_path(spec_name), {}) or {}

    def update_index(self, spec_name: str, entries: Mapping[str, Any]) -> None:
        idx = self.read_index(spec_name)
        idx.update(entries)
        atomic_write_json(self.index_path(spec_name), idx)


# -- metrics.jsonl ---------------------------------------------------------------------------


def read_metrics(path: Path) -> list[dict[str, Any]]:
    """Parse a metrics.jsonl; a torn last line (a kill mid-write) is ignored."""
    out: list[dict[str, Any]] = []
    try:
        raw = Path(path).read_bytes()
    except FileNotFoundError:
        return out
    for line in raw.split(b"\n"):
        if not line.strip():
            continue
        try:
            out.append(json.loads(line))
        except json.JSONDecodeError:
            break
    return out


def truncate_metrics(path: Path, keep_through_step: int | None) -> int:
    """Keep the records with ``step <= keep_through_step`` (None: keep none); atomic.

    Returns the number of records kept. Used on resume so that steps re-done after the last
    checkpoint do not appear twice.
    """
    records = read_metrics(path)
    if keep_through_step is None:
        kept: list[dict[str, Any]] = []
    else:
        kept = [r for r in records if int(r.get("step", 0)) <= keep_through_step]
    if not Path(path).exists() and not kept:
        return 0
    atomic_write_text(path, "".join(json.dumps(r, sort_keys=True) + "\n" for r in kept))
    return len(kept)
