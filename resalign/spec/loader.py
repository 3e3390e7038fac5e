"""Load a spec: read its YAML (bounded), compose it (``extends``, ``--set``, ``vars``),
validate it against the schema and resolve it.

Every problem found (YAML, schema, cross-reference) is collected and raised together as one
:class:`SpecError`, each at the file, line and column that wrote the value. The steps live in
their own modules: :mod:`.source` (bounded YAML with positions), :mod:`.compose`,
:mod:`.validation` (schema errors onto the YAML) and :mod:`.resolve`.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from .compose import compose_text, read_spec_file
from .errors import SpecError
from .resolve import ResolvedSpec, resolve

# Re-exported: the names this module has always offered.
from .source import PathT, SourceMap, dotted, load_yaml_text
from .validation import schema_issues, validate_data

__all__ = [
    "PathT",
    "SourceMap",
    "dotted",
    "load_spec",
    "load_spec_text",
    "load_yaml_text",
    "schema_issues",
    "validate_data",
]


# --------------------------------------------------------------------------- entry points


def load_spec_text(
    text: str,
    *,
    filename: str = "<spec>",
    base_dir: str | Path = ".",
    check_files: bool = False,
    sets: Sequence[str] = (),
    path: Path | None = None,
) -> ResolvedSpec:
    """Load, compose, validate and resolve a spec given as text (a rendered template, a test).

    Returns a :class:`resalign.spec.resolve.ResolvedSpec`; raises :class:`SpecError` listing
    every problem. ``check_files`` also requires every referenced data file, local model and
    metric weight file to exist (``resalign run`` does this before executing anything).
    ``sets``: ``PATH=VALUE`` overrides (``--set``), listed in the result's ``overrides``.
    ``path``: the file the text was read from (for ``extends`` cycles).
    """
    data, smap, applied = compose_text(text, filename, base_dir, sets=sets, path=path)
    spec, issues = validate_data(data, smap)
    resolved, more = resolve(spec, data, smap, Path(base_dir), check_files=check_files)
    for issue in more:
        if all(
            (i.file, i.line, i.col, i.message) != (issue.file, issue.line, issue.col, issue.message)
            for i in issues
        ):
            issues.append(issue)
    if issues or resolved is None:
        raise SpecError(issues or [smap.issue((), "invalid spec")])
    resolved.overrides = applied
    return resolved


def load_spec(
    path: str | Path, *, check_files: bool = False, sets: Sequence[str] = ()
) -> ResolvedSpec:
    """Load, validate and resolve the spec file at ``path``; relative paths inside it are
    relative to its folder. See :func:`load_spec_text`."""
    p = Path(path)
    return load_spec_text(
        read_spec_file(p),
        filename=str(path),
        base_dir=p.parent.resolve(),
        check_files=check_files,
        sets=sets,
        path=p,
    )
