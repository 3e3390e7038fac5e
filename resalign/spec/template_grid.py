"""Grid templates: one spec written in Jinja2, a front matter that declares the grid.

A template file looks like::

    # comments and blank lines may precede the front matter
    ---
    name: ablation                 # grid name (default: the file name without .yaml.j2)
    description: the paper's ablation rows
    matrix:                        # a product over named axes, first axis varies slowest
      hypergradient: [none, moreau]
      meta: [none, data, data_and_configs]
    exclude:                       # cells removed when every listed axis matches
      - {hypergradient: none, meta: data}
    include:                       # explicit cells, as in CI matrices (below)
      - {hypergradient: unrolled, meta: none}
    vars:                          # constants visible to every cell
      steps: 40
    ---
    name: ablation-{{ cell.slug }}
    unlearn:
      resilience:
        hypergradient: {kind: {{ hypergradient }}}
    ...

``include`` follows CI-matrix semantics: an entry whose matrix-axis values match existing cells
adds its other keys (as variables) to those cells; an entry that matches no cell becomes a new
cell, and its keys become axes of the grid. The cell id lists the cell's axis values in the
order the axes first appear in the front matter (``hypergradient=moreau,meta=data``), each value
spelt as written in the front matter, so the same cell has the same id in run names, MLflow
tags, file names and store paths.

Rendering the body into cells is :mod:`.templates`.
"""

from __future__ import annotations

import difflib
import itertools
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from ..errors import UserError
from .errors import SpecError
from .source import MAX_SPEC_BYTES, compose_bounded, new_loader

Scalar = str | int | float | bool

FRONT_MATTER_KEYS = ("name", "description", "matrix", "include", "exclude", "vars")
RESERVED_NAMES = frozenset(
    {"cell", "grid", "range", "dict", "lipsum", "cycler", "joiner", "namespace", "loop", "self"}
)
_IDENT = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
_ID_VALUE = re.compile(r"^[A-Za-z0-9_.+-]+$")


@dataclass(frozen=True)
class Cell:
    """One cell of a grid: its axis values (in axis order), extra variables from ``include``
    and its position in the grid."""

    id: str
    axes: dict[str, Scalar]
    extras: dict[str, Any] = field(default_factory=dict)
    index: int = 0

    @property
    def slug(self) -> str:
        """The id in the alphabet of spec names and run names (``=`` → ``-``, ``,`` → ``__``)."""
        return self.id.replace("=", "-").replace(",", "__")

    @property
    def spelt(self) -> dict[str, str]:
        """Axis values spelt as in the id (as written in the front matter: ``1e-5``)."""
        # ids are "axis=value,..." and values cannot contain '=' or ',' (_ID_VALUE)
        return dict(kv.split("=", 1) for kv in self.id.split(","))

    @property
    def tags(self) -> dict[str, str]:
        """MLflow tags that identify the cell (``grid.cell`` and one ``grid.axis.<name>``),
        values spelt as in the id."""
        out = {"grid.cell": self.id}
        out.update({f"grid.axis.{k}": v for k, v in self.spelt.items()})
        return out


@dataclass
class GridTemplate:
    """A parsed template: its grid and its Jinja body (padded so line numbers are file lines)."""

    path: Path
    name: str
    description: str
    axes: list[str]
    cells: list[Cell]
    variables: dict[str, Any]
    body: str
    body_line: int  # file line of the body's first line

    def cell(self, cell_id: str) -> Cell:
        for c in self.cells:
            if c.id == cell_id:
                return c
        raise UserError(
            f"no cell {cell_id!r} in grid {self.name!r}",
            where=str(self.path),
            hint="cells: " + ", ".join(c.id for c in self.cells),
        )


# --------------------------------------------------------------------------- parsing


def _spell(value: Scalar) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    return str(value)


