"""``resalign verify``: check every node of a store against its ``DONE`` manifest, and the
chain of what each node was computed from.

Hashes every file of every complete node (sha256, as recorded at commit) and lists what no
live process owns (:meth:`.store.Store.orphans`: staging leftovers, replaced results, resume
state of complete nodes, launch folders of failed torchrun jobs, locks nobody holds).

The chain: a node's manifest records a digest of each upstream node's files as they were
when it read them (``inputs``, :mod:`.store`); a node whose upstream now holds other files
is damaged too (it was computed from something that is no longer there). Every node derived
from a damaged one, transitively (through ``inputs``, or ``node.json``'s input folders for
nodes committed before provenance), may have read the damage: it is listed as *derived*.
``fix=True`` deletes the damaged nodes, the nodes derived from them (the next ``run``
recomputes them all) and the orphans; nothing is written when nothing must be removed.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import shutil
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import UserError
from .store import Damage, ManifestError, Store, check_files, files_digest, load_manifest, writable


@dataclass
class VerifyReport:
    checked: int = 0
    damaged: list[tuple[str, Damage]] = field(default_factory=list)  # "kind/key", why
    # "kind/key" of a node computed from a damaged one (transitively), and that damaged one
    derived: list[tuple[str, str]] = field(default_factory=list)
    orphans: list[tuple[Path, str]] = field(default_factory=list)
    removed: list[Path] = field(default_factory=list)

    @property
    def clean(self) -> bool:
        return not self.damaged and not self.derived and not self.orphans


def _upstreams(d: Path, manifest: dict | None) -> dict[str, str | None]:
    """``"kind/key"`` of each node ``d`` read -> the digest recorded of it (None: unknown,
    a node committed before provenance, known from its ``node.json`` only)."""
    if manifest is not None and "inputs" in manifest:
        return dict(manifest["inputs"])
    try:
        inputs = json.loads((d / "node.json").read_bytes()).get("inputs")
    except (OSError, ValueError, RecursionError, AttributeError):
        return {}
    if not isinstance(inputs, dict):
        return {}
    return {f"{Path(p).parent.name}/{Path(p).name}": None for p in inputs.values()
            if isinstance(p, str)}  # fmt: skip


def verify_store(
    root: Path | str, *, fix: bool = False, echo: Callable[[str], None] = print
) -> VerifyReport:
    """Check ``root`` (printing each problem through ``echo``); with ``fix`` remove them."""
    store = Store(root)
    rep = VerifyReport()
    folders: dict[str, Path] = {}
    manifests: dict[str, dict | None] = {}
    damaged: dict[str, Damage] = {}
    for kind, key, d in store.node_dirs():
        if store.is_locked(kind, key):
            continue  # being (re)written right now
        ref = f"{kind}/{key}"
        rep.checked += 1
        folders[ref] = d
        # deep: hash every file; refresh=False: verify reports, it does not bless
        damage = check_files(d, deep=True, refresh=False)
        if damage is not None:
            damaged[ref] = damage
            manifests[ref] = None
            continue
        try:
            manifests[ref] = load_manifest(d / "DONE")
        except ManifestError as e:  # changed since it was checked
            damaged[ref] = Damage((str(e),))
            manifests[ref] = None
    # the chain: what each node read is what its upstream holds now
    parents = {ref: _upstreams(folders[ref], manifests[ref]) for ref in folders}
    for ref, ups in parents.items():
        if ref in damaged:
            continue
        for up, digest in ups.items():
            m = manifests.get(up)
            if digest is not None and m is not None and files_digest(m["files"]) != digest:
                damaged[ref] = Damage(
                    (
                        f"it was computed from {up} as it was then; that node's files have "
                        "changed since (recomputed differently, or replaced)",
                    )  # fmt: skip
                )
                break
    for ref, damage in damaged.items():
        rep.damaged.append((ref, damage))
        echo(f"damaged  {ref}: {damage}")
    # every node derived from a damaged one, transitively
    children: dict[str, list[str]] = {}
    for ref, ups in parents.items():
        for up in ups:
            children.setdefault(up, []).append(ref)
    source: dict[str, str] = {}
    todo = list(damaged)
    while todo:
        up = todo.pop()
        for child in sorted(children.get(up, [])):
            if child not in damaged and child not in source:
                source[child] = source.get(up, up)
                todo.append(child)
    for ref in sorted(source):
        rep.derived.append((ref, source[ref]))
        echo(f"derived  {ref}: computed from damaged {source[ref]}")
    rep.orphans = store.orphans()
    for path, what in rep.orphans:
        echo(f"orphan   {path}: {what}")
    if fix:
        doomed = [folders[r] for r, _ in rep.damaged] + [folders[r] for r, _ in rep.derived]
        doomed += [p for p, _ in rep.orphans]
        blocked = sorted({str(p.parent) for p in doomed if not writable(p.parent)})
        if blocked:
            raise UserError(
                f"cannot remove {len(doomed)} item(s): {blocked[0]} is not writable"
                + (f" (and {len(blocked) - 1} more folders)" if len(blocked) > 1 else ""),
                where="--store",
                hint="make the store writable (chmod -R u+w) and run `resalign verify --fix` "
                "again; without --fix verify only reads",
            )
        for path in doomed:
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
