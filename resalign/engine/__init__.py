"""The engine: runs a compiled graph with caching, exact resume and MLflow tracking.

Entry points: :func:`run.run_spec` (a spec with :class:`options.RunOptions`: its graph, then
its searches; ``resalign run`` and every grid cell), :func:`runner.run_graph` (the driver),
:func:`plan.plan_status` (what is cached and why the rest runs), :func:`worker.execute_task`
(one node, wherever an executor runs it), :func:`verify.verify_store`, :func:`tracking.sync`,
:func:`ui.serve_ui`. The store (:mod:`.store`) is the source of truth; MLflow
(:mod:`.tracking`) mirrors it. Nothing here is imported by ``spec``/``graph``/``steps`` at
import time.
"""