def _node_to_py(node: yaml.Node, loader: yaml.SafeLoader, where: Callable[[yaml.Node], str]):
    """Build Python values from a composed YAML node, rejecting duplicate keys."""
    if isinstance(node, yaml.MappingNode):
        out: dict[Any, Any] = {}
        for k_node, v_node in node.value:
            key = _node_to_py(k_node, loader, where)
            if key in out:
                raise UserError(
                    f"duplicate key {key!r} in the front matter",
                    where=where(k_node),
                    hint="each key may appear once; merge the two entries",
                )
            out[key] = _node_to_py(v_node, loader, where)
        return out
    if isinstance(node, yaml.SequenceNode):
        return [_node_to_py(n, loader, where) for n in node.value]
    try:
        return loader.construct_object(node, deep=True)
    except (yaml.YAMLError, ValueError, OverflowError) as exc:
        # A tag the safe loader does not know, an integer Python refuses to parse, ...
        raise UserError(
            f"cannot read this front matter value: {getattr(exc, 'problem', None) or exc}",
            where=where(node),
        ) from None


def _split_front_matter(text: str, path: Path) -> tuple[str, int, int]:
    """Return (front matter text, its first file line, first file line of the body)."""
    lines = text.splitlines(keepends=True)
    start = None
    for i, line in enumerate(lines):
        s = line.strip()
        if not s or s.startswith("#"):
            continue
        if s == "---":
            start = i
        break
    if start is None:
        raise UserError(
            "a grid template must begin with a front matter between two '---' lines",
            where=f"{path}:1",
            hint="put '---', then 'matrix:' with the grid's axes, then '---' above the spec",
        )
    for j in range(start + 1, len(lines)):
        if lines[j].strip() == "---":
            return "".join(lines[start + 1 : j]), start + 2, j + 2
    raise UserError(
        "the front matter opened on this line is never closed",
        where=f"{path}:{start + 1}",
        hint="close it with a line containing only '---' before the spec body",
    )


def _scalar_check(value: Any, what: str, where: str) -> Scalar:
    if isinstance(value, bool | int | float | str) and value is not None:
        if not _ID_VALUE.match(_spell(value)):
            raise UserError(
                f"{what} {_spell(value)!r} cannot appear in a cell id",
                where=where,
                hint="use letters, digits and _ . + - only (ids name files and MLflow runs)",
            )
        return value
    raise UserError(
        f"{what} must be a single value (string, number or boolean), got {type(value).__name__}",
        where=where,
        hint="put lists and mappings under 'vars:' or in the spec body",
    )


def _name_check(name: Any, what: str, where: str) -> str:
    if not isinstance(name, str) or not _IDENT.match(name):
        raise UserError(
            f"{what} {name!r} is not a valid variable name",
            where=where,
            hint="use letters, digits and underscores, not starting with a digit",
        )
    if name in RESERVED_NAMES:
        raise UserError(
            f"{what} {name!r} is reserved in templates",
            where=where,
            hint="rename it; reserved: " + ", ".join(sorted(RESERVED_NAMES)),
        )
    return name


def _same(a: Any, b: Any) -> bool:
    """Equal values of the same YAML kind (``true`` is not ``1``, ``"1"`` is not ``1``)."""
    kind = (bool, str)
    for k in kind:
        if isinstance(a, k) or isinstance(b, k):
            return isinstance(a, k) and isinstance(b, k) and a == b
    return a == b


class _FrontMatter:
    """The parsed front matter: its values, their YAML nodes and positions in the file."""

    def __init__(self, path: Path, fm_line: int, values: dict[str, Any], nodes: dict[str, Any]):
        self.path = path
        self.fm_line = fm_line
        self.values = values
        self.nodes = nodes

    def where(self, node: yaml.Node | None) -> str:
        if node is None:
            return f"{self.path}:{self.fm_line}"
        return f"{self.path}:{self.fm_line + node.start_mark.line}:{node.start_mark.column + 1}"

    def at(self, key: str) -> str:
        return self.where(self.nodes.get(key))


