"""Atomic file writes, the one implementation every layer uses (a leaf: imports nothing of
resalign).

Every writer goes through a temporary name in the destination's folder (same filesystem, so
the rename is atomic), flushes and fsyncs the data, renames over the destination and fsyncs
the folder, so a crash at any moment leaves the old content or the new one, never a torn
file. A failed write removes its temporary file and re-raises with the destination named
(``OSError.filename``), so a full or read-only disk is reported against the path being
written rather than a temporary name or nothing at all.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any

__all__ = [
    "atomic_dir",
    "atomic_open",
    "atomic_write_bytes",
    "atomic_write_json",
    "atomic_write_text",
    "fsync_dir",
    "fsync_tree",
]


def fsync_dir(path: Path | str) -> None:
    """fsync a directory so that renames and creations inside it are durable."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_tree(root: Path | str) -> None:
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
        fsync_dir(dirpath)


def _umask() -> int:
    """The process umask (read without changing it where /proc says it, as on Linux)."""
    try:
        with open("/proc/self/status", encoding="ascii") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def _named(e: OSError, path: Path) -> OSError:
    """``e`` with ``filename`` set to the destination when the OS left it unset (a failed
    ``write`` on a descriptor names no file) or named our temporary file."""
    if e.filename is None or str(e.filename).endswith(".tmp"):
        return type(e)(e.errno, e.strerror or str(e), str(path))
    return e


@contextlib.contextmanager
def atomic_open(
    path: Path | str, mode: str = "wb", encoding: str | None = None
) -> Iterator[IO[Any]]:
    """Open a temporary file next to ``path`` for writing; on a clean exit flush, fsync and
    rename it to ``path`` (then fsync the folder); on an exception delete it.

    For writers that want a file object (``torch.save``, ``json.dump``)::

        with atomic_open(path) as f:
            torch.save(state, f)
    """
    path = Path(path)
    if "w" not in mode:
        raise ValueError(f"atomic_open writes; mode {mode!r} has no 'w'")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    except OSError as e:
        raise _named(e, path) from None
    try:
        # mkstemp creates 0600; the file gets the mode open() would give it (0644 under the
        # usual umask 022): reports and store files are read by other users and servers
        os.fchmod(fd, 0o666 & ~_umask())
    except OSError:
        pass  # a filesystem without modes (some network mounts): keep mkstemp's
    try:
        with os.fdopen(fd, mode, encoding=encoding) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as e:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        if isinstance(e, OSError):
            raise _named(e, path) from e
        raise
    fsync_dir(path.parent)


def atomic_write_bytes(path: Path | str, data: bytes) -> None:
    """Write ``data`` to ``path`` atomically (temporary file in the same folder, fsync, rename)."""
    with atomic_open(path, "wb") as f:
        f.write(data)


def atomic_write_text(path: Path | str, text: str) -> None:
    """Write ``text`` (UTF-8) to ``path`` atomically."""
    atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: Path | str, obj: Any, *, indent: int | None = 2) -> None:
    """Write ``obj`` as JSON (sorted keys, ``default=str``, trailing newline) atomically."""
    atomic_write_text(path, json.dumps(obj, indent=indent, sort_keys=True, default=str) + "\n")


def swap_dir(src: Path | str, dst: Path | str) -> None:
    """Rename the (fsynced) folder ``src`` to ``dst``; an existing ``dst`` is moved aside first
    and deleted after, so ``dst`` is at every moment complete or absent."""
    src, dst = Path(src), Path(dst)
    old = None
    if dst.exists():
        old = dst.parent / f".{dst.name}.{uuid.uuid4().hex[:8]}.old"
        os.replace(dst, old)
    os.replace(src, dst)
    fsync_dir(dst.parent)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


@contextlib.contextmanager
def atomic_dir(path: Path | str) -> Iterator[Path]:
    """A temporary folder next to ``path`` to fill; on a clean exit it is fsynced and renamed
    to ``path`` (an existing ``path`` is replaced: moved aside, then deleted), so ``path`` is
    at every moment complete or absent. On an exception the temporary folder is deleted."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.parent / f".{path.name}.{uuid.uuid4().hex[:8]}.tmp"
    tmp.mkdir()
    try:
        yield tmp
        fsync_tree(tmp)
        swap_dir(tmp, path)
    except BaseException as e:
        shutil.rmtree(tmp, ignore_errors=True)
        if isinstance(e, OSError):
            raise _named(e, path) from e
        raise
