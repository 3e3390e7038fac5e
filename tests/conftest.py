"""Shared test settings: deterministic, small thread count (CI has 2 cores); test markers by
cost, applied here by file and test name so test files need not repeat them.

Markers (``pyproject.toml`` lists them): ``slow`` (over ~20 s), ``server`` (starts an MLflow
server), ``torchrun`` (launches torchrun processes), ``slurm`` (submitit), ``kill`` (kills a
run with SIGKILL), ``fuzz`` (property-based fuzzing) and ``fast``: the fast loop, the spec
language, graph, numerics and report tests that carry none of the others (``make test-fast``;
``make test`` runs everything).
"""

from __future__ import annotations

import os

import pytest

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("MLFLOW_ENABLE_ASYNC_LOGGING", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

# Whole files by what they cost.
_FILE_MARKERS = {
    "test_engine_mlflow_server.py": ("server",),
    "test_mlflow_browser.py": ("server",),
    "test_engine_torchrun.py": ("torchrun",),
    "test_distributed.py": ("torchrun",),
    "test_slurm.py": ("slurm",),
    "test_spec_fuzz.py": ("fuzz",),
}
# Test names by what they do.
_NAME_MARKERS = {"kill": "kill", "slurm": "slurm", "torchrun": "torchrun", "_server": "server"}
# The fast loop: spec language, graph, numerics, report.
_FAST_FILES = {
    "test_spec_loader.py",
    "test_spec_errors.py",
    "test_spec_compose.py",
    "test_spec_bounds.py",
    "test_cli_spec.py",
    "test_grid_templates.py",
    "test_grid_shipped.py",
    "test_graph_compile.py",
    "test_graph_keys.py",
    "test_objectives.py",
    "test_flow_matching.py",
    "test_hypergrad.py",
    "test_eval_metrics.py",
    "test_report.py",
    "test_report_bands.py",
    "test_report_resurgence.py",
    "test_search.py",
    "test_estimate.py",
    "test_oracle_control.py",
    "test_predictors.py",
    "test_probes.py",
    "test_tracking_describe.py",
}
_COST = ("slow", "server", "torchrun", "slurm", "kill", "fuzz")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    for item in items:
        name = item.path.name
        for marker in _FILE_MARKERS.get(name, ()):
            item.add_marker(marker)
        for part, marker in _NAME_MARKERS.items():
            if part in item.name:
                item.add_marker(marker)
        if name in _FAST_FILES and not any(item.get_closest_marker(m) for m in _COST):
            item.add_marker("fast")
