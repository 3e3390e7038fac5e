"""Check ``plan --estimate`` against what a run took: estimate every node of SPEC from the
costs recorded in one store, then read what the same nodes recorded in another store (after
``resalign run SPEC --store ACTUAL``), per node kind (issue 25).

    python scripts/estimate_check.py specs/digits_demo.yaml --history runs --actual /tmp/cold

Prints a Markdown table: per kind, the nodes, the estimate with its range, the actual busy
time (what the estimator predicts: CPU seconds per thread on a CPU, wall seconds on an
accelerator) and wall time, and estimate / actual for each. ``--set`` as for ``resalign
run``. Torch-free: it reads JSON only.
"""

from __future__ import annotations

import argparse
import json

from resalign.engine.estimate import busy_seconds, duration, estimate, history
from resalign.engine.store import DONE, Store
from resalign.graph.compile import compile_spec
from resalign.spec import load_spec


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("spec")
    ap.add_argument("--history", required=True, help="the store the estimate is made from")
    ap.add_argument("--actual", required=True, help="the store the spec then ran in")
    ap.add_argument("--set", action="append", default=[], dest="sets")
    args = ap.parse_args(argv)

    graph = compile_spec(load_spec(args.spec, sets=args.sets))
    actual = Store(args.actual)
    names = [n.name for n in graph]
    est = estimate(graph, names, history(Store(args.history)))
    rows: dict[str, list[float]] = {}
    missing = 0
    for name in names:
        n = graph[name]
        try:
            done = json.loads((actual.node_dir(n.kind, n.key) / DONE).read_text("utf-8"))
            cost = done["cost"]
        except (OSError, ValueError, KeyError, TypeError):
            missing += 1
            continue
        pred = est.per_node.get(name)
        r = rows.setdefault(n.kind, [0, 0.0, 0.0, 0.0, 0.0, 0.0, 0])
        r[0] += 1
        if pred is None:
            r[6] += 1
        else:
            r[1] += pred[0]
            r[2] += pred[1]
            r[3] += pred[2]
        r[4] += busy_seconds(cost)
        r[5] += float(cost["wall_s"])
    print("| kind | nodes | estimate [range] | actual busy | actual wall | estimate / busy "
          "| estimate / wall |")  # fmt: skip
    print("|---|---|---|---|---|---|---|")
    tot = [0.0] * 4
    for kind, (k, p, lo, hi, busy, wall, nohist) in rows.items():
        note = f" ({nohist} without history)" if nohist else ""
        print(f"| {kind} | {k}{note} | {duration(p)} [{duration(lo)}, {duration(hi)}] | "
              f"{duration(busy)} | {duration(wall)} | {p / busy:.2f} | {p / wall:.2f} |")  # fmt: skip
        for i, v in enumerate((p, busy, wall)):
            tot[i] += v
    if tot[1] > 0:
        print(f"| all | {sum(r[0] for r in rows.values())} | {duration(tot[0])} | "
              f"{duration(tot[1])} | {duration(tot[2])} | {tot[0] / tot[1]:.2f} | "
              f"{tot[0] / tot[2]:.2f} |")  # fmt: skip
    if missing:
        print(f"\n{missing} node(s) of the spec have no recorded cost in {args.actual}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
