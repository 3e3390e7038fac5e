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
file is hashed once; never in a store that is not writable); ``resalign verify`` hashes
everything. Before a node to run reads an upstream node, ``run`` re-hashes every file of it
smaller than :data:`REHASH_BELOW` (see :func:`check_files`), so an in-place edit that kept
size and mtime is caught before it is used; larger files (an SD UNet) are found by
``verify`` only.

The ``DONE`` manifest format (``format`` 1), a JSON object; :func:`parse_manifest` is its one
reader::

    "format": 1                                   required
    "files":  {"<rel/path>": {"size": int >= 0, "sha256": "<64 hex>", "mtime_ns": int}}
                                                  required: every file of the folder but DONE
    "inputs": {"<kind>/<key>": "<64 hex>"}        optional (provenance): for each upstream
              node read, :func:`files_digest` of its files (their sha256, as checked when the
              node started; records no step reads left out; absent in nodes committed
              before provenance existed)
    "cost":   {"<name>": number | string | bool | null}
                                                  optional: what the node cost (runner)

Another optional key is added by naming it in :data:`OPTIONAL_KEYS` with its shape check;
unknown top-level keys are ignored (a newer writer). Anything else (bytes that are not UTF-8,
JSON that is not such an object, a known key of another shape, a path leaving the folder, the
legacy marker ``ok`` of older versions, which lists nothing) makes the node damaged, with the
reason, and it is recomputed: no content of ``DONE`` can make a reader fail.
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
import stat
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
from .signals import deferred

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


