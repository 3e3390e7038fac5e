"""Load a YAML spec, keeping the line and column of every node, and validate it.

The YAML is read with PyYAML's safe loader (no Python tags) with two departures from
``yaml.safe_load``, both to remove footguns: a duplicate key is an error instead of the last
one silently winning, and scientific notation without a dot (``1e-5``, ``1E-5``, ``.5e3``) is a
float as in YAML 1.2 rather than a string. Mapping keys are taken as written (``on:`` is the key
``"on"``, not ``True``). Every problem found — YAML, schema, cross-reference — is collected and
raised together as one :class:`SpecError`.
"""

from __future__ import annotations

import re
import types
import typing
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, Union

import yaml
from pydantic import BaseModel, ValidationError

from ..errors import UserError
from .errors import Issue, SpecError, did_you_mean, join_allowed
from .schema import Spec

if TYPE_CHECKING:
    from .resolve import ResolvedSpec

PathT = tuple[Any, ...]

_FLOAT_TAG = "tag:yaml.org,2002:float"
_SEQ_TAG = "tag:yaml.org,2002:seq"
_MAP_TAG = "tag:yaml.org,2002:map"
# YAML 1.2-style floats: a dot or an exponent (sign optional) makes a float.
_FLOAT_RE = re.compile(
    r"""^(?:[-+]?[0-9][0-9_]*\.[0-9_]*(?:[eE][-+]?[0-9]+)?
    |[-+]?[0-9][0-9_]*[eE][-+]?[0-9]+
    |[-+]?\.[0-9][0-9_]*(?:[eE][-+]?[0-9]+)?
    |[-+]?[0-9][0-9_]*(?::[0-5]?[0-9])+\.[0-9_]*
    |[-+]?\.(?:inf|Inf|INF)
    |\.(?:nan|NaN|NAN))$""",
    re.X,
)


class _SpecLoader(yaml.SafeLoader):
    """SafeLoader with the float resolver above; a private copy so yaml.SafeLoader is untouched."""


_SpecLoader.yaml_implicit_resolvers = {
    ch: [(tag, rx) for tag, rx in resolvers if tag != _FLOAT_TAG]
    for ch, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()
}
_SpecLoader.add_implicit_resolver(_FLOAT_TAG, _FLOAT_RE, list("-+0123456789."))


@dataclass
class SourceMap:
    """Where each value and key of a loaded YAML document is. Paths are tuples of mapping keys
    and list indices from the top (``("threats", "dreambench", "lr")``)."""

    file: str
    lines: list[str]
    values: dict[PathT, tuple[int, int]] = field(default_factory=dict)
    keys: dict[PathT, tuple[int, int]] = field(default_factory=dict)

    def position(self, path: PathT, *, at_key: bool = False) -> tuple[int, int] | None:
        """Line/column (1-based) of ``path`` or of its nearest ancestor that has one."""
        p = tuple(path)
        while True:
            if at_key and p in self.keys:
                return self.keys[p]
            if p in self.values:
                return self.values[p]
            if p in self.keys:
                return self.keys[p]
            if not p:
                return None
            p = p[:-1]

    def issue(
        self,
        path: PathT,
        message: str,
        *,
        at_key: bool = False,
        allowed: str | None = None,
        suggestion: str | None = None,
    ) -> Issue:
        pos = self.position(path, at_key=at_key)
        line, col = pos if pos else (None, None)
        excerpt = self.lines[line - 1] if line and line <= len(self.lines) else None
        return Issue(self.file, line, col, message, excerpt, allowed, suggestion)


def dotted(path: PathT) -> str:
    """``("threats", "db", "seeds", 0)`` → ``threats.db.seeds[0]``."""
    out = ""
    for p in path:
        out += f"[{p}]" if isinstance(p, int) else (f".{p}" if out else str(p))
    return out or "<top level>"


def _mark(node: yaml.Node) -> tuple[int, int]:
    return node.start_mark.line + 1, node.start_mark.column + 1


