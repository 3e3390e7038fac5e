"""The engine: runs a compiled graph with caching, exact resume and MLflow tracking.

Entry points: :func:`runner.run_graph`, :func:`runner.plan_status`, :func:`tracking.sync`,
:func:`ui.serve_ui`. Nothing here is imported by ``spec``/``graph``/``steps`` at import time.
"""