def _read_template(path: Path) -> str:
    try:
        with open(path, "rb") as f:
            raw = f.read(MAX_SPEC_BYTES + 1)
    except FileNotFoundError:
        raise UserError("template not found", where=str(path), hint="check the path") from None
    except OSError as e:
        raise UserError(f"cannot read the template: {e}", where=str(path)) from None
    if len(raw) > MAX_SPEC_BYTES:
        raise UserError(
            f"the template is more than the {MAX_SPEC_BYTES:,} bytes a spec may have",
            where=str(path),
            hint="split the study into several templates",
        )
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise UserError(f"cannot read the template: {e}", where=str(path)) from None


def _parse_front_matter(path: Path, fm_text: str, fm_line: int) -> _FrontMatter:
    """The front matter's YAML (the spec loader's rules and bounds) with its keys checked."""
    try:
        loader = new_loader(fm_text, str(path))
    except SpecError as err:
        issue = err.issues[0]
        raise UserError(
            f"the front matter is not valid YAML: {issue.message}",
            where=f"{path}:{fm_line + (issue.line or 1) - 1}",
        ) from None
    try:
        try:
            root = compose_bounded(loader, str(path), fm_text.splitlines())
        except SpecError as err:
            issue = err.issues[0]
            line = fm_line + (issue.line or 1) - 1
            message = issue.message.removeprefix("YAML syntax error: ")
            raise UserError(
                f"the front matter is not valid YAML: {message}",
                where=f"{path}:{line}",
                hint="the front matter is a YAML mapping with matrix/include/exclude/vars",
            ) from None
        fm = _FrontMatter(path, fm_line, {}, {})
        if root is None:
            raise UserError(
                "the front matter is empty",
                where=fm.where(None),
                hint="declare the grid, e.g. 'matrix: {hypergradient: [none, moreau]}'",
            )
        if not isinstance(root, yaml.MappingNode):
            raise UserError(
                "the front matter must be a mapping", where=fm.where(root), hint="see docs"
            )
        for k_node, v_node in root.value:
            key = k_node.value
            if key not in FRONT_MATTER_KEYS:
                close = difflib.get_close_matches(str(key), FRONT_MATTER_KEYS, n=1)
                raise UserError(
                    f"unknown front matter key {key!r}"
                    + (f"; did you mean {close[0]!r}?" if close else ""),
                    where=fm.where(k_node),
                    hint="allowed: " + ", ".join(FRONT_MATTER_KEYS),
                )
            if key in fm.nodes:
                raise UserError(
                    f"duplicate key {key!r} in the front matter",
                    where=fm.where(k_node),
                    hint="each key may appear once",
                )
            fm.nodes[key] = v_node
        fm.values = {k: _node_to_py(v, loader, fm.where) for k, v in fm.nodes.items()}
    finally:
        loader.dispose()
    return fm


def _matrix(fm: _FrontMatter) -> tuple[list[str], dict[str, list[Scalar]], dict]:
    """The matrix axes in order, their checked values and each value's spelling as written."""
    matrix = fm.values.get("matrix", {}) or {}
    if not isinstance(matrix, dict):
        raise UserError(
            "matrix must be a mapping of axis name → list of values",
            where=fm.at("matrix"),
            hint="e.g. 'matrix: {lr: [1e-5, 1e-4], steps: [50, 200]}'",
        )
    m_nodes = {k.value: (k, v) for k, v in fm.nodes["matrix"].value} if matrix else {}
    axes: list[str] = []
    values: dict[str, list[Scalar]] = {}
    for axis, vals in matrix.items():
        k_node, v_node = m_nodes[axis]
        _name_check(axis, "axis", fm.where(k_node))
        if not isinstance(vals, list) or not vals:
            raise UserError(
                f"axis {axis!r} needs a non-empty list of values",
                where=fm.where(v_node),
                hint=f"e.g. '{axis}: [a, b]'",
            )
        checked = []
        for i, v in enumerate(vals):
            w = fm.where(v_node.value[i])
            checked.append(_scalar_check(v, f"value of axis {axis!r}", w))
            if any(_same(v, c) for c in checked[:-1]):
                raise UserError(f"axis {axis!r} lists {_spell(v)!r} twice", where=w)
        axes.append(axis)
        values[axis] = checked
    # Spell values as written in the front matter so `1e-5` stays `1e-5` in ids.
    spelling: dict[tuple[str, int], str] = {}
    for axis in axes:
        for i, n in enumerate(m_nodes[axis][1].value):
            spelling[(axis, i)] = n.value if isinstance(n, yaml.ScalarNode) else _spell(n)
    return axes, values, spelling


