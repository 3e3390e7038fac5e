"""Grid templates rendered: every cell of a parsed template (:mod:`.template_grid`) to spec
text and a validated spec.

The body is rendered in Jinja's immutable sandbox with ``StrictUndefined`` and no loader
(:mod:`resalign.spec.sandbox`, shared with a spec's ``vars``): a template cannot reach Python
internals, the file system or other templates, and an undefined variable is an error. A cell may
``extends:`` a spec (relative to the template's folder), so a template states only what differs.
Input is bounded as for specs (issue 15): the front matter is read by the spec loader, and a
cell's text stops rendering past the spec size limit. Every cell is rendered and validated
before any cell is used, and every problem of every cell is reported at once with the cell id
and the template line.
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..atomic import atomic_write_text
from ..errors import UserError
from .errors import Issue
from .source import MAX_SPEC_BYTES
from .template_grid import Cell, GridTemplate, load_template

# Private-use code points: they never occur in a spec, so they can tag template lines.
_MARK_OPEN, _MARK_CLOSE = "\ue000", "\ue001"
_MARK = re.compile(f"{_MARK_OPEN}(\\d+){_MARK_CLOSE}")
_TAG = re.compile(r"\{\{.*?\}\}|\{%.*?%\}|\{#.*?#\}", re.DOTALL)


@dataclass
class RenderedCell:
    """A cell rendered to spec text (as written by ``--render``) and, once validated, its spec."""

    cell: Cell
    text: str
    source: str  # pseudo file name used in messages: "<template>[<cell id>]"
    line_map: list[int]  # rendered line (0-based) → template file line (1-based)
    exact_lines: bool
    spec: Any = None

    def template_line(self, rendered_line: int) -> int:
        """The template file line that produced line ``rendered_line`` (1-based) of ``text``."""
        if not self.line_map:
            return 1
        i = min(max(rendered_line, 1), len(self.line_map)) - 1
        return self.line_map[i]


# --------------------------------------------------------------------------- rendering


def _with_line_marks(body: str) -> str:
    """Tag every newline outside Jinja tags with its template line number."""
    out: list[str] = []
    pos = 0
    line = 1

    def mark_text(chunk: str) -> None:
        nonlocal line
        parts = chunk.split("\n")
        for p in parts[:-1]:
            out.append(f"{p}{_MARK_OPEN}{line}{_MARK_CLOSE}\n")
            line += 1
        out.append(parts[-1])

    for m in _TAG.finditer(body):
        mark_text(body[pos : m.start()])
        out.append(m.group(0))
        line += m.group(0).count("\n")
        pos = m.end()
    mark_text(body[pos:])
    return "".join(out)


class RenderTooLarge(Exception):
    """A cell rendered past :data:`MAX_SPEC_BYTES` (stopped there, not rendered whole)."""


def _render_bounded(template: Any, ctx: dict[str, Any]) -> str:
    """Render in chunks and stop past the spec size bound, so that a loop in a template cannot
    exhaust memory before the loader would refuse the text."""
    out: list[str] = []
    size = 0
    for chunk in template.generate(**ctx):
        size += len(chunk)
        if size > 2 * MAX_SPEC_BYTES:  # marked text carries line tags: a margin for them
            raise RenderTooLarge(
                f"the cell renders to more than the {MAX_SPEC_BYTES:,} bytes a spec may have"
            )
        out.append(chunk)
    return "".join(out)


def _template_line_of(exc: BaseException, name: str) -> int | None:
    """Line of the template in Jinja's rewritten traceback (the innermost template frame)."""
    line = None
    tb = exc.__traceback__
    while tb is not None:
        if tb.tb_frame.f_code.co_filename == name:
            line = tb.tb_lineno
        tb = tb.tb_next
    return line


def _context(template: GridTemplate, cell: Cell) -> dict[str, Any]:
    ctx: dict[str, Any] = dict(template.variables)
    ctx.update(cell.axes)
    ctx.update(cell.extras)
    ctx["cell"] = {"id": cell.id, "slug": cell.slug, "index": cell.index, "axes": dict(cell.axes)}
    ctx["grid"] = {"name": template.name, "template": template.path.name}
    return ctx


def _render_error(template: GridTemplate, cell: Cell, exc: Exception) -> UserError:
    from jinja2 import TemplateSyntaxError, UndefinedError
    from jinja2.exceptions import SecurityError

    line = getattr(exc, "lineno", None) or _template_line_of(exc, str(template.path))
    where = f"{template.path}:{line}" if line else str(template.path)
    msg = getattr(exc, "message", None) or str(exc)
    if isinstance(exc, SecurityError):
        return UserError(
            f"cell {cell.id}: the template tried something the sandbox forbids: {msg}",
            where=where,
            hint="templates may use their variables, filters and tests only; attributes "
            "starting with '_' and Python internals are not reachable",
        )
    if isinstance(exc, UndefinedError):
        known = sorted(_context(template, cell))
        return UserError(
            f"cell {cell.id}: {msg}",
            where=where,
            hint="variables of this cell: " + ", ".join(known),
        )
    if isinstance(exc, TemplateSyntaxError):
        return UserError(f"template syntax error: {msg}", where=where, hint="fix the Jinja tag")
    if isinstance(exc, RenderTooLarge):
        return UserError(f"cell {cell.id}: {msg}", where=where, hint="check the template's loops")
    if isinstance(exc, TypeError) and "no loader" in str(exc):
        return UserError(
            f"cell {cell.id}: templates cannot include or import other files",
            where=where,
            hint="put shared values under 'vars:' in the front matter",
        )
    return UserError(f"cell {cell.id}: rendering failed: {type(exc).__name__}: {msg}", where=where)


