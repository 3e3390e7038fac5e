"""Specs that compose (issue 14 item 2): ``extends:``, ``--set path=value`` and ``vars:``.

Applied in this order to the loaded YAML, before schema validation, so that every error still
points at the file, line and column that wrote the value:

1. ``extends: <spec path>`` (relative to the extending file's folder): the base spec is loaded
   (it may extend another; a cycle, a missing file or more than :data:`MAX_EXTENDS` levels is
   an error at the ``extends:`` line) and this file deep-merged over it: mappings merge key by
   key, anything else replaces. As in Docker Compose, ``key: !override {...}`` replaces the
   base's mapping instead of merging into it and ``key: !reset`` removes the base's value
   (back to the schema's default). Relative paths in a base (dataset paths, a local model,
   metric weight files) stay relative to the base's own folder.
2. ``--set path=value`` (``unlearn.steps=10``, ``threats.benign.seeds=[1,2]``,
   ``vars.digit=3``): the value is read as YAML, then typed by the schema: a field that holds
   only text keeps the text as written (``--set tracking.experiment=2024`` is ``"2024"``).
   Missing mappings on the path are created; the value replaces what was there.
3. ``vars:``: named values. A string value ``$name`` is replaced by the variable's value with
   its type (a number stays a number, a list a list); ``${expr}`` is a Jinja expression in the
   sandbox of grid templates (``${range(10) | reject('eq', digit) | list}``), typed when it is
   the whole string, else its text is spliced in. A variable may use the ones above it.
   ``$$`` is a literal ``$``. Mapping keys are never substituted.
"""

from __future__ import annotations

import copy
import os
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from ..errors import UserError
from .errors import Issue, SpecError, join_allowed
from .resolve import is_hub_id
from .source import (
    MAX_SPEC_BYTES,
    RESET,
    PathT,
    SourceMap,
    _Builder,
    compose_bounded,
    dotted,
    load_yaml_text,
    new_loader,
)
from .validation import field_type, holds_only_text

MAX_EXTENDS = 16
SET_FILE = "--set"

_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
_WHOLE_NAME = re.compile(r"^\$([A-Za-z_][A-Za-z0-9_]*)$")
_EXPR = re.compile(r"\$\$|\$\{(.*?)\}|\$([A-Za-z_][A-Za-z0-9_]*)?")


# --------------------------------------------------------------------------- reading files


def read_spec_file(path: str | Path, *, at: Issue | None = None) -> str:
    """The text of a spec file, refused past :data:`MAX_SPEC_BYTES` before it is read whole.

    ``at``: where the file was named (an ``extends:`` line); problems are reported there."""
    p = Path(path)
    problem: tuple[str, str | None] | None = None
    raw = b""
    try:
        with open(p, "rb") as f:
            raw = f.read(MAX_SPEC_BYTES + 1)
    except FileNotFoundError:
        problem = f"spec file '{path}' does not exist", "give the path of a .yaml spec"
    except IsADirectoryError:
        problem = f"'{path}' is a folder, not a spec file", None
    except OSError as exc:
        problem = f"cannot read spec '{path}': {exc.strerror}", None
    if problem is None and len(raw) > MAX_SPEC_BYTES:
        head = raw[:MAX_SPEC_BYTES].decode("utf-8", errors="replace")
        line = head.count("\n") + 1
        raise SpecError(
            [
                Issue(
                    str(path),
                    line,
                    len(head) - (head.rfind("\n") + 1) + 1,
                    f"the spec is more than the {MAX_SPEC_BYTES:,} bytes a spec may have; "
                    "split the study into a grid template or several specs",
                )
            ]
        )
    if problem is None:
        try:
            return raw.decode("utf-8")
        except UnicodeDecodeError as exc:
            problem = f"'{path}' is not UTF-8 text: {exc.reason}", None
    message, hint = problem
    if at is None:
        raise UserError(message, hint=hint)
    raise SpecError([Issue(at.file, at.line, at.col, f"extends: {message}", at.excerpt)])


# --------------------------------------------------------------------------- extends


def _display(child_file: str, written: str, target: Path) -> str:
    """The base's name in messages: the child's folder joined with what was written, when
    that names the same file from here, else the absolute path."""
    guess = os.path.normpath(os.path.join(os.path.dirname(child_file), written))
    try:
        if Path(guess).resolve() == target:
            return guess
    except OSError:
        pass
    return str(target)


