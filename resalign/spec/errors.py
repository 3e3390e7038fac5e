"""Spec problems a researcher can act on: each names file, line, column, the offending text,
what is allowed and, for a near miss, what was probably meant."""

from __future__ import annotations

import difflib
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from ..errors import UserError

_EXCERPT = 100  # characters of a long source line shown around the column


@dataclass(frozen=True)
class Issue:
    """One problem in a spec. ``line``/``col`` are 1-based (None when the file has no position
    for it, e.g. an empty file)."""

    file: str
    line: int | None
    col: int | None
    message: str
    excerpt: str | None = None
    allowed: str | None = None
    suggestion: str | None = None

    @property
    def where(self) -> str:
        if self.line is None:
            return self.file
        return f"{self.file}:{self.line}:{self.col or 1}"

    def headline(self) -> str:
        """The one line a terminal or an editor's problem matcher reads."""
        text = f"{self.where}: {self.message}"
        if self.suggestion:
            text += f"; did you mean {self.suggestion!r}?"
        return text

    def render(self) -> str:
        lines = [self.headline()]
        if self.excerpt is not None and self.line is not None:
            gutter = f"{self.line:>5} | "
            text, caret = self.excerpt.rstrip(), max((self.col or 1) - 1, 0)
            if len(text) > _EXCERPT:
                # A window around the column: a 10,000-character line is no help on a terminal.
                start = max(0, min(caret - _EXCERPT // 2, len(text) - _EXCERPT))
                text = ("..." if start else "") + text[start : start + _EXCERPT] + "..."
                caret = caret - start + (3 if start else 0)
            lines.append(gutter + text)
            lines.append(" " * (len(gutter) + caret) + "^")
        if self.allowed:
            lines.append(f"      allowed: {self.allowed}")
        return "\n".join(lines)


class SpecError(UserError):
    """Every problem found in one spec, reported together."""

    def __init__(self, issues: Sequence[Issue]):
        self.issues = sorted(
            issues, key=lambda i: (i.file, i.line if i.line is not None else 0, i.col or 0)
        )
        first = self.issues[0] if self.issues else None
        super().__init__(
            first.message if first else "invalid spec",
            where=first.where if first else None,
        )

    def render(self) -> str:
        files = sorted({i.file for i in self.issues})
        n = len(self.issues)
        tail = f"{n} problem{'s' if n != 1 else ''} in {', '.join(files)}"
        return "\n".join([i.render() for i in self.issues] + [tail])

    def __str__(self) -> str:
        return self.render()


def did_you_mean(word: object, options: Iterable[object]) -> str | None:
    """The closest option to ``word`` (difflib ratio >= 0.6), or None."""
    if not isinstance(word, str):
        return None
    opts = [str(o) for o in options]
    lowered = {o.lower(): o for o in opts}
    if word.lower() in lowered and lowered[word.lower()] != word:
        return lowered[word.lower()]
    hits = difflib.get_close_matches(word, opts, n=1, cutoff=0.6)
    return hits[0] if hits else None


def join_allowed(options: Iterable[object], limit: int = 24) -> str:
    opts = [str(o) for o in options]
    text = ", ".join(opts[:limit])
    return text + (f", ... ({len(opts) - limit} more)" if len(opts) > limit else "")