class _Builder:
    def __init__(self, loader: _SpecLoader, smap: SourceMap, issues: list[Issue]):
        self.loader = loader
        self.smap = smap
        self.issues = issues
        self.stack: set[int] = set()

    def _issue_at(self, node: yaml.Node, message: str) -> None:
        line, col = _mark(node)
        excerpt = self.smap.lines[line - 1] if line <= len(self.smap.lines) else None
        self.issues.append(Issue(self.smap.file, line, col, message, excerpt))

    def build(self, node: yaml.Node, path: PathT) -> Any:
        self.smap.values.setdefault(path, _mark(node))
        if isinstance(node, yaml.ScalarNode):
            try:
                return self.loader.construct_object(node, deep=True)
            except yaml.YAMLError as exc:
                self._issue_at(node, f"cannot read this value: {getattr(exc, 'problem', exc)}")
                return None
        if node.tag not in (_SEQ_TAG, _MAP_TAG):
            self._issue_at(
                node, f"cannot read this value: the tag {node.tag!r} is not allowed in a spec"
            )
            return None
        if id(node) in self.stack:
            self._issue_at(node, "recursive alias: a YAML anchor refers to itself")
            return None
        self.stack.add(id(node))
        try:
            if isinstance(node, yaml.SequenceNode):
                return [self.build(item, (*path, i)) for i, item in enumerate(node.value)]
            if isinstance(node, yaml.MappingNode):
                return self._mapping(node, path)
            self._issue_at(node, f"unsupported YAML node {type(node).__name__}")
            return None
        finally:
            self.stack.discard(id(node))

    def _mapping(self, node: yaml.MappingNode, path: PathT) -> dict[str, Any]:
        out: dict[str, Any] = {}
        seen: dict[str, int] = {}
        merged: list[yaml.Node] = []
        for knode, vnode in node.value:
            if knode.tag == "tag:yaml.org,2002:merge":
                merged.extend(vnode.value if isinstance(vnode, yaml.SequenceNode) else [vnode])
                continue
            if not isinstance(knode, yaml.ScalarNode):
                self._issue_at(knode, "a mapping key must be a plain name, not a list or mapping")
                continue
            key = str(knode.value)
            if key in seen:
                self._issue_at(
                    knode,
                    f"duplicate key '{key}' in {dotted(path)} (first defined on line "
                    f"{seen[key]}); a key may appear once",
                )
                continue
            seen[key] = knode.start_mark.line + 1
        # '<<' merges first, so the mapping's own keys override them as YAML specifies.
        for m in merged:
            value = self.build(m, path)
            if isinstance(value, dict):
                for k, v in value.items():
                    out.setdefault(k, v)
            else:
                self._issue_at(m, "a '<<' merge needs a mapping (or a list of mappings)")
        done: set[str] = set()
        for knode, vnode in node.value:
            if knode.tag == "tag:yaml.org,2002:merge" or not isinstance(knode, yaml.ScalarNode):
                continue
            key = str(knode.value)
            if key in done:
                continue
            done.add(key)
            self.smap.keys[(*path, key)] = _mark(knode)
            self.smap.values[(*path, key)] = _mark(vnode)
            out[key] = self.build(vnode, (*path, key))
        return out


def load_yaml_text(text: str, filename: str) -> tuple[Any, SourceMap]:
    """Parse one YAML document into plain Python data and its :class:`SourceMap`.

    Raises :class:`SpecError` on YAML syntax errors, duplicate keys, unsafe tags, several
    documents, an empty document or a top level that is not a mapping.
    """
    smap = SourceMap(filename, text.splitlines())
    issues: list[Issue] = []
    loader = _SpecLoader(text)
    try:
        root = loader.get_single_node()
        data = None if root is None else _Builder(loader, smap, issues).build(root, ())
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        line, col = (mark.line + 1, mark.column + 1) if mark else (None, None)
        problem = exc.problem or str(exc)
        if exc.context:
            problem = f"{exc.context}, {problem}"
        excerpt = smap.lines[line - 1] if line and line <= len(smap.lines) else None
        raise SpecError(
            [Issue(filename, line, col, f"YAML syntax error: {problem}", excerpt)]
        ) from None
    except yaml.YAMLError as exc:
        raise SpecError([Issue(filename, None, None, f"YAML error: {exc}")]) from None
    finally:
        loader.dispose()
    if issues:
        raise SpecError(issues)
    if root is None:
        raise SpecError(
            [
                Issue(
                    filename,
                    1,
                    1,
                    "the spec is empty: write a mapping with at least 'name', 'model' and "
                    "'concepts' (see `resalign schema`)",
                )
            ]
        )
    if not isinstance(data, dict):
        kind = "a list" if isinstance(data, list) else f"a {type(data).__name__} value"
        raise SpecError(
            [
                smap.issue(
                    (),
                    f"the top level must be a mapping of sections (name:, model:, concepts:, "
                    f"...), got {kind}",
                )
            ]
        )
    return data, smap


# --------------------------------------------------------------------------- schema errors


def _strip(tp: Any) -> Any:
    while typing.get_origin(tp) is typing.Annotated:
        tp = typing.get_args(tp)[0]
    return tp


