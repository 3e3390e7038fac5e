"""Property-based fuzzing of ``resalign validate`` (issue 15): generated and mutated specs
(from the shipped ones: dropped, repeated and swapped lines, swapped value types, random
unicode, deep nesting, anchors and aliases, tabs, truncation, ``extends`` and ``vars``
references, ``--set`` items) each end in success (exit 0) or a user error (exit 2): never a
traceback, a hang (> 5 s of CPU time: wall time on a shared 2-core machine measures the
neighbours) or more than 500 MB.

Grid templates likewise, through ``grid --render`` (every cell rendered and validated).

CI runs ``RESALIGN_FUZZ_EXAMPLES`` spec examples (default 200, derandomized: the same examples
on every run; about 15 s on a 2-core machine) and a quarter as many templates. For a long random
run::

    RESALIGN_FUZZ_EXAMPLES=5000 RESALIGN_FUZZ_RANDOM=1 .venv/bin/python -m pytest -q \\
        tests/test_spec_fuzz.py
"""

from __future__ import annotations

import os
import resource
import signal
import tempfile
import time
from pathlib import Path

import pytest

hypothesis = pytest.importorskip("hypothesis")  # in the dev extra
from click.testing import CliRunner  # noqa: E402
from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from resalign.cli import cli  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
SHIPPED = {p.name: p.read_text() for p in sorted((ROOT / "specs").glob("*.yaml"))}
EXAMPLES = int(os.environ.get("RESALIGN_FUZZ_EXAMPLES", "200"))
RANDOM = bool(os.environ.get("RESALIGN_FUZZ_RANDOM"))
HANG_S = 5.0
MAX_RSS_GROWTH_KB = 500 * 1024

# Values a researcher (or an attacker) might put where another type is expected.
VALUES = [
    "0",
    "-1",
    "1e-5",
    "1.0e+999",
    ".nan",
    "9" * 5000,
    "true",
    "null",
    "~",
    "''",
    '"text"',
    "[]",
    "{}",
    "[1, 2, 3]",
    "{a: 1}",
    "[",
    "{",
    "]",
    "}",
    "'unclosed",
    "&anchor value",
    "*anchor",
    "*undefined",
    "!!python/object/apply:os.system ['true']",
    "!!binary aGVsbG8=",
    "!reset",
    "!override {a: 1}",
    "!custom 1",
    "$digit",
    "$nope",
    "${digit + 1}",
    "${1/0}",
    "${'x' * 10**9}",
    "${ [].__class__.__mro__ }",
    "${range(10**9) | list}",
    "2001-12-14t21:59:43.10-05:00",
    "2020-13-45",
    "0x1F",
    "0o17",
    "1_000",
    "<<: *anchor",
    "- a\n- b",
    "|\n  block",
    ">-",
    "%YAML 1.1",
    "---",
    "...",
]


