"""The local store: the source of truth for every node's results.

Layout (see docs/architecture.md)::

    runs/<kind>/<key>/          a completed node: its outputs, node.json, metrics.jsonl, DONE
    runs/<kind>/.tmp-<key>-*    staging folders of nodes being executed (or killed mid-way)
    runs/state/<kind>/<key>/    resume checkpoints and the live metrics.jsonl of a running node
    runs/index/<spec>.json      node name -> last key and params (explains "parameter changed")
    runs/locks/                 one lock file per key being executed (concurrent invocations)

A node is complete exactly when ``runs/<kind>/<key>/DONE`` exists and the files match it. The
step writes into a staging folder; the engine writes ``DONE`` into it last (after fsync of
every file) and then renames the whole folder into place, so a crash at any moment leaves
either nothing or a complete result at the final path, never a half-written one that looks
complete.

``DONE`` is a manifest: every output file's size, sha256 and mtime. A node whose files do not
match it (truncated, altered, missing, added) is *damaged*: ``plan`` says so, ``run`` re-runs
it and never reads it. Keeping that cheap on every read: :meth:`Store.check` compares sizes
and mtimes (one ``stat`` per file) and hashes only a file whose mtime changed since the
manifest was written (then records the new mtime if the hash still matches, so each such
file is hashed once); ``resalign verify`` hashes everything. An in-place edit that restores
size and mtime is found by ``verify`` only. ``DONE`` files of older versions (``ok``) carry no
manifest and are trusted as before.

The manifest may carry an optional ``cost`` mapping (what the node took: ``wall_s``,
``cpu_s``, ``peak_rss_mb``, ``rss_scope``, ``cuda_peak_mb``, ``device``, ``threads``,
``load1``; written by the engine, see :mod:`.cost`); readers that do not know it ignore it,
and manifests without it (older nodes) are complete all the same.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import hashlib
import json
import os
import re
import shutil
import uuid
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..atomic import (  # noqa: F401  (re-exported: the engine's modules import them from here)
    atomic_write_bytes,
    atomic_write_json,
    atomic_write_text,
    fsync_dir,
    fsync_tree,
    swap_dir,
)

DONE = "DONE"
# Top-level folders of the store that hold no node results.
RESERVED = frozenset(
    {"state", "index", "locks", "launch", "tracking", "grids", "mlartifacts", "slurm", "rehearsal"}
)
_KEY = re.compile(r"^[0-9a-f]{16,64}$")
_HASH_CHUNK = 1 << 20


def read_json(path: Path, default: Any = None) -> Any:
    try:
        return json.loads(Path(path).read_text(encoding="utf-8"))
    except FileNotFoundError:
        return default


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_HASH_CHUNK):
            h.update(chunk)
    return h.hexdigest()


def _node_files(root: Path) -> list[str]:
    """Relative paths (``/``-separated) of every file under ``root`` except ``DONE``."""
    out = []
    for dirpath, _dirs, files in os.walk(root):
        for name in files:
            rel = os.path.relpath(os.path.join(dirpath, name), root)
            if rel != DONE:
                out.append(rel.replace(os.sep, "/"))
    return sorted(out)


def build_manifest(root: Path) -> dict[str, Any]:
    """What ``DONE`` records: every output file's size, sha256 and mtime (the mtime lets a
    read skip re-hashing a file nobody has written since)."""
    files = {}
    for rel in _node_files(root):
        p = root / rel
        st = p.stat()
        files[rel] = {"size": st.st_size, "sha256": sha256_file(p), "mtime_ns": st.st_mtime_ns}
    return {"format": 1, "files": files}


def read_manifest(done: Path) -> dict[str, Any] | None:
    """The manifest in ``done``; None for a legacy ``DONE`` (``ok``) or a missing one."""
    try:
        text = done.read_text(encoding="utf-8")
    except (FileNotFoundError, NotADirectoryError):
        return None
    try:
        m = json.loads(text)
    except json.JSONDecodeError:
        return None
    return m if isinstance(m, dict) and isinstance(m.get("files"), dict) else None


@dataclass(frozen=True)
class Damage:
    """Why a node's files do not match its ``DONE`` manifest."""

    problems: tuple[str, ...]

    def __str__(self) -> str:
        shown = "; ".join(self.problems[:3])
        more = len(self.problems) - 3
        return shown + (f"; and {more} more" if more > 0 else "")