def _absolutize_base(data: dict[str, Any], base_dir: Path) -> None:
    """Relative paths a base wrote stay relative to the base's folder once merged elsewhere
    (the fields ``resolve`` makes absolute, with the same rules)."""

    def fix(v: Any) -> Any:
        if isinstance(v, str) and v and "$" not in v:
            p = Path(v).expanduser()
            return v if p.is_absolute() else str((base_dir / p).resolve())
        return v

    for d in (
        (data.get("datasets") or {}).values() if isinstance(data.get("datasets"), dict) else ()
    ):
        if isinstance(d, dict) and "path" in d:
            d["path"] = fix(d["path"])
    model = data.get("model")
    if isinstance(model, dict):
        pre = model.get("pretrained")
        if isinstance(pre, str) and "$" not in pre and not is_hub_id(pre, base_dir):
            model["pretrained"] = fix(pre)
    metrics = (
        (data.get("evaluate") or {}).get("metrics")
        if isinstance(data.get("evaluate"), dict)
        else None
    )
    for m in metrics if isinstance(metrics, list) else ():
        if isinstance(m, dict):
            for k in m:
                if k.endswith("_path"):
                    m[k] = fix(m[k])


def _merge(
    base: dict[str, Any], bmap: SourceMap, child: dict[str, Any], cmap: SourceMap
) -> tuple[dict[str, Any], SourceMap]:
    """``child`` deep-merged over ``base``; the source map says which file wrote each value."""
    out_map = SourceMap(cmap.file, cmap.lines, texts={**bmap.texts, **cmap.texts})
    if bmap.file != cmap.file:
        out_map.texts[bmap.file] = bmap.lines

    def copy_tree(smap: SourceMap, value: Any, path: PathT) -> None:
        smap.copy_entry(out_map, path)
        if isinstance(value, dict):
            for k, v in value.items():
                copy_tree(smap, v, (*path, k))
        elif isinstance(value, list):
            for i, v in enumerate(value):
                copy_tree(smap, v, (*path, i))

    def merge(b: dict[str, Any], c: dict[str, Any], path: PathT) -> dict[str, Any]:
        # Keys keep the base's order and new keys follow in the child's (as OmegaConf merges):
        # ``vars`` are read in order, so a child that sets the base's ``digit`` must not move
        # it after the base's ``others``, which uses it.
        out: dict[str, Any] = {}
        for k in [*b, *(k for k in c if k not in b)]:
            p = (*path, k)
            if k not in c:
                out[k] = b[k]
                copy_tree(bmap, b[k], p)
                continue
            cv = c[k]
            if cv is RESET:
                continue
            bv = b.get(k)
            if isinstance(cv, dict) and isinstance(bv, dict) and p not in cmap.overrides:
                out[k] = merge(bv, cv, p)
                cmap.copy_entry(out_map, p)
            else:
                out[k] = cv
                copy_tree(cmap, cv, p)
        return out

    data = merge(base, child, ())
    cmap.copy_entry(out_map, ())
    # kept for the baselines pass: a baseline's ``!override`` replaces the unlearn block's
    # mapping there too (resolve.build_rows); without it a baseline's meta configs were
    # merged into the unlearn block's, so a benign row silently kept the poisoned configs
    out_map.overrides = bmap.overrides | cmap.overrides
    return data, out_map


def _extend(
    data: dict[str, Any], smap: SourceMap, base_dir: Path, chain: tuple[Path, ...]
) -> tuple[dict[str, Any], SourceMap]:
    if "extends" not in data:
        return data, smap
    written = data.pop("extends")
    at = smap.issue(("extends",), "")
    if written is RESET:
        return data, smap
    if not isinstance(written, str) or not written.strip():
        raise SpecError(
            [
                smap.issue(
                    ("extends",),
                    f"extends: expected the path of a spec file (relative to this file's "
                    f"folder), got {written!r}",
                )
            ]
        )
    target = (base_dir / Path(written).expanduser()).resolve()
    if target in chain:
        names = [p.name for p in chain[chain.index(target) :]] + [target.name]
        raise SpecError(
            [
                smap.issue(
                    ("extends",),
                    f"extends: the specs extend each other in a cycle: {' → '.join(names)}; "
                    "a spec may not extend itself, directly or through others",
                )
            ]
        )
    if len(chain) > MAX_EXTENDS:
        raise SpecError(
            [smap.issue(("extends",), f"extends: more than {MAX_EXTENDS} specs extend each other")]
        )
    at = Issue(at.file, at.line, at.col, "", at.excerpt)
    if not target.is_file():
        raise SpecError(
            [
                Issue(
                    at.file,
                    at.line,
                    at.col,
                    f"extends: '{written}' does not exist (looked for {target}); the path is "
                    "relative to the folder of the file that says extends:",
                    at.excerpt,
                )
            ]
        )
    text = read_spec_file(target, at=at)
    bdata, bmap = load_yaml_text(text, _display(smap.file, written, target))
    bdata, bmap = _extend(bdata, bmap, target.parent, (*chain, target))
    if target.parent != base_dir:
        _absolutize_base(bdata, target.parent)
    return _merge(bdata, bmap, data, smap)


# --------------------------------------------------------------------------- --set