def _compile(env, template: GridTemplate, source: str):
    from jinja2 import TemplateSyntaxError

    try:
        code = env.compile(source, name=str(template.path), filename=str(template.path))
    except TemplateSyntaxError as e:
        raise UserError(
            f"template syntax error: {e.message}",
            where=f"{template.path}:{e.lineno}",
            hint="check the {{ }} / {% %} tags on that line",
        ) from None
    return env.template_class.from_code(env, code, env.make_globals(None))


def render_cell_texts(template: GridTemplate) -> tuple[list[RenderedCell], list[UserError]]:
    """Render every cell (no validation). Returns the rendered cells and the errors."""
    from .sandbox import environment

    env = environment()
    plain = _compile(env, template, template.body)
    marked = _compile(env, template, _with_line_marks(template.body))
    header = (
        f"# rendered from {template.path.name}, cell {{id}}; edit the template, not this file\n"
    )
    rendered: list[RenderedCell] = []
    errors: list[UserError] = []
    for cell in template.cells:
        ctx = _context(template, cell)
        try:
            text = _render_bounded(plain, ctx)
            probe = _render_bounded(marked, ctx)
        except Exception as e:  # noqa: BLE001 - every Jinja failure becomes a UserError
            errors.append(_render_error(template, cell, e))
            continue
        # Drop the padding that kept line numbers aligned, then map lines to the template.
        lines = text.splitlines()
        probe_lines = probe.splitlines()
        exact = _MARK.sub("", probe) == text and len(probe_lines) == len(lines)
        marks = []
        last = template.body_line
        for pl in probe_lines if exact else []:
            found = _MARK.findall(pl)
            if found:
                last = int(found[-1])
            marks.append(last)
        if not exact:
            marks = [min(i + 1, template.body.count("\n") + 1) for i in range(len(lines))]
        skip = 0
        while skip < len(lines) and not lines[skip].strip():
            skip += 1
        body_text = "\n".join(lines[skip:]) + ("\n" if text.endswith("\n") else "")
        head = header.format(id=cell.id)
        rendered.append(
            RenderedCell(
                cell=cell,
                text=head + body_text,
                source=f"{template.path}[{cell.id}]",
                line_map=[template.body_line] + marks[skip:],
                exact_lines=exact,
            )
        )
    return rendered, errors


_WHERE_LINE = re.compile(r"^(?P<file>.*?):(?P<line>\d+)(?::(?P<col>\d+))?$")


def _relocate(error: UserError, rc: RenderedCell, template: GridTemplate) -> list[Issue]:
    """Point a spec error at the template lines that produced the offending rendered lines.

    The spec loader reports positions in the rendered text (``source`` = ``<template>[<id>]``);
    the researcher edits the template, so each position is mapped back to its template line.
    """
    raw = getattr(error, "issues", None)
    if not raw:
        m = _WHERE_LINE.match(error.where or "")
        raw = [
            Issue(
                file=m.group("file") if m else (error.where or rc.source),
                line=int(m.group("line")) if m else None,
                col=int(m.group("col")) if m and m.group("col") else None,
                message=error.message + (f" ({error.hint})" if error.hint else ""),
            )
        ]
    out = []
    for issue in raw:
        if issue.file == rc.source and issue.line is not None:
            t_line = rc.template_line(issue.line)
            note = "" if rc.exact_lines else f"; rendered line {issue.line}"
            out.append(
                Issue(
                    file=str(template.path),
                    line=t_line,
                    col=issue.col if rc.exact_lines else None,
                    message=f"cell {rc.cell.id}: {issue.message}{note}",
                    excerpt=issue.excerpt,
                    allowed=issue.allowed,
                    suggestion=issue.suggestion,
                )
            )
        else:
            out.append(
                Issue(
                    file=issue.file if issue.file != rc.source else str(template.path),
                    line=issue.line if issue.file != rc.source else None,
                    col=issue.col,
                    message=f"cell {rc.cell.id}: {issue.message}",
                    excerpt=issue.excerpt,
                    allowed=issue.allowed,
                    suggestion=issue.suggestion,
                )
            )
    return out


def _as_issue(error: UserError, template: GridTemplate) -> Issue:
    m = _WHERE_LINE.match(error.where or "")
    line = int(m.group("line")) if m else None
    excerpt = None
    if line is not None:
        src = template.body.splitlines()
        excerpt = src[line - 1] if 0 < line <= len(src) else None
    return Issue(
        file=m.group("file") if m else str(template.path),
        line=line,
        col=int(m.group("col")) if m and m.group("col") else None,
        message=error.message,
        excerpt=excerpt,
        allowed=error.hint,
    )


