"""MLflow tracking: one parent run per invocation, one child run per executed node.

The local store is the source of truth; MLflow is a mirror that can lag. Every node's metrics
go to ``metrics.jsonl`` first; the :class:`NodeLogger` uploads the file's tail with
``MlflowClient.log_batch`` (per-step ``log_metric`` is ~17x slower) and records how far it got
in a per-node sync record. If the server goes away mid-run the run carries on locally and
``resalign sync`` (:func:`sync`) later uploads whatever the records say is missing, skipping
(key, step) pairs the server already has, so it is idempotent.

Records (all JSON, atomic writes)::

    runs/tracking/<parent_run_id>/invocation.json   uri, experiment, parent run, cached nodes
    runs/tracking/<parent_run_id>/nodes/<kind>-<key>.json
        run_id, metrics_offset (bytes of metrics.jsonl uploaded), params/artifacts/status synced

Tracking URI precedence: ``--tracking-uri`` > ``MLFLOW_TRACKING_URI`` > the spec's
``tracking.uri`` > SQLite at ``<store>/mlflow.db`` with artifacts under ``<store>/mlartifacts``
(both absolute). MLflow is imported lazily: ``plan`` must not pay for it.
"""

from __future__ import annotations

from .artifacts import (  # noqa: F401
    WEIGHT_SUFFIXES,
    _sync_node_static,
    _tree_size,
    is_model_folder,
    log_node_artifacts,
)
from .curation import (  # noqa: F401
    _KEY_BAD,
    _THREAT_KEYS,
    CURATED,
    MAX_PARAM_LEN,
    _clean_key,
    _spec_dict,
    curated_params,
    flatten,
    git_commit,
    mermaid,
)
from .logger import FLUSH_LINES, FLUSH_SECONDS, NodeLogger  # noqa: F401
from .records import (  # noqa: F401
    NodeRecord,
    TrackingHandle,
    _log_batch_chunked,
    _node_record_path,
    _params_entities,
    _read_tail,
    _size,
    _tags,
    load_node_record,
    records_to_metrics,
    save_node_record,
)
from .sync import (  # noqa: F401
    SyncReport,
    _driver_dead,
    _existing_points,
    _node_source,
    close_dead_runs,
    sync,
)
from .tracker import Tracker, _sync_invocation  # noqa: F401
from .uris import (  # noqa: F401
    LOCKED_RETRIES,
    _client,
    _client_env_defaults,
    _is_http,
    _locked,
    _RetryingClient,
    _sqlite_path,
    artifact_location,
    check_reachable,
    default_artifact_root,
    default_tracking_uri,
    resolve_tracking_uri,
    setup_lock,
)
