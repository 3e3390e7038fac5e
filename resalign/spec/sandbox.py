"""The one Jinja environment specs use: grid template bodies and ``${...}`` expressions in a
spec's ``vars``.

Jinja's immutable sandbox (no attribute starting with ``_``, no mutation of values passed in,
``range`` capped at 100,000) with ``StrictUndefined`` and no loader (``{% include %}`` cannot
read files). Departure from the stock sandbox: ``*``, ``**`` and ``%`` are bounded, so
``'x' * 10**10`` or ``'%09999999999d' % 1`` is a clear error, not a machine out of memory
(issue 15: bounded input). Filters that pad to a width (``center``, ``format``) are not bounded
here; the text a template renders is (``templates.render_cell_texts``).
"""

from __future__ import annotations

import math
from typing import Any

from .source import MAX_SPEC_BYTES

# 2**20 bits is a 315,653-digit integer: far beyond any spec value, instant to compute.
_MAX_POWER_BITS = 1 << 20


def _too_big(message: str) -> Exception:
    from jinja2.exceptions import SecurityError

    return SecurityError(message)


def _bounded_binop(operator: str, left: Any, right: Any) -> Any:
    if operator == "*":
        for seq, n in ((left, right), (right, left)):
            if isinstance(seq, str | list | tuple) and isinstance(n, int):
                if len(seq) * max(n, 0) > MAX_SPEC_BYTES:
                    raise _too_big(
                        f"repeating a value {n:,} times gives more than {MAX_SPEC_BYTES:,} "
                        "items, more than a spec may hold"
                    )
        return left * right
    if operator == "**":
        if isinstance(left, int) and isinstance(right, int) and right > 0 and abs(left) > 1:
            if right * math.log2(abs(left)) > _MAX_POWER_BITS:
                raise _too_big(f"{left} ** {right} is too large a number for a spec")
        return left**right
    if operator == "%":
        if isinstance(left, str):
            raise _too_big("'%' string formatting is not available; join strings with '~'")
        return left % right
    raise AssertionError(operator)


def environment() -> Any:
    """A fresh bounded sandbox (imports jinja2 only when called)."""
    from jinja2 import StrictUndefined
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    class BoundedSandbox(ImmutableSandboxedEnvironment):
        intercepted_binops = frozenset({"*", "**", "%"})

        def call_binop(self, context: Any, operator: str, left: Any, right: Any) -> Any:
            return _bounded_binop(operator, left, right)

    return BoundedSandbox(
        undefined=StrictUndefined,
        autoescape=False,
        keep_trailing_newline=True,
        trim_blocks=False,
        lstrip_blocks=False,
    )