def _variables(fm: _FrontMatter, values: dict[str, list[Scalar]]) -> dict[str, Any]:
    variables = fm.values.get("vars", {}) or {}
    if not isinstance(variables, dict):
        raise UserError("vars must be a mapping of name → value", where=fm.at("vars"))
    for k in variables:
        _name_check(k, "variable", fm.at("vars"))
        if k in values:
            raise UserError(
                f"{k!r} is both an axis and a variable",
                where=fm.at("vars"),
                hint="rename one of them",
            )
    return dict(variables)


def _entries(fm: _FrontMatter, key: str) -> list[tuple[dict[str, Any], yaml.Node]]:
    raw = fm.values.get(key, []) or []
    if not isinstance(raw, list) or not all(isinstance(e, dict) and e for e in raw):
        raise UserError(
            f"{key} must be a list of non-empty mappings axis → value",
            where=fm.at(key),
            hint=f"e.g. '{key}: [{{hypergradient: none, meta: data}}]'",
        )
    return list(zip(raw, fm.nodes[key].value)) if raw else []


@dataclass
class _Cells:
    """Cells under construction: axis values, their spellings and ``include`` extras."""

    axes: list[str]
    values: dict[str, list[Scalar]]
    cells: list[dict[str, Scalar]] = field(default_factory=list)
    spellings: list[dict[str, str]] = field(default_factory=list)
    extras: list[dict[str, Any]] = field(default_factory=list)


def _product_minus_excludes(fm: _FrontMatter, g: _Cells, spelling: dict) -> None:
    if g.axes:
        for idx in itertools.product(*[range(len(g.values[a])) for a in g.axes]):
            g.cells.append({a: g.values[a][i] for a, i in zip(g.axes, idx)})
            g.spellings.append({a: spelling[(a, i)] for a, i in zip(g.axes, idx)})
    for entry, e_node in _entries(fm, "exclude"):
        for k, v in entry.items():
            if k not in g.values:
                close = difflib.get_close_matches(str(k), g.axes, n=1)
                raise UserError(
                    f"exclude names {k!r}, which is not a matrix axis"
                    + (f"; did you mean {close[0]!r}?" if close else ""),
                    where=fm.where(e_node),
                    hint="axes: " + ", ".join(g.axes),
                )
            if not any(_same(v, x) for x in g.values[k]):
                raise UserError(
                    f"exclude has {k}={_spell(v)!r}, which is not a value of axis {k!r}",
                    where=fm.where(e_node),
                    hint=f"values of {k}: " + ", ".join(_spell(x) for x in g.values[k]),
                )
        keep = [
            i for i, c in enumerate(g.cells) if not all(_same(c[k], v) for k, v in entry.items())
        ]
        g.cells = [g.cells[i] for i in keep]
        g.spellings = [g.spellings[i] for i in keep]
    g.extras = [{} for _ in g.cells]