def check_files(root: Path, *, deep: bool = False, refresh: bool = True) -> Damage | None:
    """Compare the files under ``root`` with its ``DONE`` manifest; None when they match (or
    the manifest is legacy). ``deep``: hash every file; else only those whose mtime moved.
    ``refresh``: record the new mtime of a file whose hash still matched (best effort)."""
    done = root / DONE
    if not done.is_file():
        return Damage(("no DONE marker",))
    text = done.read_text(encoding="utf-8", errors="replace")
    if text.strip() == "ok":
        return None  # written before manifests existed
    m = read_manifest(done)
    if m is None:
        return Damage(("DONE is not a readable manifest",))
    problems: list[str] = []
    moved = False
    listed = m["files"]
    for rel, want in listed.items():
        p = root / rel
        try:
            st = p.stat()
        except OSError:
            problems.append(f"{rel} is missing")
            continue
        if st.st_size != want.get("size"):
            problems.append(f"{rel} has {st.st_size} bytes, DONE recorded {want.get('size')}")
            continue
        if deep or st.st_mtime_ns != want.get("mtime_ns"):
            if sha256_file(p) != want.get("sha256"):
                problems.append(f"{rel} content differs from DONE's sha256 (same size)")
            elif st.st_mtime_ns != want.get("mtime_ns"):
                want["mtime_ns"] = st.st_mtime_ns
                moved = True
    extra = [r for r in _node_files(root) if r not in listed]
    problems += [f"{r} is not listed in DONE" for r in extra]
    if problems:
        return Damage(tuple(problems))
    if moved and refresh:
        # hashed once, recorded: the next read is a stat again. A read-only store just
        # hashes again next time.
        with contextlib.suppress(OSError):
            atomic_write_json(done, m)
    return None


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

    def lock_path(self, kind: str, key: str) -> Path:
        return self.root / "locks" / f"{kind}-{key}.lock"

    def has_done(self, kind: str, key: str) -> bool:
        """Whether a ``DONE`` marker exists (complete unless :meth:`check` finds damage)."""
        return (self.node_dir(kind, key) / DONE).is_file()

    def check(self, kind: str, key: str, *, deep: bool = False) -> Damage | None:
        """None when the node's files match its manifest (see :func:`check_files`)."""
        return check_files(self.node_dir(kind, key), deep=deep)

    def is_complete(self, kind: str, key: str) -> bool:
        """``DONE`` exists and the files match it (sizes and mtimes; see the module doc)."""
        return self.has_done(kind, key) and self.check(kind, key) is None

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

    def commit(
        self, staging: Path, kind: str, key: str, cost: Mapping[str, Any] | None = None
    ) -> Path:
        """Make ``staging`` the complete result of ``key``: fsync all, write the ``DONE``
        manifest (sizes, sha256; ``cost``, what the node took, when given), rename.

        An existing result (a forced re-run, a damaged node) is moved aside first and deleted
        after the new one is in place, so at every moment the final path holds a complete
        result or none.
        """
        fsync_tree(staging)
        manifest = build_manifest(staging)
        if cost is not None:
            manifest["cost"] = dict(cost)
        atomic_write_json(staging / DONE, manifest)
        final = self.node_dir(kind, key)
        swap_dir(staging, final)
        return final

    def discard_state(self, kind: str, key: str) -> None:
        shutil.rmtree(self.state_dir(kind, key), ignore_errors=True)

    @contextlib.contextmanager
    def lock(self, kind: str, key: str, *, on_wait: Any = None) -> Iterator[None]:
        """Exclusive lock on ``key`` across processes (two invocations sharing a node).

        ``on_wait`` is called once if another process holds the lock and we have to wait.
        The lock file is deleted by its holder on release (and by ``resalign verify --fix``
        when nobody holds it); a process checks after acquiring that the file it locked is
        still the one at the path, else locks again.
        """
        path = self.lock_path(kind, key)
        path.parent.mkdir(parents=True, exist_ok=True)
        waited = False
        while True:
            f = open(path, "a+")  # noqa: SIM115 - closed below or after the yield
            try:
                fcntl.flock(f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                if on_wait is not None and not waited:
                    on_wait()
                waited = True
                fcntl.flock(f.fileno(), fcntl.LOCK_EX)
            try:
                same = os.stat(path).st_ino == os.fstat(f.fileno()).st_ino
            except FileNotFoundError:
                same = False
            if same:
                break
            f.close()
        try:
            yield
        finally:
            # Removed while held: a process waiting on this file finds it gone once it gets
            # the lock and locks the path anew (the inode check above), so a lock file left
            # in locks/ means its holder was killed.
            with contextlib.suppress(FileNotFoundError):
                os.unlink(path)
            fcntl.flock(f.fileno(), fcntl.LOCK_UN)
            f.close()

    def is_locked(self, kind: str, key: str) -> bool:
        """Whether some process is executing ``key`` right now (holds its lock)."""
        return _held(self.lock_path(kind, key))

    # -- index of previous keys by node name -----------------------------------------------
    def read_index(self, spec_name: str) -> dict[str, Any]:
        return read_json(self.index_path(spec_name), {}) or {}

    def update_index(self, spec_name: str, entries: Mapping[str, Any]) -> None:
        # Two invocations of one spec may finish together: read-modify-write under a lock so
        # neither drops the other's entries.
        path = self.index_path(spec_name)
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(path.with_name(path.name + ".lock"), "a+") as f:
            fcntl.flock(f.fileno(), fcntl.LOCK_EX)
            idx = self.read_index(spec_name)
            idx.update(entries)
            atomic_write_json(path, idx)

    # -- verification ------------------------------------------------------------------------
    def node_dirs(self) -> Iterator[tuple[str, str, Path]]:
        """``(kind, key, folder)`` of every node folder at a final path, sorted."""
        if not self.root.is_dir():
            return
        for kd in sorted(self.root.iterdir()):
            if not kd.is_dir() or kd.name in RESERVED or kd.name.startswith("."):
                continue
            for d in sorted(kd.iterdir()):
                if d.is_dir() and _KEY.match(d.name):
                    yield kd.name, d.name, d

    def orphans(self) -> list[tuple[Path, str]]:
        """Leftovers no live process owns: staging and moved-aside folders of nodes nobody
        is executing, resume state of nodes already complete, launch folders of failed
        torchrun jobs, and lock files nobody holds. ``(path, what)`` each."""
        out: list[tuple[Path, str]] = []
        if not self.root.is_dir():
            return out
        for kd in sorted(self.root.iterdir()):
            if not kd.is_dir() or kd.name in RESERVED:
                continue
            # staging: .tmp-<key>-<id>; replaced results (swap_dir): .<key>.<id>.old
            for d in sorted(kd.glob(".tmp-*")) + sorted(kd.glob(".*.old")):
                key = d.name.split("-")[1] if d.name.startswith(".tmp-") else d.name.split(".")[1]
                if not self.is_locked(kd.name, key):
                    what = "staging leftover" if d.name.startswith(".tmp-") else "replaced result"
                    out.append((d, f"{what} of {kd.name}/{key} (no process is executing it)"))
        for sub, what in (("state", "resume state"), ("launch", "torchrun launch folder")):
            base = self.root / sub
            for kd in sorted(base.iterdir()) if base.is_dir() else []:
                for d in sorted(kd.iterdir()) if kd.is_dir() else []:
                    if self.is_locked(kd.name, d.name):
                        continue
                    if sub == "launch" or self.has_done(kd.name, d.name):
                        out.append(
                            (
                                d,
                                f"{what} of {kd.name}/{d.name} (not running; "
                                + ("node complete)" if sub == "state" else "kept after a failure)"),
                            )
                        )
        locks = self.root / "locks"
        for p in sorted(locks.glob("*.lock")) if locks.is_dir() else []:
            if not _held(p):
                out.append((p, "lock file no live process holds"))
        return out


def _held(path: Path) -> bool:
    try:
        f = open(path, "rb")  # noqa: SIM115
    except FileNotFoundError:
        return False
    with f:
        try:
            fcntl.flock(f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return True
        fcntl.flock(f.fileno(), fcntl.LOCK_UN)
        return False


def free_bytes(path: Path) -> int | None:
    """Bytes available to this user on the filesystem holding ``path`` (its nearest
    existing parent); None when unknown."""
    p = Path(path)
    while not p.exists() and p != p.parent:
        p = p.parent
    try:
        st = os.statvfs(p)
    except OSError:
        return None
    return st.f_bavail * st.f_frsize


def tree_bytes(path: Path) -> int:
    """Total size of the files under ``path`` (0 if absent)."""
    total = 0
    for dirpath, _dirs, files in os.walk(path):
        for name in files:
            with contextlib.suppress(OSError):
                total += os.lstat(os.path.join(dirpath, name)).st_size
    return total


WRITE_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM, errno.EFBIG}
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
