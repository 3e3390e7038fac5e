"""Benchmarks (``python -m resalign.bench <name>``; the CLI wires ``resalign bench``)."""

from __future__ import annotations

import sys


def main(argv: list[str] | None = None) -> int:
    """Dispatch ``argv[0]`` to a benchmark's own ``main``."""
    argv = list(sys.argv[1:] if argv is None else argv)
    from ..errors import UserError

    try:
        return _dispatch(argv)
    except UserError as e:  # a flag naming an absent device: rendered as the CLI renders it
        print(e.render(), file=sys.stderr)
        return e.exit_code


def _dispatch(argv: list[str]) -> int:
    if not argv or argv[0] not in ("hypergrad", "hypercheck", "sd"):
        print(
            "usage: python -m resalign.bench {hypergrad,hypercheck,sd} [options]", file=sys.stderr
        )
        return 2
    if argv[0] == "hypercheck":
        from . import hypercheck

        return hypercheck.main(argv[1:])
    if argv[0] == "sd":
        from . import sd

        return sd.main(argv[1:])
    from . import hypergrad

    return hypergrad.main(argv[1:])