def _members(tp: Any) -> list[Any] | None:
    tp = _strip(tp)
    if typing.get_origin(tp) in (Union, types.UnionType):
        return [_strip(a) for a in typing.get_args(tp) if a is not type(None)]
    return None


def _tag_values(model: type[BaseModel]) -> list[str]:
    for name in ("type", "kind"):
        f = model.model_fields.get(name)
        if f is not None and typing.get_origin(f.annotation) is Literal:
            return [str(a) for a in typing.get_args(f.annotation)]
    return []


def _type_at(loc: Sequence[Any], root: type[BaseModel] = Spec) -> Any:
    """The annotation the schema has at pydantic location ``loc`` (which names union members by
    their tag), or None when it cannot be followed."""
    tp: Any = root
    for el in loc:
        members = _members(tp)
        if members is not None:
            tagged = [m for m in members if isinstance(m, type) and el in _tag_values(m)]
            if tagged:
                tp = tagged[0]
                continue
            if len(members) != 1:
                return None
            tp = members[0]
        tp = _strip(tp)
        origin = typing.get_origin(tp)
        if isinstance(tp, type) and issubclass(tp, BaseModel):
            f = tp.model_fields.get(el)
            if f is None:
                return None
            tp = f.annotation
        elif origin is dict:
            tp = typing.get_args(tp)[1]
        elif origin in (list, tuple):
            tp = typing.get_args(tp)[0]
        else:
            return None
    return tp


def _model_at(loc: Sequence[Any], root: type[BaseModel] = Spec) -> type[BaseModel] | None:
    tp = _type_at(loc, root)
    members = _members(tp)
    if members is not None and len(members) == 1:
        tp = members[0]
    tp = _strip(tp)
    return tp if isinstance(tp, type) and issubclass(tp, BaseModel) else None


def _locate(loc: Sequence[Any], data: Any) -> tuple[PathT, list[Any]]:
    """Follow ``loc`` through the YAML data: the deepest existing path and the loc elements
    that were not found there (union tags, names of missing keys)."""
    path: list[Any] = []
    rest: list[Any] = []
    cur = data
    for el in loc:
        if isinstance(cur, dict) and el in cur:
            cur = cur[el]
            path.append(el)
        elif isinstance(cur, list) and isinstance(el, int) and 0 <= el < len(cur):
            cur = cur[el]
            path.append(el)
        else:
            rest.append(el)
    return tuple(path), rest


def _get_path(data: Any, path: PathT) -> Any:
    for p in path:
        data = data[p]
    return data