def _apply_includes(fm: _FrontMatter, g: _Cells, variables: dict[str, Any]) -> None:
    """CI-matrix ``include``: extend the matrix cells an entry matches, else add a cell."""
    n_matrix = len(g.cells)
    for entry, e_node in _entries(fm, "include"):
        w = fm.where(e_node)
        for k in entry:
            _name_check(k, "include key", w)
            if k in variables:
                raise UserError(f"include key {k!r} is also declared under vars", where=w)
        on_axes = {k: v for k, v in entry.items() if k in g.values}
        rest = {k: v for k, v in entry.items() if k not in g.values}
        matches = [
            i
            for i in range(n_matrix)
            if all(_same(g.cells[i].get(k), v) for k, v in on_axes.items())
        ]
        if matches and g.axes:
            for i in matches:
                g.extras[i].update(rest)
            continue
        new: dict[str, Scalar] = {}
        spelt: dict[str, str] = {}
        k_nodes = {k.value: v for k, v in e_node.value}
        for k, v in entry.items():
            new[k] = _scalar_check(v, f"include value {k!r}", w)
            n = k_nodes[k]
            spelt[k] = n.value if isinstance(n, yaml.ScalarNode) else _spell(v)
            if k not in g.values:
                g.axes.append(k)
                g.values[k] = []
            if not any(_same(v, x) for x in g.values[k]):
                g.values[k].append(v)
        g.cells.append(new)
        g.spellings.append(spelt)
        g.extras.append({})


def _identified(fm: _FrontMatter, g: _Cells) -> list[Cell]:
    if not g.cells:
        raise UserError(
            "the grid has no cells",
            where=fm.where(None),
            hint="declare 'matrix:' axes or 'include:' cells (and check 'exclude:')",
        )
    out: list[Cell] = []
    seen: dict[str, int] = {}
    for i, (c, sp, ex) in enumerate(zip(g.cells, g.spellings, g.extras)):
        ordered = {a: c[a] for a in g.axes if a in c}
        cid = ",".join(f"{a}={sp[a]}" for a in g.axes if a in c)
        if cid in seen:
            raise UserError(
                f"two cells have the same id {cid!r}",
                where=fm.at("include"),
                hint="an include entry repeats a cell of the matrix; remove it or change a value",
            )
        seen[cid] = i
        out.append(Cell(id=cid, axes=ordered, extras=dict(ex), index=i))
    slugs = [c.slug for c in out]
    if len(set(slugs)) != len(slugs):
        raise UserError(
            "two cells map to the same name; rename an axis value", where=fm.where(None)
        )
    return out


def load_template(path: str | Path, text: str | None = None) -> GridTemplate:
    """Parse a template file: its front matter into cells, its body into a Jinja source.

    Raises ``UserError`` (with file and line) for a malformed front matter, unknown keys,
    empty axes, excludes naming unknown axes or values, and duplicate cell ids. The front
    matter is read with the spec loader's rules and bounds (``resalign.spec.source``).
    """
    path = Path(path)
    if text is None:
        text = _read_template(path)
    fm_text, fm_line, body_line = _split_front_matter(text, path)
    fm = _parse_front_matter(path, fm_text, fm_line)
    name = fm.values.get("name", path.name.removesuffix(".j2").removesuffix(".yaml"))
    if not isinstance(name, str) or not re.match(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$", name):
        raise UserError(
            f"grid name {name!r} is not a valid name",
            where=fm.at("name"),
            hint="letters, digits and _ . - (it names the MLflow parent run)",
        )
    description = fm.values.get("description", "")
    if not isinstance(description, str):
        raise UserError("description must be a string", where=fm.at("description"))
    axes, values, spelling = _matrix(fm)
    variables = _variables(fm, values)
    grid = _Cells(axes, values)
    _product_minus_excludes(fm, grid, spelling)
    _apply_includes(fm, grid, variables)
    cells = _identified(fm, grid)
    lines = text.splitlines(keepends=True)
    # Pad with blank lines so Jinja's line numbers are the file's line numbers.
    body = "\n" * (body_line - 1) + "".join(lines[body_line - 1 :])
    return GridTemplate(
        path=path,
        name=name,
        description=description,
        axes=grid.axes,
        cells=cells,
        variables=variables,
        body=body,
        body_line=body_line,
    )


__all__ = ["Cell", "GridTemplate", "Scalar", "load_template"]