def _parse_set_path(key: str) -> PathT | None:
    path: list[Any] = []
    for part in key.split("."):
        m = re.fullmatch(r"([^\[\]]+)((?:\[\d+\])*)", part)
        if not m:
            return None
        path.append(m.group(1))
        path.extend(int(i) for i in re.findall(r"\[(\d+)\]", m.group(2)))
    return tuple(path)


def _set_value(raw: str, line: int, col0: int, lines: list[str]) -> Any:
    """``raw`` read as a YAML value with the spec loader's rules and bounds."""
    smap = SourceMap(SET_FILE, [raw])
    issues: list[Issue] = []
    try:
        loader = new_loader(raw, SET_FILE)
    except SpecError as err:
        i = err.issues[0]
        raise SpecError([Issue(SET_FILE, line, col0 + (i.col or 1), i.message, None)]) from None
    try:
        try:
            root = compose_bounded(loader, SET_FILE, [raw])
        except SpecError as err:
            issues = list(err.issues)
            root = None
        value = None if root is None else _Builder(loader, smap, issues).build(root, ())
    finally:
        loader.dispose()
    if issues:
        raise SpecError(
            [Issue(SET_FILE, line, col0 + (i.col or 1), i.message, lines[line - 1]) for i in issues]
        )
    return value


def apply_sets(data: dict[str, Any], smap: SourceMap, items: Sequence[str]) -> dict[str, str]:
    """Apply ``--set PATH=VALUE`` items in order; returns ``{dotted path: value as written}``.
    Positions of the values set point at ``--set:<n>:<col>`` (the n-th ``--set``)."""
    lines = list(items)
    if lines:
        smap.texts[SET_FILE] = lines
    applied: dict[str, str] = {}
    issues: list[Issue] = []
    for n, item in enumerate(lines, start=1):
        key, eq, raw = item.partition("=")
        path = _parse_set_path(key.strip()) if eq else None
        if not path:
            issues.append(
                Issue(
                    SET_FILE,
                    n,
                    1,
                    f"--set {item!r}: expected PATH=VALUE, PATH a dotted path into the spec "
                    "(e.g. unlearn.steps=10, threats.benign.seeds=[1,2], vars.digit=3)",
                    item,
                )
            )
            continue
        col = len(key) + 2
        try:
            value = _set_value(raw, n, len(key) + 1, lines)
        except SpecError as err:
            issues += err.issues
            continue
        if not path or path[0] not in ("vars",):
            tp = field_type(path, data)
            if value is not None and not isinstance(value, str) and holds_only_text(tp):
                value = raw.strip()
        parent: Any = data
        ok = True
        for i, el in enumerate(path[:-1]):
            nxt = path[i + 1]
            if isinstance(parent, dict):
                if not isinstance(parent.get(el), dict | list):
                    if el in parent and parent[el] is not None and parent[el] is not RESET:
                        issues.append(
                            Issue(
                                SET_FILE,
                                n,
                                1,
                                f"--set {key}: {dotted(path[: i + 1])} is a single value, not "
                                f"a mapping or list, so it has no '{nxt}'",
                                item,
                            )
                        )
                        ok = False
                        break
                    parent[el] = {}
                    smap.keys[path[: i + 1]] = smap.values[path[: i + 1]] = (n, 1)
                    smap.files[path[: i + 1]] = SET_FILE
                parent = parent[el]
            elif isinstance(parent, list) and isinstance(el, int) and el < len(parent):
                parent = parent[el]
            else:
                issues.append(
                    Issue(
                        SET_FILE,
                        n,
                        1,
                        f"--set {key}: {dotted(path[:i])} has no element {el!r}",
                        item,
                    )
                )
                ok = False
                break
        if not ok:
            continue
        last = path[-1]
        if isinstance(parent, list):
            if not isinstance(last, int) or last >= len(parent):
                issues.append(
                    Issue(
                        SET_FILE,
                        n,
                        1,
                        f"--set {key}: {dotted(path[:-1])} is a list of {len(parent)}; give an "
                        f"index below {len(parent)}",
                        item,
                    )
                )
                continue
        elif not isinstance(parent, dict) or isinstance(last, int):
            issues.append(
                Issue(SET_FILE, n, 1, f"--set {key}: {dotted(path[:-1])} is not a mapping", item)
            )
            continue
        for p in list(smap.paths_under(path)):
            smap.values.pop(p, None)
            smap.keys.pop(p, None)
            smap.files.pop(p, None)
        parent[last] = value
        smap.keys[path] = (n, 1)
        smap.values[path] = (n, col)
        smap.files[path] = SET_FILE
        applied[dotted(path)] = raw.strip()
    if issues:
        raise SpecError(issues)
    return applied


# --------------------------------------------------------------------------- vars