def _quoted(text: str) -> list[str]:
    return re.findall(r"'([^']*)'", text or "")


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def schema_issues(
    err: ValidationError,
    data: Any,
    smap: SourceMap,
    *,
    root: type[BaseModel] = Spec,
    prefix: PathT | Callable[[PathT], PathT] = (),
) -> list[Issue]:
    """Map pydantic's errors onto the YAML. ``root`` is the model that was validated and
    ``prefix`` where ``data`` sits in the file, or a function of the found path giving it (for
    sections validated on their own, such as a baseline's merged ``unlearn`` block)."""
    issues: list[Issue] = []
    seen: set[tuple[Any, ...]] = set()
    for e in err.errors(include_url=False):
        loc = e["loc"]
        typ = e["type"]
        ctx = e.get("ctx") or {}
        path, rest = _locate(loc, data)
        full_loc = loc
        where = (*(prefix(path) if callable(prefix) else prefix), *path)
        if typ == "extra_forbidden":
            key = loc[-1]
            model = _model_at(full_loc[:-1], root)
            fields = list(model.model_fields) if model else []
            parent = dotted(where[:-1]) if where else "<top level>"
            issue = smap.issue(
                where,
                f"unknown key '{key}' in {parent}",
                at_key=True,
                allowed=join_allowed(fields) if fields else None,
                suggestion=did_you_mean(key, fields),
            )
        elif typ == "missing":
            missing = rest[-1] if rest else loc[-1]
            model = _model_at(full_loc[:-1], root)
            desc = ""
            if model is not None and missing in model.model_fields:
                desc = model.model_fields[missing].description or ""
            issue = smap.issue(
                where,
                f"missing required key '{missing}' in {dotted(where)}"
                + (f" ({desc})" if desc else ""),
                at_key=True,
            )
        elif typ == "literal_error":
            options = _quoted(str(ctx.get("expected", "")))
            issue = smap.issue(
                where,
                f"{dotted(where)}: {_short(e.get('input'))} is not one of the allowed values",
                allowed=join_allowed(options),
                suggestion=did_you_mean(e.get("input"), options),
            )
        elif typ == "union_tag_invalid":
            disc = (_quoted(str(ctx.get("discriminator", ""))) or ["type"])[0]
            options = _quoted(str(ctx.get("expected_tags", "")))
            tag = ctx.get("tag")
            issue = smap.issue(
                (*where, disc),
                f"{dotted((*where, disc))}: unknown {disc} {tag!r}",
                allowed=join_allowed(options),
                suggestion=did_you_mean(tag, options),
            )
        elif typ == "union_tag_not_found":
            disc = (_quoted(str(ctx.get("discriminator", ""))) or ["type"])[0]
            members = _members(_type_at(full_loc, root)) or []
            options = [t for m in members if isinstance(m, type) for t in _tag_values(m)]
            issue = smap.issue(
                where,
                f"missing key '{disc}' in {dotted(where)}: say which kind this is",
                at_key=True,
                allowed=join_allowed(options) if options else None,
            )
        elif typ in ("model_type", "model_attributes_type", "dict_type"):
            got = type(e.get("input")).__name__
            got = {"list": "a list", "NoneType": "nothing", "str": "a string"}.get(got, got)
            issue = smap.issue(
                where, f"{dotted(where)}: expected a mapping (key: value lines), got {got}"
            )
        elif typ == "list_type":
            issue = smap.issue(
                where,
                f"{dotted(where)}: expected a list, got {_short(e.get('input'))}; "
                "write [a, b] or one '- item' per line",
            )
        else:
            msg = str(e["msg"])
            if msg.startswith("Value error, "):
                msg = msg[len("Value error, ") :]
                # A model check that names one of its fields ("eval_at has ...") points there.
                first = re.split(r"[ .:]", msg, maxsplit=1)[0]
                node = _get_path(data, path)
                if isinstance(node, dict) and first in node:
                    issue = smap.issue((*where, first), f"{dotted(where)}: {msg}", at_key=True)
                else:
                    issue = smap.issue(where, f"{dotted(where)}: {msg}", at_key=True)
            else:
                msg = msg[:1].lower() + msg[1:]
                got = e.get("input")
                shown = "" if isinstance(got, dict | list) else f" (got {_short(got)})"
                issue = smap.issue(where, f"{dotted(where)}: {msg}{shown}")
        ident = (issue.line, issue.col, issue.message)
        if ident not in seen:
            seen.add(ident)
            issues.append(issue)
    return issues


def validate_data(data: Mapping[str, Any], smap: SourceMap) -> tuple[Spec | None, list[Issue]]:
    """Validate loaded YAML against the schema; every schema error as an :class:`Issue`."""
    try:
        return Spec.model_validate(data), []
    except ValidationError as err:
        return None, schema_issues(err, data, smap)


# --------------------------------------------------------------------------- entry points


def load_spec_text(
    text: str,
    *,
    filename: str = "<spec>",
    base_dir: str | Path = ".",
    check_files: bool = False,
) -> ResolvedSpec:
    """Load, validate and resolve a spec given as text (a rendered template, a test).

    Returns a :class:`resalign.spec.resolve.ResolvedSpec`; raises :class:`SpecError` listing
    every problem. ``check_files`` also requires every referenced data file, local model and
    metric weight file to exist (``resalign run`` does this before executing anything).
    """
    from .resolve import resolve

    data, smap = load_yaml_text(text, filename)
    spec, issues = validate_data(data, smap)
    resolved, more = resolve(spec, data, smap, Path(base_dir), check_files=check_files)
    for issue in more:
        if all(
            (i.line, i.col, i.message) != (issue.line, issue.col, issue.message) for i in issues
        ):
            issues.append(issue)
    if issues or resolved is None:
        raise SpecError(issues or [smap.issue((), "invalid spec")])
    return resolved


def load_spec(path: str | Path, *, check_files: bool = False) -> ResolvedSpec:
    """Load, validate and resolve the spec file at ``path``; relative paths inside it are
    relative to its folder. See :func:`load_spec_text`."""
    p = Path(path)
    try:
        text = p.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise UserError(
            f"spec file '{path}' does not exist", hint="give the path of a .yaml spec"
        ) from None
    except IsADirectoryError:
        raise UserError(f"'{path}' is a folder, not a spec file") from None
    except UnicodeDecodeError as exc:
        raise UserError(f"'{path}' is not UTF-8 text: {exc.reason}", where=str(path)) from None
    except OSError as exc:
        raise UserError(f"cannot read spec '{path}': {exc.strerror}") from None
    return load_spec_text(
        text, filename=str(path), base_dir=p.parent.resolve(), check_files=check_files
    )
