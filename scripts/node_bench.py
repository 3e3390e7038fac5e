"""Time (and optionally profile) nodes of a spec in this process, outside the engine.

    PYTHONPATH=<tree> OMP_NUM_THREADS=1 python scripts/node_bench.py SPEC \
        --inputs-from STORE --job 'NODE' --job 'NODE|PATH=VALUE,PATH=VALUE' ... \
        [--profile-dir DIR] [--out DIR]

Each ``--job`` is a node name with, after ``|``, the ``--set`` overrides of the spec it is
compiled from (e.g. ``model|model.tiny.pretrain.steps=50``). Its upstream results are read
from ``--inputs-from`` (read only: every dependency must be cached there; nothing is written
into it); the node writes into a fresh folder under ``--out``. The jobs run one after the
other in this one process, as in the engine's long-lived worker processes: the heavy
libraries are imported, a model loaded and the digits judge trained before the first clock
starts. Prints one JSON line per job: node, key, wall and CPU seconds, threads, the 1-minute
load before and after, and a sha256 of each output file that holds weights or metrics (to
compare two trees' results). ``PYTHONPATH`` decides which code runs, so the same script times
the old (``/work/main``) and the new tree side by side (docs/benchmarks.md, "The hot path").
"""

from __future__ import annotations

import argparse
import cProfile
import hashlib
import json
import os
import sys
import tempfile
import time
from inspect import signature
from pathlib import Path


def _digests(out: Path) -> dict[str, str]:
    keep = (".safetensors", "metrics.json", "metrics.jsonl", "steps.jsonl")
    found = {}
    for p in sorted(out.rglob("*")):
        if p.is_file() and p.name.endswith(keep) and "images" not in p.parts:
            found[str(p.relative_to(out))] = hashlib.sha256(p.read_bytes()).hexdigest()[:16]
    return found


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("spec")
    ap.add_argument("--job", action="append", required=True, help="NODE or NODE|SET,SET")
    ap.add_argument("--inputs-from", required=True, help="store holding the nodes' inputs")
    ap.add_argument("--profile-dir", help="write a cProfile (CPU time) of each job here")
    ap.add_argument("--out", help="output folder (default: a new temporary one)")
    a = ap.parse_args(argv)

    import torch

    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    # imported before the clock starts, as in a warm worker
    import diffusers  # noqa: F401
    import peft  # noqa: F401
    import sklearn.svm  # noqa: F401
    import transformers  # noqa: F401
    from diffusers import DPMSolverMultistepScheduler, StableDiffusionPipeline  # noqa: F401

    from resalign.engine.context import NodeContext
    from resalign.evaluation.metrics.concept_rate import judge
    from resalign.graph.compile import compile_spec
    from resalign.models.loading import load_model_node
    from resalign.spec import load_spec
    from resalign.steps import STEPS

    store = Path(a.inputs_from)
    root = Path(a.out or tempfile.mkdtemp(prefix="node_bench_"))
    jobs = []
    for job in a.job:
        name, _, sets = job.partition("|")
        graph = compile_spec(resolved := load_spec(a.spec, sets=[s for s in sets.split(",") if s]))
        node = graph[name]
        inputs = {}
        for role, dep in node.deps.items():
            d = graph[dep]
            folder = store / d.kind / d.key
            if not (folder / "DONE").is_file():
                print(
                    f"{name}: input {dep} ({d.key[:12]}) is not cached in {store}", file=sys.stderr
                )
                return 2
            inputs[role] = folder
        jobs.append((name, resolved, node, inputs))
    # what a warm worker has done before its next node: loaded a model (transformers builds
    # its conversion tables on the first load, ~1 s) and trained the judge (cached)
    warm = next((i["model"] for _, _, _, i in jobs if "model" in i), None)
    if warm is not None:
        load_model_node(warm, device="cpu", dtype="float32")
    judge()
    for k, (name, resolved, node, inputs) in enumerate(jobs):
        out, state = root / f"job{k}" / "out", root / f"job{k}" / "state"
        out.mkdir(parents=True, exist_ok=True)
        # steps read the spec through the context before main's 8d2683a, only params after
        extra = {"spec": resolved} if "spec" in signature(NodeContext).parameters else {}
        ctx = NodeContext(node=node, inputs=inputs, out=out, state=state, **extra)
        step = STEPS[node.kind]()
        # CPU time, not wall: the machine is shared, and waiting for a core is not the node's
        prof = cProfile.Profile(time.process_time) if a.profile_dir else None
        load1 = os.getloadavg()[0]
        t0, c0 = time.perf_counter(), time.process_time()
        if prof is not None:
            prof.enable()
        step.run(ctx)
        if prof is not None:
            prof.disable()
        seconds, cpu = time.perf_counter() - t0, time.process_time() - c0
        ctx.close()
        if prof is not None:
            Path(a.profile_dir).mkdir(parents=True, exist_ok=True)
            prof.dump_stats(str(Path(a.profile_dir) / (name.replace("/", "_") + ".prof")))
        record = {
            "node": name,
            "key": node.key[:12],
            "seconds": round(seconds, 3),
            "cpu_s": round(cpu, 3),
            "threads": torch.get_num_threads(),
            "load1_before": round(load1, 2),
            "load1_after": round(os.getloadavg()[0], 2),
            "tree": os.environ.get("PYTHONPATH", ""),
            "digests": _digests(out),
        }
        print(json.dumps(record), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
