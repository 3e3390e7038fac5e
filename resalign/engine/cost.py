"""What a node cost (issue 25): wall time, CPU time, peak memory, measured around its step.

:class:`CostMeter` is started just before a step runs and read just before its result is
committed (``resalign.engine.worker``); the mapping it returns is written into the node's
``DONE`` manifest as ``cost`` (:meth:`resalign.engine.store.Store.commit`) and logged to the
node's MLflow run as ``cost.*`` metrics (``tracking.artifacts``). Fields:

- ``wall_s``: seconds of the step (load, compute, save; not the commit's hashing);
- ``cpu_s``: user + system CPU seconds of this process and of the child processes it
  waited for (torchrun ranks) during the step: on N busy threads about N x ``wall_s``;
- ``peak_rss_mb``: the peak resident set size (MiB). ``rss_scope`` says what it covers:
  ``node`` when the kernel's peak counter could be reset for the node (Linux
  ``/proc/self/clear_refs``), else ``process`` (the process's lifetime peak, an upper bound
  for a worker that ran other nodes before), or ``children`` (the largest child process, for
  a node run on torchrun ranks);
- ``cuda_peak_mb``: ``torch.cuda.max_memory_allocated`` over the step where CUDA was used,
  else absent;
- ``device``, ``threads`` (torch's intra-op threads where torch is loaded), ``load1``
  (the 1-minute load average at the start: a busy machine stretches ``wall_s``).

Torch-free at import: CUDA is read only where torch is already imported.
"""

from __future__ import annotations

import os
import resource
import sys
import time
from typing import Any

# Cost fields recorded for every node (resalign.engine.estimate reads them back).
FIELDS = ("wall_s", "cpu_s", "peak_rss_mb")


def _cpu_seconds() -> float:
    own = resource.getrusage(resource.RUSAGE_SELF)
    kids = resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + kids.ru_utime + kids.ru_stime


def _reset_peak_rss() -> bool:
    """Reset this process's peak RSS (``VmHWM``); False where the kernel does not allow it."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def _peak_rss_mb() -> float | None:
    try:
        with open("/proc/self/status", encoding="ascii", errors="replace") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024  # kB
    except OSError:
        pass
    return None


def _cuda() -> Any:
    """torch.cuda when torch is loaded and CUDA initialised in this process, else None."""
    torch = sys.modules.get("torch")
    if torch is None:
        return None
    try:
        return torch.cuda if torch.cuda.is_available() and torch.cuda.is_initialized() else None
    except Exception:
        return None


class CostMeter:
    """Measure one node: create it just before the step runs, :meth:`read` it at the end.
    ``children``: the work runs in child processes (torchrun ranks) this process waits for."""

    def __init__(self, device: str, *, children: bool = False):
        self.device = device
        self.children = children
        try:
            self.load1: float | None = os.getloadavg()[0]
        except OSError:
            self.load1 = None
        self._node_scope = not children and _reset_peak_rss()
        cuda = _cuda()
        if cuda is not None:
            cuda.reset_peak_memory_stats()
        self._cuda_before = cuda is not None
        self._cpu0 = _cpu_seconds()
        self._t0 = time.perf_counter()

    def read(self) -> dict[str, Any]:
        """The cost so far (see the module docstring for the fields)."""
        out: dict[str, Any] = {
            "wall_s": round(time.perf_counter() - self._t0, 3),
            "cpu_s": round(_cpu_seconds() - self._cpu0, 3),
        }
        if self.children:
            kids = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
            out["peak_rss_mb"], out["rss_scope"] = round(kids / 1024, 1), "children"
        else:
            peak = _peak_rss_mb()
            if peak is None:  # no /proc: the lifetime peak (ru_maxrss is in kB on Linux)
                peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
            out["peak_rss_mb"] = round(peak, 1)
            out["rss_scope"] = "node" if self._node_scope else "process"
        cuda = _cuda()
        if cuda is not None:
            # initialised during the node: the peak since initialisation is the node's
            out["cuda_peak_mb"] = round(cuda.max_memory_allocated() / 2**20, 1)
        out["device"] = self.device
        torch = sys.modules.get("torch")
        if torch is not None:
            out["threads"] = int(torch.get_num_threads())
        if self.load1 is not None:
            out["load1"] = round(self.load1, 2)
        return out