class _Vars:
    def __init__(self, smap: SourceMap):
        self.smap = smap
        self.values: dict[str, Any] = {}
        self.issues: list[Issue] = []
        self.env: Any = None

    def _problem(self, path: PathT, message: str) -> None:
        self.issues.append(self.smap.issue(path, message))

    def _lookup(self, name: str, path: PathT) -> Any:
        if name in self.values:
            return copy.deepcopy(self.values[name])
        known = join_allowed(self.values) if self.values else "none defined"
        self._problem(
            path,
            f"{dotted(path)}: unknown variable '{name}' (vars: {known}; a variable may use "
            "only the vars above it)",
        )
        return None

    def _evaluate(self, expr: str, path: PathT) -> Any:
        if _NAME.match(expr.strip()):
            return self._lookup(expr.strip(), path)
        if self.env is None:
            from .sandbox import environment

            self.env = environment()
        try:
            result = self.env.compile_expression(expr, undefined_to_none=False)(**self.values)
            return _plain(result)
        except Exception as exc:  # noqa: BLE001 - every failure of a user expression is an issue
            msg = getattr(exc, "message", None) or str(exc)
            self._problem(path, f"{dotted(path)}: cannot evaluate ${{{expr}}}: {msg}")
            return None

    def text(self, s: str, path: PathT) -> Any:
        if "$" not in s:
            return s
        m = _WHOLE_NAME.match(s)
        if m:
            return self._lookup(m.group(1), path)
        whole = re.fullmatch(r"\$\{(.*)\}", s, re.S)
        if whole and "${" not in whole.group(1):
            return self._evaluate(whole.group(1), path)

        def splice(m: re.Match[str]) -> str:
            if m.group(0) == "$$":
                return "$"
            if m.group(1) is not None:
                v = self._evaluate(m.group(1), path)
            elif m.group(2) is not None:
                v = self._lookup(m.group(2), path)
            else:
                return "$"
            return _spelt(v)

        return _EXPR.sub(splice, s)

    def walk(self, value: Any, path: PathT) -> Any:
        if isinstance(value, str):
            return self.text(value, path)
        if isinstance(value, dict):
            return {k: self.walk(v, (*path, k)) for k, v in value.items()}
        if isinstance(value, list):
            return [self.walk(v, (*path, i)) for i, v in enumerate(value)]
        return value


def _spelt(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if v is None:
        return "null"
    return str(v)


def _plain(v: Any) -> Any:
    """An expression's result as YAML data (a Jinja generator becomes a list)."""
    if v is None or isinstance(v, bool | int | float):
        return v
    if isinstance(v, str):
        return str(v)
    if isinstance(v, Mapping):
        return {str(k): _plain(x) for k, x in v.items()}
    if isinstance(v, list | tuple | range):
        return [_plain(x) for x in v]
    raise TypeError(f"the expression gives a {type(v).__name__}, not a value a spec can hold")


def substitute_vars(data: dict[str, Any], smap: SourceMap) -> dict[str, Any]:
    """Remove ``vars:`` and substitute its values everywhere else (see the module doc)."""
    raw = data.pop("vars", None)
    subst = _Vars(smap)
    if raw is not None and raw is not RESET:
        if not isinstance(raw, dict):
            raise SpecError([smap.issue(("vars",), "vars: expected a mapping of name: value")])
        for name, value in raw.items():
            if not _NAME.match(name):
                subst.issues.append(
                    smap.issue(
                        ("vars", name),
                        f"vars: '{name}' is not a variable name (letters, digits and _, not "
                        "starting with a digit)",
                        at_key=True,
                    )
                )
                continue
            subst.values[name] = subst.walk(value, ("vars", name))
    out = {k: subst.walk(v, (k,)) for k, v in data.items()}
    if subst.issues:
        raise SpecError(subst.issues)
    return out


def _strip_resets(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _strip_resets(v) for k, v in value.items() if v is not RESET}
    if isinstance(value, list):
        return [_strip_resets(v) for v in value if v is not RESET]
    return value


# --------------------------------------------------------------------------- entry


def compose_text(
    text: str,
    filename: str,
    base_dir: str | Path,
    *,
    sets: Sequence[str] = (),
    path: Path | None = None,
) -> tuple[dict[str, Any], SourceMap, dict[str, str]]:
    """Load a spec's YAML and apply ``extends``, ``--set`` items and ``vars``: the data the
    schema validates, its source map and the ``--set`` values applied (dotted path → text).
    ``path``: the spec's own file, so that a cycle through it is found."""
    data, smap = load_yaml_text(text, filename)
    chain = (path.resolve(),) if path is not None else ()
    data, smap = _extend(data, smap, Path(base_dir), chain)
    applied = apply_sets(data, smap, sets)
    data = substitute_vars(data, smap)
    return _strip_resets(data), smap, applied
