"""Completed result folders of one node kind, read through the compiled graph and the store
(the report's evaluations and the predictors' probes use the one reader)."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

from ..errors import UserError


def completed_folders(
    graph: Any,
    store_root: Path,
    kind: str,
    filename: str,
    what: str,
    spec_path: str = "SPEC",
    complete: Callable[[str, str], bool] | None = None,
) -> dict[str, Path]:
    """``{node name: folder}`` of every ``kind`` node of ``graph`` whose result is complete
    in ``store_root`` and holds ``filename``. ``complete(kind, key)``: the store's own test
    (``Store.is_complete``, which checks the files against the ``DONE`` manifest, so a
    damaged result counts as missing, never read); default: a ``DONE`` marker exists. A node
    without a completed result is a :class:`UserError` naming every missing node (``what``:
    how the message calls them, e.g. "evaluation")."""
    found, missing = {}, []
    for node in graph.of_kind(kind):
        folder = Path(store_root) / kind / node.key
        done = complete(kind, node.key) if complete else (folder / "DONE").is_file()
        if done and (folder / filename).is_file():
            found[node.name] = folder
        else:
            missing.append(node.name)
    if missing:
        shown = ", ".join(missing[:6]) + (
            f" and {len(missing) - 6} more" if len(missing) > 6 else ""
        )
        raise UserError(
            f"{len(missing)} of {len(missing) + len(found)} {what} results are missing "
            f"from {store_root}: {shown}",
            hint=f"run `resalign run {spec_path}` first (it computes only what is missing), "
            "or pass --store with the folder the runs were written to",
        )
    return found