def spec_validator(
    template: GridTemplate, *, check_files: bool = False, sets: Sequence[str] = ()
) -> Callable:
    """The spec loader as a cell validator: relative paths in the rendered spec (and its
    ``extends:``) are relative to the template's folder, as they would be for a spec file kept
    next to it. ``sets``: ``--set PATH=VALUE`` items applied to every cell."""
    from .loader import load_spec_text

    base_dir = template.path.parent.resolve()

    def validate(text: str, source: str) -> Any:
        return load_spec_text(
            text, filename=source, base_dir=base_dir, check_files=check_files, sets=sets
        )

    return validate


_DEFAULT: Any = object()


def render_grid(
    template: GridTemplate | str | Path,
    *,
    validate: Callable[[str, str], Any] | None = _DEFAULT,
    check_files: bool = False,
    sets: Sequence[str] = (),
) -> list[RenderedCell]:
    """Render and validate every cell; raise one ``GridError`` listing every problem.

    ``validate(text, source)`` returns the validated spec or raises ``UserError`` (a
    ``SpecError`` with positions in ``source``); the default is the spec loader
    (:func:`spec_validator`, whose result is a resolved spec, with ``sets`` applied to every
    cell). Pass ``None`` to render only.
    Nothing is run here: callers run cells only after this returns.
    """
    if not isinstance(template, GridTemplate):
        template = load_template(template)
    if validate is _DEFAULT:
        validate = spec_validator(template, check_files=check_files, sets=sets)
    rendered, errors = render_cell_texts(template)
    issues = [_as_issue(e, template) for e in errors]
    if validate is not None:
        for rc in rendered:
            try:
                rc.spec = validate(rc.text, rc.source)
            except UserError as e:
                issues.extend(_relocate(e, rc, template))
        names: dict[str, str] = {}
        for rc in rendered:
            spec_name = getattr(rc.spec, "name", None)
            if spec_name is None:
                continue
            if spec_name in names:
                issues.append(
                    Issue(
                        file=str(template.path),
                        line=None,
                        col=None,
                        message=f"cells {names[spec_name]} and {rc.cell.id} render the same "
                        f"spec name {spec_name!r}; use {{{{ cell.slug }}}} in the name",
                    )
                )
            names[spec_name] = rc.cell.id
    if issues:
        raise GridError(template, issues)
    return rendered


class GridError(UserError):
    """Every problem found while rendering and validating a grid's cells (in cell order)."""

    def __init__(self, template: GridTemplate, issues: Sequence[Issue]):
        self.issues = list(issues)
        self.template = template
        first = self.issues[0]
        super().__init__(first.message, where=first.where)

    def render(self) -> str:
        cells = {i.message.split(":", 1)[0] for i in self.issues if i.message.startswith("cell ")}
        n = len(self.issues)
        tail = (
            f"{n} problem{'s' if n != 1 else ''} in grid {self.template.name!r}"
            + (f" ({len(cells)} of {len(self.template.cells)} cells)" if cells else "")
            + "; no cell was run"
        )
        return "\n".join([i.render() for i in self.issues] + [tail])

    def __str__(self) -> str:
        return self.render()


_EXTENDS = re.compile(r"^(extends:[ \t]*)(['\"]?)([^'\"\s#]+)\2([ \t]*(?:#.*)?)$", re.M)


def _rebase_extends(text: str, base_dir: Path, out: Path) -> str:
    """``text`` with a relative top-level ``extends:`` path rewritten from ``base_dir`` (the
    template's folder, which it is relative to) to ``out``: a cell rendered to another folder
    (``--render /tmp/cells``) still finds its base spec (before, it named a missing file)."""

    def fix(m: re.Match[str]) -> str:
        written = m.group(3)
        if Path(written).is_absolute():
            return m.group(0)
        new = os.path.relpath((base_dir / written).resolve(), out.resolve())
        return f"{m.group(1)}{m.group(2)}{Path(new).as_posix()}{m.group(2)}{m.group(4)}"

    return _EXTENDS.sub(fix, text)


def write_rendered(
    rendered: Sequence[RenderedCell], out_dir: str | Path, base_dir: str | Path | None = None
) -> list[Path]:
    """Write each cell's spec to ``<out_dir>/<cell id>.yaml`` atomically; return the paths.
    ``base_dir``: the template's folder, which relative ``extends:`` paths are rewritten from
    (None: left as written)."""

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = []
    for rc in rendered:
        target = out / f"{rc.cell.id}.yaml"
        text = rc.text if base_dir is None else _rebase_extends(rc.text, Path(base_dir), out)
        atomic_write_text(target, text)
        paths.append(target)
    return paths


# Cell, GridTemplate and load_template are the parsed template's (:mod:`.template_grid`),
# named here too so that a caller imports a grid's whole API from one module.
__all__ = [
    "Cell",
    "GridError",
    "GridTemplate",
    "RenderedCell",
    "load_template",
    "render_cell_texts",
    "render_grid",
    "spec_validator",
    "write_rendered",
]
