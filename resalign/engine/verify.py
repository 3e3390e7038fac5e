"""``resalign verify``: check every node of a store against its ``DONE`` manifest.

Hashes every file of every complete node (sha256, as recorded at commit) and lists what no
live process owns (:meth:`.store.Store.orphans`: staging leftovers, replaced results, resume
state of complete nodes, launch folders of failed torchrun jobs, locks nobody holds).
``fix=True`` deletes the damaged nodes (the next ``run`` recomputes them) and the orphans.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import shutil
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from .store import Damage, Store, check_files


@dataclass
class VerifyReport:
    checked: int = 0
    legacy: int = 0  # DONE without a manifest (written before manifests): not checkable
    damaged: list[tuple[str, Damage]] = field(default_factory=list)  # "kind/key", why
    orphans: list[tuple[Path, str]] = field(default_factory=list)
    removed: list[Path] = field(default_factory=list)

    @property
    def clean(self) -> bool:
        return not self.damaged and not self.orphans


def verify_store(
    root: Path | str, *, fix: bool = False, echo: Callable[[str], None] = print
) -> VerifyReport:
    """Check ``root`` (printing each problem through ``echo``); with ``fix`` remove them."""
    store = Store(root)
    rep = VerifyReport()
    for kind, key, d in store.node_dirs():
        if store.is_locked(kind, key):
            continue  # being (re)written right now
        done = d / "DONE"
        if done.is_file() and done.read_text(encoding="utf-8", errors="replace").strip() == "ok":
            rep.legacy += 1
            rep.checked += 1
            continue
        rep.checked += 1
        # deep: hash every file; refresh=False: verify reports, it does not bless
        damage = check_files(d, deep=True, refresh=False)
        if damage is not None:
            rep.damaged.append((f"{kind}/{key}", damage))
            echo(f"damaged  {kind}/{key}: {damage}")
            if fix:
                _remove(d)
                rep.removed.append(d)
    rep.orphans = store.orphans()
    for path, what in rep.orphans:
        echo(f"orphan   {path}: {what}")
        if fix:
            _remove(path)
            rep.removed.append(path)
    return rep


def _remove(path: Path) -> None:
    if path.suffix == ".lock" and path.is_file():
        # delete a lock file while holding it, so a process that opened it meanwhile
        # notices the swap (Store.lock re-checks the inode) instead of locking a ghost
        with open(path, "rb") as f:
            try:
                fcntl.flock(f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                return  # taken meanwhile: no longer an orphan
            with contextlib.suppress(FileNotFoundError):
                os.unlink(path)
        return
    if path.is_dir():
        shutil.rmtree(path, ignore_errors=True)
    else:
        with contextlib.suppress(FileNotFoundError):
            path.unlink()
