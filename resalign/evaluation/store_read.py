"""Completed result folders of one node kind, read through the compiled graph and the store
(the report's evaluations and the predictors' probes use the one reader), and where a stored
node sits when only its folder is at hand (the report step's inputs)."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

from ..errors import UserError
from ..graph.nodes import LOCATION_FIELDS


def completed_folders(
    graph: Any,
    store_root: Path,
    kind: str,
    filename: str,
    what: str,
    spec_path: str = "SPEC",
    complete: Callable[[str, str], bool] | None = None,
    *,
    skip_missing: bool = False,
) -> dict[str, Path]:
    """``{node name: folder}`` of every ``kind`` node of ``graph`` whose result is complete
    in ``store_root`` and holds ``filename``. ``complete(kind, key)``: the store's own test
    (``Store.is_complete``, which checks the files against the ``DONE`` manifest, so a
    damaged result counts as missing, never read); default: a ``DONE`` marker exists. A node
    without a completed result is a :class:`UserError` naming every missing node (``what``:
    how the message calls them, e.g. "evaluation"); with ``skip_missing`` such nodes are left
    out instead (a reader of something optional)."""
    found, missing = {}, []
    for node in graph.of_kind(kind):
        folder = Path(store_root) / kind / node.key
        done = complete(kind, node.key) if complete else (folder / "DONE").is_file()
        if done and (folder / filename).is_file():
            found[node.name] = folder
        else:
            missing.append(node.name)
    if missing and not skip_missing:
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


def stored_location(folder: Path) -> dict[str, Any] | None:
    """The location (:data:`LOCATION_FIELDS`) a stored node's ``node.json`` records, or
    None when it records not all of them.

    The engine writes them since 2026-12-07 (``engine/worker.py``); nodes stored before
    record only kind, name, key, params, deps, inputs and version, and a test's hand-made
    folder may have no ``node.json``. A reader that gets None takes the location from the
    node's name, which :mod:`resalign.graph.compile` built
    from exactly these fields: the same values, with no key and no stored file to change
    (:func:`resalign.evaluation.report.results.parse_eval_name`,
    :func:`resalign.evaluation.predictors.parse_probe_name`)."""
    try:
        stored = json.loads((Path(folder) / "node.json").read_text("utf-8"))
    except (OSError, ValueError):
        return None
    if not isinstance(stored, dict) or not all(f in stored for f in LOCATION_FIELDS):
        return None
    return {f: stored[f] for f in LOCATION_FIELDS}