def _lines_strategy(draw, text: str) -> str:
    lines = text.splitlines()
    for _ in range(draw(st.integers(1, 4))):
        if not lines:
            lines = [""]
        kind = draw(
            st.sampled_from(
                [
                    "drop",
                    "repeat",
                    "swap",
                    "value",
                    "unicode",
                    "tab",
                    "indent",
                    "nest",
                    "anchors",
                    "laughs",
                    "truncate",
                    "extends",
                    "key",
                ]
            )
        )
        i = draw(st.integers(0, len(lines) - 1))
        line = lines[i]
        if kind == "drop":
            del lines[i]
        elif kind == "repeat":
            lines.insert(i, line)
        elif kind == "swap":
            j = draw(st.integers(0, len(lines) - 1))
            lines[i], lines[j] = lines[j], lines[i]
        elif kind == "value":
            head, sep, _ = line.partition(": ")
            value = draw(st.sampled_from(VALUES) | st.text(max_size=20))
            lines[i] = f"{head}{sep or ': '}{value}"
        elif kind == "unicode":
            pos = draw(st.integers(0, len(line)))
            junk = draw(st.text(min_size=1, max_size=30))
            lines[i] = line[:pos] + junk + line[pos:]
        elif kind == "tab":
            lines[i] = "\t" + line
        elif kind == "indent":
            lines[i] = " " * draw(st.integers(1, 9)) + line
        elif kind == "nest":
            n = draw(st.sampled_from([10, 63, 64, 65, 200, 5000]))
            opener = draw(st.sampled_from(["[", "{a: ", "[{a: "]))
            closer = {"[": "]", "{a: ": "}", "[{a: ": "}]"}[opener]
            closed = draw(st.booleans())
            head, sep, _ = line.partition(": ")
            lines[i] = f"{head}{sep or ': '}{opener * n}1{closer * n if closed else ''}"
        elif kind == "anchors":
            head, sep, value = line.partition(": ")
            if sep:
                lines[i] = f"{head}: &a {value}"
                j = draw(st.integers(0, len(lines) - 1))
                h2, s2, _ = lines[j].partition(": ")
                if s2 and j > i:
                    lines[j] = f"{h2}: *a"
        elif kind == "laughs":
            depth = draw(st.integers(2, 9))
            width = draw(st.integers(2, 12))
            block = ['x0: &x0 ["lol"]'] + [
                f"x{k}: &x{k} [{', '.join([f'*x{k - 1}'] * width)}]" for k in range(1, depth)
            ]
            lines[i:i] = block
        elif kind == "truncate":
            lines = lines[: i + 1]
            lines[-1] = line[: draw(st.integers(0, len(line)))]
        elif kind == "extends":
            target = draw(
                st.sampled_from(
                    ["digits_demo.yaml", "sd14_sexual.yaml", "nope.yaml", "{self}", "/dev/null"]
                )
            )
            lines.insert(0, f"extends: {target}")
        elif kind == "key":
            lines.insert(i, draw(st.sampled_from(["vars: {digit: 3}", "vars: [1]", "extends:"])))
    return "\n".join(lines) + "\n"


@st.composite
def mutated_specs(draw) -> tuple[str, list[str]]:
    base = SHIPPED[draw(st.sampled_from(sorted(SHIPPED)))]
    text = _lines_strategy(draw, base)
    sets = draw(
        st.lists(
            st.sampled_from(
                [
                    "unlearn.steps=3",
                    "unlearn.steps=abc",
                    "vars.digit=5",
                    "vars.digit=[",
                    "threats.x.lr=1",
                    "name.x=1",
                    "seed=" + "9" * 5000,
                    "model=" + "[" * 100,
                    "=",
                    "a[1000]=1",
                    "concepts.digit.label=${1/0}",
                ]
            ),
            max_size=2,
        )
    )
    return text, sets


class _Hang(Exception):
    pass


def _on_alarm(signum, frame):
    raise _Hang(f"validate used more than {HANG_S} s of CPU time")


def _rss_kb() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss


@pytest.fixture(scope="module")
def workdir():
    with tempfile.TemporaryDirectory() as d:
        folder = Path(d)
        for name, text in SHIPPED.items():
            (folder / name).write_text(text)
        yield folder


def test_validate_never_crashes_hangs_or_explodes(workdir: Path) -> None:
    runner = CliRunner()
    start_rss = _rss_kb()
    counts = {0: 0, 2: 0}
    slowest = [0.0]

    @settings(
        max_examples=EXAMPLES,
        deadline=None,  # the hang bound below is ours (5 s), not hypothesis' 200 ms
        derandomize=not RANDOM,
        database=None,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
    )
    @given(mutated_specs())
    def check(case: tuple[str, list[str]]) -> None:
        text, sets = case
        spec = workdir / "fuzzed.yaml"
        spec.write_text(text.replace("{self}", "fuzzed.yaml"), encoding="utf-8")
        args = ["validate", str(spec)] + [a for s in sets for a in ("--set", s)]
        old = signal.signal(signal.SIGPROF, _on_alarm)
        signal.setitimer(signal.ITIMER_PROF, HANG_S)
        t = time.process_time()
        try:
            res = runner.invoke(cli, args)
        finally:
            signal.setitimer(signal.ITIMER_PROF, 0)
            signal.signal(signal.SIGPROF, old)
        seconds = time.process_time() - t
        slowest[0] = max(slowest[0], seconds)
        if res.exception is not None and not isinstance(res.exception, SystemExit):
            import traceback

            tb = "".join(traceback.format_exception(res.exception))
            raise AssertionError(f"traceback for {args} on:\n{text[:2000]}\n{tb}")
        assert res.exit_code in (0, 2), (res.exit_code, res.output[-2000:])
        assert "Traceback" not in res.output
        assert seconds < HANG_S
        grown = _rss_kb() - start_rss
        assert grown < MAX_RSS_GROWTH_KB, f"peak memory grew by {grown // 1024} MB"
        counts[res.exit_code] += 1

    check()
    print(
        f"fuzz: {sum(counts.values())} validations: {counts[0]} valid, {counts[2]} exit 2; "
        f"slowest {slowest[0]:.2f} s CPU; peak RSS growth {(_rss_kb() - start_rss) // 1024} MB"
    )
    # both outcomes occur: the mutations are not all fatal, nor all harmless
    assert counts[2] > 0 and (counts[0] > 0 or EXAMPLES < 50), counts


