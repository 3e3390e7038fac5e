"""Schema validation of loaded spec data, with pydantic's errors mapped onto the YAML.

Each error becomes an :class:`Issue` at the file, line and column that wrote the value (or the
key, for unknown and missing keys), with the allowed values and a suggestion for a near miss.
"""

from __future__ import annotations

import re
import types
import typing
from collections.abc import Callable, Mapping, Sequence
from typing import Any, Literal, Union

from pydantic import BaseModel, ValidationError

from .errors import Issue, did_you_mean, join_allowed
from .schema import Spec
from .source import PathT, SourceMap, dotted

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


def _child_type(tp: Any, el: Any) -> Any:
    """The annotation one step below ``tp`` (not a union): field ``el`` of a model, the value
    type of a dict, the item type of a list or tuple; None when there is none."""
    tp = _strip(tp)
    origin = typing.get_origin(tp)
    if isinstance(tp, type) and issubclass(tp, BaseModel):
        f = tp.model_fields.get(el)
        return None if f is None else f.annotation
    if origin is dict:
        return typing.get_args(tp)[1]
    if origin in (list, tuple):
        return typing.get_args(tp)[0]
    return None


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
        tp = _child_type(tp, el)
        if tp is None:
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


def field_type(path: PathT, data: Any, root: type[BaseModel] = Spec) -> Any:
    """The schema's annotation at ``path`` of raw spec ``data`` (a union member is chosen by
    the ``type``/``kind`` the data has there), or None when the path leaves the schema."""
    tp: Any = root
    cur: Any = data
    for el in path:
        members = _members(tp)
        if members is not None:
            tag = None
            if isinstance(cur, Mapping):
                tag = cur.get("type", cur.get("kind"))
            tagged = [m for m in members if isinstance(m, type) and tag in _tag_values(m)]
            if len(tagged) == 1:
                tp = tagged[0]
            elif len(members) == 1:
                tp = members[0]
            else:
                return None
        tp = _child_type(tp, el)
        if tp is None:
            return None
        cur = cur.get(el) if isinstance(cur, Mapping) else None
    return tp


def holds_only_text(tp: Any) -> bool:
    """Whether a field of annotation ``tp`` holds text only (``str``, a Literal of strings,
    optionally None): a value given for it is taken as written, not as YAML reads it."""
    if tp is None:
        return False
    members = _members(tp) or [_strip(tp)]
    return all(
        m is str
        or (typing.get_origin(m) is Literal and all(isinstance(a, str) for a in typing.get_args(m)))
        for m in members
    )