def build_manifest(root: Path, extra: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """What ``DONE`` records: every output file's size, sha256 and mtime (the mtime lets a
    read skip re-hashing a file nobody has written since), plus the optional keys in
    ``extra`` (``inputs``, ``cost``: see the module doc), checked as a reader will."""
    files = {}
    for rel in _node_files(root):
        p = root / rel
        st = p.stat()
        files[rel] = {"size": st.st_size, "sha256": sha256_file(p), "mtime_ns": st.st_mtime_ns}
    m: dict[str, Any] = {"format": 1, "files": files}
    for k, v in (extra or {}).items():
        if k not in OPTIONAL_KEYS:
            raise ValueError(f"DONE has no optional key {k!r} (known: {sorted(OPTIONAL_KEYS)})")
        problem = OPTIONAL_KEYS[k](v)
        if problem:
            raise ValueError(f"DONE's {k!r} {problem}")
        m[k] = v
    return m


# Files at most this large are re-hashed whenever a node about to run reads the node that
# holds them (:func:`check_files` ``rehash_below``). 64 MiB holds LoRA weights (SD rank 4:
# 3 MB), metrics, images, the digits' whole pipelines; not an SD UNet (3.4 GB), VAE or text
# encoder. sha256 reads ~0.5 GB/s on this 2-core machine: at most ~0.13 s per file, measured
# in the README's store section.
REHASH_BELOW = 64 * 2**20

_HEX64 = re.compile(r"^[0-9a-f]{64}$")
_NODE_REF = re.compile(r"^[A-Za-z0-9_.-]+/[0-9a-f]{16,64}$")


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _bad_inputs(v: Any) -> str | None:
    if not isinstance(v, dict):
        return f"is a {type(v).__name__}, not a mapping of upstream node to digest"
    for ref, digest in v.items():
        if not _NODE_REF.match(ref) or not isinstance(digest, str) or not _HEX64.match(digest):
            return f"entry {ref[:80]!r} is not '<kind>/<key>': '<64 hex digits>'"
    return None


def _bad_cost(v: Any) -> str | None:
    if not isinstance(v, dict):
        return f"is a {type(v).__name__}, not a mapping"
    for name, x in v.items():
        if x is not None and not isinstance(x, int | float | str | bool):
            return f"entry {name[:80]!r} is a {type(x).__name__}, not a number, string or null"
    return None


# Optional top-level keys of a manifest and their shape checks (a reason, or None when fine).
OPTIONAL_KEYS: dict[str, Any] = {"inputs": _bad_inputs, "cost": _bad_cost}


class ManifestError(ValueError):
    """``DONE`` is not a manifest this version can use; the message says why."""


def _bad_rel(rel: Any) -> bool:
    """A listed path that is not a plain relative path inside the node folder."""
    if not isinstance(rel, str) or not rel or rel == DONE or "\0" in rel:
        return True
    try:
        rel.encode("utf-8")  # a lone surrogate names no file
    except UnicodeEncodeError:
        return True
    parts = rel.split("/")
    return rel.startswith("/") or any(p in ("", ".", "..") for p in parts)


def parse_manifest(raw: bytes) -> dict[str, Any]:
    """The manifest in the bytes of a ``DONE`` file, its shape checked (module doc); raises
    :class:`ManifestError` naming what is wrong, whatever the bytes are."""
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise ManifestError(f"DONE is not UTF-8 text (byte {e.start}): damaged") from None
    if text.strip() == "ok":
        raise ManifestError(
            "DONE is the legacy 'ok' marker of an older version, which lists no files: "
            "the node cannot be verified"
        )
    try:
        m = json.loads(text)
    except (ValueError, RecursionError):  # JSONDecodeError, an over-long integer, nesting
        raise ManifestError("DONE is not JSON") from None
    if not isinstance(m, dict):
        raise ManifestError(f"DONE holds a JSON {type(m).__name__}, not a manifest object")
    if not _is_int(m.get("format")) or m["format"] != 1:
        raise ManifestError(f"DONE has format {str(m.get('format'))[:40]!r}, not 1")
    files = m.get("files")
    if not isinstance(files, dict):
        raise ManifestError(f"DONE's 'files' is a {type(files).__name__}, not a mapping")
    for rel, want in files.items():
        if _bad_rel(rel):
            raise ManifestError(f"DONE lists {rel[:80]!r}, not a path inside the node folder")
        if (
            not isinstance(want, dict)
            or not _is_int(want.get("size"))
            or want["size"] < 0
            or not isinstance(want.get("sha256"), str)
            or not _HEX64.match(want["sha256"])
            or not _is_int(want.get("mtime_ns"))
        ):
            raise ManifestError(
                f"DONE's entry for {rel[:80]!r} is not {{size, sha256, mtime_ns}}: "
                f"{json.dumps(want)[:80]}"
            )
    for k, check in OPTIONAL_KEYS.items():
        if k in m:
            problem = check(m[k])
            if problem:
                raise ManifestError(f"DONE's {k!r} {problem}")
    return m


def load_manifest(done: Path) -> dict[str, Any]:
    """The checked manifest in the file ``done``; :class:`ManifestError` if it is missing,
    unreadable or not a manifest."""
    try:
        raw = Path(done).read_bytes()
    except (FileNotFoundError, NotADirectoryError):
        raise ManifestError("no DONE marker") from None
    except OSError as e:  # a folder named DONE, no permission
        raise ManifestError(f"DONE cannot be read ({e.strerror or e})") from None
    return parse_manifest(raw)


def read_manifest(done: Path) -> dict[str, Any] | None:
    """The manifest in ``done``; None when it is missing or not a manifest."""
    try:
        return load_manifest(done)
    except ManifestError:
        return None


# Top-level records of a node that no step reads from an upstream node (the engine's own,
# and the steps' summaries): left out of :func:`files_digest`, so a forced re-run that only
# changes a timing in ``stats.json`` does not make every node computed from it look stale.
UNREAD_RECORDS = frozenset(
    {"node.json", "metrics.jsonl", "params.json", "stats.json", "steps.jsonl", "README.txt"}
)


def files_digest(files: Mapping[str, Any]) -> str:
    """One sha256 over a manifest's ``files`` (each path with its sha256, but for
    :data:`UNREAD_RECORDS`): what a node's ``inputs`` records of an upstream node, so a change
    to any file a step may read shows."""
    pairs = sorted(
        (rel, str(want["sha256"])) for rel, want in files.items() if rel not in UNREAD_RECORDS
    )
    return hashlib.sha256(json.dumps(pairs, separators=(",", ":")).encode()).hexdigest()


@dataclass(frozen=True)
class Damage:
    """Why a node's files do not match its ``DONE`` manifest."""

    problems: tuple[str, ...]

    def __str__(self) -> str:
        shown = "; ".join(self.problems[:3])
        more = len(self.problems) - 3
        return shown + (f"; and {more} more" if more > 0 else "")


def unwritable_reason(path: Path) -> str | None:
    """Why ``path`` (a store folder) may not be written, None when it may: a read-only
    filesystem, a mode without a write bit, or the OS's refusal. The mode counts too because
    root may write anything: a store its owner made read-only (``chmod -R a-w``) is left
    alone by every user."""
    try:
        st = os.stat(path)
        ro_fs = bool(os.statvfs(path).f_flag & os.ST_RDONLY)
    except OSError as e:
        return e.strerror or str(e)
    if ro_fs:
        return "Read-only file system"
    if not st.st_mode & 0o222:
        return "read-only (its mode has no write bit)"
    if not os.access(path, os.W_OK):
        return "Permission denied"
    return None


def writable(path: Path) -> bool:
    """Whether ``path`` may be written (:func:`unwritable_reason`)."""
    return unwritable_reason(path) is None


def check_files(
    root: Path,
    *,
    deep: bool = False,
    refresh: bool = True,
    rehash_below: int | None = None,
) -> Damage | None:
    """Compare the files under ``root`` with its ``DONE`` manifest; None when they match.
    ``deep``: hash every file; else only those whose mtime moved and, with
    ``rehash_below``, every file smaller than that many bytes. ``refresh``: record the new
    mtime of a file whose hash still matched (best effort, and never in a read-only store).
    Whatever ``DONE`` holds, the answer is None or a :class:`Damage`, never an exception."""
    try:
        m = load_manifest(root / DONE)
    except ManifestError as e:
        return Damage((str(e),))
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
        if not stat.S_ISREG(st.st_mode):
            problems.append(f"{rel} is not a regular file")
            continue
        if st.st_size != want["size"]:
            problems.append(f"{rel} has {st.st_size} bytes, DONE recorded {want['size']}")
            continue
        small = rehash_below is not None and st.st_size < rehash_below
        if deep or small or st.st_mtime_ns != want["mtime_ns"]:
            try:
                digest = sha256_file(p)
            except OSError as e:
                problems.append(f"{rel} cannot be read ({e.strerror or e})")
                continue
            if digest != want["sha256"]:
                problems.append(f"{rel} content differs from DONE's sha256 (same size)")
            elif st.st_mtime_ns != want["mtime_ns"]:
                want["mtime_ns"] = st.st_mtime_ns
                moved = True
    extra = [r for r in _node_files(root) if r not in listed]
    problems += [f"{r} is not listed in DONE" for r in extra]
    if problems:
        return Damage(tuple(problems))
    if moved and refresh and writable(root):
        # hashed once, recorded: the next read is a stat again. A read-only store just
        # hashes again next time.
        with contextlib.suppress(OSError):
            atomic_write_json(root / DONE, m)
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

    def check(
        self, kind: str, key: str, *, deep: bool = False, rehash_below: int | None = None
    ) -> Damage | None:
        """None when the node's files match its manifest (see :func:`check_files`)."""
        return check_files(self.node_dir(kind, key), deep=deep, rehash_below=rehash_below)

    def inputs_record(self, inputs: Mapping[str, str | Path]) -> dict[str, str]:
        """The ``inputs`` a node's manifest records: for each upstream folder (role -> path)
        ``"<kind>/<key>"`` -> :func:`files_digest` of its manifest, after a check of its
        files (:meth:`check`); :class:`ManifestError` names an upstream that is damaged."""
        out = {}
        for path in inputs.values():
            d = Path(path)
            damage = check_files(d)
            if damage is not None:
                raise ManifestError(f"upstream {d.parent.name}/{d.name} is damaged: {damage}")
            out[f"{d.parent.name}/{d.name}"] = files_digest(load_manifest(d / DONE)["files"])
        return out

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
        self, staging: Path, kind: str, key: str, extra: Mapping[str, Any] | None = None
    ) -> Path:
        """Make ``staging`` the complete result of ``key``: fsync all, write the ``DONE``
        manifest (sizes, sha256, and the optional keys in ``extra``), rename.

        An existing result (a forced re-run, a damaged node) is moved aside first and deleted
        after the new one is in place, so at every moment the final path holds a complete
        result or none.
        """
        with deferred():  # a stop signal waits for the rename (engine/signals.py)
            fsync_tree(staging)
            atomic_write_json(staging / DONE, build_manifest(staging, extra))
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
        """Node name -> last key entry; an unreadable index (damaged) reads as empty: it
        only explains why a node runs, it never decides what is cached."""
        try:
            idx = read_json(self.index_path(spec_name), {})
        except (ValueError, OSError, RecursionError):
            return {}
        if not isinstance(idx, dict):
            return {}
        return {
            k: v for k, v in idx.items() if isinstance(v, dict) and isinstance(v.get("key"), str)
        }

    def update_index(self, spec_name: str, entries: Mapping[str, Any]) -> None:
        # Two invocations of one spec may finish together: read-modify-write under a lock so
        # neither drops the other's entries.
        path = self.index_path(spec_name)
        current = self.read_index(spec_name)
        if all(
            current.get(k) == json.loads(json.dumps(v, default=str)) for k, v in entries.items()
        ):
            return  # nothing new: a run of cached nodes writes nothing (a read-only store)
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
