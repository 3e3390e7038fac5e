"""Read one YAML document into plain data and a map of where every value was written.

The YAML is read with PyYAML's safe loader (no Python tags) with two departures from
``yaml.safe_load``, both to remove footguns: a duplicate key is an error instead of the last
one silently winning, and scientific notation without a dot (``1e-5``, ``1E-5``, ``.5e3``) is a
float as in YAML 1.2 rather than a string. Mapping keys are taken as written (``on:`` is the key
``"on"``, not ``True``).

Reading is bounded, so a spec pasted from elsewhere or rendered by a template cannot take the
machine down (issue 15): at most :data:`MAX_SPEC_BYTES` of text, :data:`MAX_DEPTH` levels of
nesting and :data:`MAX_VALUES` values once aliases are expanded. Each limit is a
``file:line:col`` error. Measured before the limits: nine nested aliases ("billion laughs",
9 lines) grew ``resalign validate`` to 3.3 GB; 5,000 nested brackets raised ``RecursionError``.
Two YAML tags are allowed, both for ``extends:`` (``resalign.spec.compose``), as in Docker
Compose: ``!override`` (replace the base's value instead of merging into it) and ``!reset``
(remove the base's value: back to the default).
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import yaml

from .errors import Issue, SpecError

PathT = tuple[Any, ...]

# The 20,000-line spec of issue 15 is 0.6 MB; a real spec is under 20 kB.
MAX_SPEC_BYTES = 2_000_000
# The deepest shipped spec nests 7 levels (unlearn.resilience.meta.configs.<name>.<key>).
MAX_DEPTH = 64
# Values (keys count too) after alias expansion: a 20,000-line spec (the demo with 1,800
# threats) has 47,000; refusing at 100,001 took 5.8 s (whole command) on a 2-core machine at load 9.
MAX_VALUES = 100_000

_FLOAT_TAG = "tag:yaml.org,2002:float"
_SEQ_TAG = "tag:yaml.org,2002:seq"
_MAP_TAG = "tag:yaml.org,2002:map"
_MERGE_TAG = "tag:yaml.org,2002:merge"
OVERRIDE_TAG = "!override"
RESET_TAG = "!reset"
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


class LimitError(yaml.MarkedYAMLError):
    """A bound of this module was crossed while composing (raised with the node's mark)."""


if getattr(yaml, "__with_libyaml__", False):
    from yaml._yaml import CParser as _Parser

    # libyaml scans and parses; composing stays in Python (yaml.composer.Composer) so that
    # the bounds below apply. Measured: 200,000 values composed in 5.0 s instead of 29 s
    # (loaded 2-core machine), the same nodes and marks on the shipped specs.
    class _Base(
        yaml.composer.Composer, _Parser, yaml.constructor.SafeConstructor, yaml.resolver.Resolver
    ):
        def __init__(self, stream: str) -> None:
            _Parser.__init__(self, stream)
            yaml.composer.Composer.__init__(self)
            yaml.constructor.SafeConstructor.__init__(self)
            yaml.resolver.Resolver.__init__(self)

else:  # pragma: no cover - PyYAML built without libyaml
    _Base = yaml.SafeLoader  # type: ignore[misc,assignment]


class SpecYAMLLoader(_Base):  # type: ignore[misc,valid-type]
    """Safe loading (no Python tags) with YAML 1.2 floats and the bounds of this module; a
    private class, so yaml.SafeLoader is untouched. Also the grid templates' front matter
    loader."""

    def __init__(self, stream: str) -> None:
        super().__init__(stream)
        self._depth = 0
        self._nodes = 0

    def compose_node(self, parent: Any, index: Any) -> Any:
        # The composer recurses once per level: bound it before Python's stack is.
        self._depth += 1
        try:
            if self._depth > MAX_DEPTH:
                raise LimitError(
                    None,
                    None,
                    f"the spec nests deeper than {MAX_DEPTH} levels; a spec needs fewer than "
                    "10 (look for unclosed brackets or runaway indentation)",
                    self.peek_event().start_mark,
                )
            self._nodes += 1
            if self._nodes > MAX_VALUES:
                # Distinct nodes are at most the expanded values: refuse before composing more.
                raise LimitError(
                    None,
                    None,
                    f"the spec holds more than the {MAX_VALUES:,} values a spec may have",
                    self.peek_event().start_mark,
                )
            return super().compose_node(parent, index)
        finally:
            self._depth -= 1

    def dispose(self) -> None:
        # CParser has no dispose(); the pure-Python loader's breaks reference cycles.
        getattr(super(), "dispose", lambda: None)()


SpecYAMLLoader.yaml_implicit_resolvers = {
    ch: [(tag, rx) for tag, rx in resolvers if tag != _FLOAT_TAG]
    for ch, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()
}
SpecYAMLLoader.add_implicit_resolver(_FLOAT_TAG, _FLOAT_RE, list("-+0123456789."))


class _Reset:
    """The value of a ``!reset`` key: removed when specs are merged (see compose)."""

    def __repr__(self) -> str:
        return "!reset"


RESET = _Reset()


@dataclass
class SourceMap:
    """Where each value and key of a loaded YAML document is. Paths are tuples of mapping keys
    and list indices from the top (``("threats", "dreambench", "lr")``).

    Positions are in ``file`` unless ``files`` names another file for the path (a value
    inherited through ``extends:``, or given with ``--set``); ``texts`` holds those files'
    lines for excerpts. ``overrides`` are the paths tagged ``!override``."""

    file: str
    lines: list[str]
    values: dict[PathT, tuple[int, int]] = field(default_factory=dict)
    keys: dict[PathT, tuple[int, int]] = field(default_factory=dict)
    files: dict[PathT, str] = field(default_factory=dict)
    texts: dict[str, list[str]] = field(default_factory=dict)
    overrides: set[PathT] = field(default_factory=set)

    def _nearest(self, path: PathT, at_key: bool) -> tuple[PathT, tuple[int, int]] | None:
        p = tuple(path)
        while True:
            if at_key and p in self.keys:
                return p, self.keys[p]
            if p in self.values:
                return p, self.values[p]
            if p in self.keys:
                return p, self.keys[p]
            if not p:
                return None
            p = p[:-1]

    def position(self, path: PathT, *, at_key: bool = False) -> tuple[int, int] | None:
        """Line/column (1-based) of ``path`` or of its nearest ancestor that has one."""
        found = self._nearest(path, at_key)
        return found[1] if found else None

    def file_of(self, path: PathT) -> str:
        """The file that wrote ``path`` (exactly this path, not an ancestor)."""
        return self.files.get(tuple(path), self.file)

    def lines_of(self, file: str) -> list[str]:
        return self.lines if file == self.file else self.texts.get(file, [])

    def issue(
        self,
        path: PathT,
        message: str,
        *,
        at_key: bool = False,
        allowed: str | None = None,
        suggestion: str | None = None,
    ) -> Issue:
        found = self._nearest(path, at_key)
        if found is None:
            return Issue(self.file, None, None, message, None, allowed, suggestion)
        p, (line, col) = found
        file = self.file_of(p)
        lines = self.lines_of(file)
        excerpt = lines[line - 1] if line <= len(lines) else None
        return Issue(file, line, col, message, excerpt, allowed, suggestion)

    def paths_under(self, path: PathT) -> Iterator[PathT]:
        """Every recorded path at or below ``path``."""
        n = len(path)
        for p in {*self.values, *self.keys}:
            if p[:n] == path:
                yield p

    def copy_entry(self, dst: SourceMap, path: PathT) -> None:
        """Copy the key and value position of ``path`` (only) into ``dst``, with their file."""
        file = self.file_of(path)
        for src, out in ((self.values, dst.values), (self.keys, dst.keys)):
            if path in src:
                out[path] = src[path]
                if file != dst.file:
                    dst.files[path] = file
                else:
                    dst.files.pop(path, None)
        if file != dst.file and file not in dst.texts:
            dst.texts[file] = self.lines_of(file)


def dotted(path: PathT) -> str:
    """``("threats", "db", "seeds", 0)`` → ``threats.db.seeds[0]``."""
    out = ""
    for p in path:
        out += f"[{p}]" if isinstance(p, int) else (f".{p}" if out else str(p))
    return out or "<top level>"


def _mark(node: yaml.Node) -> tuple[int, int]:
    return node.start_mark.line + 1, node.start_mark.column + 1


def _line_col_at(text: str, offset: int) -> tuple[int, int]:
    line = text.count("\n", 0, offset) + 1
    return line, offset - (text.rfind("\n", 0, offset) + 1) + 1


def size_issue(text: str, filename: str) -> Issue | None:
    """An issue at the line where ``text`` crosses :data:`MAX_SPEC_BYTES`, or None."""
    size = len(text.encode("utf-8")) if len(text) * 4 > MAX_SPEC_BYTES else len(text)
    if size <= MAX_SPEC_BYTES:
        return None
    offset = (
        MAX_SPEC_BYTES
        if size == len(text)
        else len(text.encode("utf-8")[:MAX_SPEC_BYTES].decode("utf-8", errors="ignore"))
    )
    line, col = _line_col_at(text, offset)
    return Issue(
        filename,
        line,
        col,
        f"the spec is {size:,} bytes, more than the {MAX_SPEC_BYTES:,} a spec may have; "
        "split the study into a grid template or several specs",
    )


def expansion_issue(root: yaml.Node) -> tuple[yaml.Node, str] | None:
    """Check the composed document against :data:`MAX_VALUES` and :data:`MAX_DEPTH` with its
    aliases expanded, without expanding them (each distinct node is counted once, memoized).

    Returns (node, message) for the first node over a limit or in an alias cycle, else None.
    """
    seen: dict[int, tuple[int, int]] = {}  # id → (values, height) of the expanded node
    active: set[int] = set()

    class _Over(Exception):
        def __init__(self, node: yaml.Node, message: str):
            self.node, self.message = node, message

    def too_deep(node: yaml.Node) -> _Over:
        return _Over(
            node, f"with its aliases expanded the spec nests deeper than {MAX_DEPTH} levels"
        )

    def size(node: yaml.Node, depth: int) -> int:
        if id(node) in seen:
            n, height = seen[id(node)]
            if depth + height - 1 > MAX_DEPTH:  # an alias placed deeper than its anchor
                raise too_deep(node)
            return n
        if depth > MAX_DEPTH:
            raise too_deep(node)
        if id(node) in active:
            raise _Over(node, "recursive alias: a YAML anchor refers to itself")
        active.add(id(node))
        children: list[yaml.Node] = []
        if isinstance(node, yaml.SequenceNode):
            children = list(node.value)
        elif isinstance(node, yaml.MappingNode):
            children = [c for kv in node.value for c in kv]
        n = 1 + sum(size(c, depth + 1) for c in children)
        height = 1 + max((seen[id(c)][1] for c in children), default=0)
        active.discard(id(node))
        if n > MAX_VALUES:
            raise _Over(
                node,
                f"with its aliases expanded this value holds {n:,} values, more than the "
                f"{MAX_VALUES:,} a spec may have (each '*alias' copies its anchor's block; "
                "aliases of aliases multiply)",
            )
        seen[id(node)] = (n, height)
        return n

    try:
        size(root, 1)
    except _Over as over:
        return over.node, over.message
    return None


class _Builder:
    def __init__(self, loader: SpecYAMLLoader, smap: SourceMap, issues: list[Issue]):
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
        if node.tag == RESET_TAG:
            return RESET
        if node.tag == OVERRIDE_TAG:
            self.smap.overrides.add(path)
            node = _retagged(node, self.loader)
        if isinstance(node, yaml.ScalarNode):
            try:
                return self.loader.construct_object(node, deep=True)
            except (yaml.YAMLError, ValueError, OverflowError) as exc:
                # ValueError: Python refuses int('9' * 5000) (sys.set_int_max_str_digits).
                self._issue_at(node, f"cannot read this value: {getattr(exc, 'problem', exc)}")
                return None
        if node.tag not in (_SEQ_TAG, _MAP_TAG):
            self._issue_at(
                node,
                f"cannot read this value: the tag {node.tag!r} is not allowed in a spec "
                f"(allowed: {OVERRIDE_TAG}, {RESET_TAG})",
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
            if knode.tag == _MERGE_TAG:
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
            if knode.tag == _MERGE_TAG or not isinstance(knode, yaml.ScalarNode):
                continue
            key = str(knode.value)
            if key in done:
                continue
            done.add(key)
            self.smap.keys[(*path, key)] = _mark(knode)
            self.smap.values[(*path, key)] = _mark(vnode)
            out[key] = self.build(vnode, (*path, key))
        return out


def _retagged(node: yaml.Node, loader: SpecYAMLLoader) -> yaml.Node:
    """``!override`` on a mapping, list or scalar: the same node with its ordinary tag."""
    if isinstance(node, yaml.MappingNode):
        return yaml.MappingNode(_MAP_TAG, node.value, node.start_mark, node.end_mark)
    if isinstance(node, yaml.SequenceNode):
        return yaml.SequenceNode(_SEQ_TAG, node.value, node.start_mark, node.end_mark)
    resolved = loader.resolve(yaml.ScalarNode, node.value, (node.style is None, False))
    return yaml.ScalarNode(resolved, node.value, node.start_mark, node.end_mark, node.style)


def _reader_issue(exc: yaml.reader.ReaderError, text: str, filename: str) -> Issue:
    """A character YAML forbids (a control character, U+FFFE) at its position."""
    pos = exc.position
    if isinstance(exc.character, int) and getattr(exc, "encoding", None) != "unicode":
        # libyaml reports a byte offset into the UTF-8 text
        pos = len(text.encode("utf-8")[:pos].decode("utf-8", errors="ignore"))
    line, col = _line_col_at(text, min(pos, len(text)))
    lines = text.splitlines()
    excerpt = lines[line - 1] if line <= len(lines) else None
    char = f"U+{exc.character:04X}" if isinstance(exc.character, int) else repr(exc.character)
    return Issue(
        filename,
        line,
        col,
        f"the character {char} is not allowed in YAML (a control character: delete it or "
        "write it as an escape in a double-quoted string)",
        None if excerpt is None else "".join(c if c.isprintable() else "?" for c in excerpt),
    )


def new_loader(text: str, filename: str) -> SpecYAMLLoader:
    """A loader for ``text``; a character YAML forbids is a :class:`SpecError` at its position
    (the pure-Python reader checks the whole text when the loader is made)."""
    try:
        return SpecYAMLLoader(text)
    except yaml.reader.ReaderError as exc:
        raise SpecError([_reader_issue(exc, text, filename)]) from None


def compose_bounded(loader: SpecYAMLLoader, filename: str, lines: list[str]) -> yaml.Node | None:
    """The loader's single document as a node tree, checked against every bound; raises
    :class:`SpecError` on YAML errors and crossed bounds."""
    try:
        root = loader.get_single_node()
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        line, col = (mark.line + 1, mark.column + 1) if mark else (None, None)
        problem = exc.problem or str(exc)
        if exc.context:
            problem = f"{exc.context}, {problem}"
        if "exceeded maximum nesting depth" in problem:
            # libyaml's own bound (1,000 levels), met while it scans ahead of our composer
            problem = f"the spec nests deeper than {MAX_DEPTH} levels; a spec needs fewer than 10"
        elif not isinstance(exc, LimitError):
            problem = f"YAML syntax error: {problem}"
        excerpt = lines[line - 1] if line and line <= len(lines) else None
        raise SpecError([Issue(filename, line, col, problem, excerpt)]) from None
    except yaml.reader.ReaderError as exc:  # libyaml finds them while parsing
        raise SpecError([_reader_issue(exc, "\n".join(lines), filename)]) from None
    except yaml.YAMLError as exc:
        raise SpecError([Issue(filename, None, None, f"YAML error: {exc}")]) from None
    except RecursionError:  # a bound above should make this unreachable; never a traceback
        raise SpecError(
            [Issue(filename, 1, 1, f"the spec nests too deeply (limit {MAX_DEPTH} levels)")]
        ) from None
    if root is not None:
        over = expansion_issue(root)
        if over is not None:
            node, message = over
            line, col = _mark(node)
            excerpt = lines[line - 1] if line <= len(lines) else None
            raise SpecError([Issue(filename, line, col, message, excerpt)])
    return root


def load_yaml_text(text: str, filename: str) -> tuple[Any, SourceMap]:
    """Parse one YAML document into plain Python data and its :class:`SourceMap`.

    Raises :class:`SpecError` on YAML syntax errors, duplicate keys, unsafe tags, several
    documents, an empty document, a top level that is not a mapping, or a crossed bound
    (size, depth, expanded values). Values tagged ``!reset`` are :data:`RESET`.
    """
    over = size_issue(text, filename)
    if over is not None:
        raise SpecError([over])
    smap = SourceMap(filename, text.splitlines())
    issues: list[Issue] = []
    loader = new_loader(text, filename)
    try:
        root = compose_bounded(loader, filename, smap.lines)
        data = None if root is None else _Builder(loader, smap, issues).build(root, ())
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