TEMPLATES = {
    p.name: p.read_text()
    for p in sorted((ROOT / "templates").glob("*_digits.yaml.j2"))
    + [ROOT / "templates" / "ablation.yaml.j2"]
}
TEMPLATE_SNIPPETS = [
    "{{ undefined_name }}",
    "{{ cell.__class__ }}",
    "{% include 'x' %}",
    "{% for i in range(100000) %}{% for j in range(100000) %}x{% endfor %}{% endfor %}",
    "{{ 'x' * 10**9 }}",
    "{{ 2 ** 10**9 }}",
    "{{ '%0999999999d' % 1 }}",
    "{% if %}",
    "{{",
    "{% raw %}",
    "---",
    "matrix: {a: [1, 1]}",
    "exclude: [{nope: 1}]",
    "include: [{}]",
    "vars: {cell: 1}",
    "extends: ../templates/ablation_digits.yaml.j2",
    "extends: ../specs/sd14_sexual.yaml",
]


@st.composite
def mutated_templates(draw) -> str:
    text = TEMPLATES[draw(st.sampled_from(sorted(TEMPLATES)))]
    if draw(st.booleans()):
        lines = text.splitlines()
        i = draw(st.integers(0, len(lines)))
        lines.insert(i, draw(st.sampled_from(TEMPLATE_SNIPPETS)))
        text = "\n".join(lines) + "\n"
    return _lines_strategy(draw, text)


def test_grid_render_never_crashes_hangs_or_explodes(workdir: Path) -> None:
    runner = CliRunner()
    start_rss = _rss_kb()
    tdir = workdir / "templates"
    tdir.mkdir(exist_ok=True)
    specs = workdir / "specs"
    specs.mkdir(exist_ok=True)
    for name, text in SHIPPED.items():
        (specs / name).write_text(text)
    for name, text in TEMPLATES.items():
        (tdir / name).write_text(text)
    counts = {0: 0, 2: 0}

    @settings(
        max_examples=max(EXAMPLES // 4, 10),
        deadline=None,
        derandomize=not RANDOM,
        database=None,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
    )
    @given(mutated_templates())
    def check(text: str) -> None:
        tpl = tdir / "fuzzed.yaml.j2"
        tpl.write_text(text, encoding="utf-8")
        args = ["grid", str(tpl), "--render", str(workdir / "cells")]
        old = signal.signal(signal.SIGPROF, _on_alarm)
        signal.setitimer(signal.ITIMER_PROF, 4 * HANG_S)  # up to 8 cells, each a spec
        try:
            res = runner.invoke(cli, args)
        finally:
            signal.setitimer(signal.ITIMER_PROF, 0)
            signal.signal(signal.SIGPROF, old)
        if res.exception is not None and not isinstance(res.exception, SystemExit):
            import traceback

            tb = "".join(traceback.format_exception(res.exception))
            raise AssertionError(f"traceback on:\n{text[:2000]}\n{tb}")
        assert res.exit_code in (0, 2), (res.exit_code, res.output[-2000:])
        grown = _rss_kb() - start_rss
        assert grown < MAX_RSS_GROWTH_KB, f"peak memory grew by {grown // 1024} MB"
        counts[res.exit_code] += 1

    check()
    print(f"template fuzz: {counts[0]} rendered, {counts[2]} exit 2")
    assert counts[2] > 0, counts
