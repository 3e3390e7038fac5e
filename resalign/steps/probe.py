"""The ``probe`` step: cheap diagnostics of one model row that might predict its resurgence
(issue 26; the spec's ``probes`` block, :mod:`resalign.spec.schema.probes`).

Params (graph): ``quantities`` (what it measures); when a harmful quantity is asked for,
``data`` (the dataset name), ``batch_size``, ``seed`` and ``datasets`` (the specs of the data
it reads); ``power_iterations`` and ``power_tol`` only with ``lambda_max``,
``hutchinson_samples`` only with ``hessian_trace``: the key holds exactly what the step reads.
Inputs: ``model``, ``unlearn`` (absent for rows without unlearning), ``attack`` (a segment
probe: the segment's UNet), harvests of the data.
Outputs: ``probe.json`` (``{"values": {quantity: float}, "info": {...}}``; ``values`` are the
predictors the report tests, ``info`` the products spent, the trace's standard error, the
parameter count, seconds per part). Every value is also logged as a metric.

Where the model comes from: the attack segment's ``unet/`` if there is an ``attack`` input,
else the row's unlearned UNet, else the model node's. The weight distance is measured from
the ``model`` input's UNet (the original for every row but the oracle control, whose model
is its own).
"""

from __future__ import annotations

import json
import math
import time
from pathlib import Path

from ..atomic import atomic_write_text
from ..errors import UserError
from .base import NonFiniteError, Step, StepContext, first_non_finite, register

PROBE_FILE = "probe.json"


@register
class ProbeStep(Step):
    kind = "probe"
    version = "1"

    def run(self, ctx: StepContext) -> None:
        from ..algorithms.objectives import EncodedPairs
        from ..algorithms.probes import (
            HARMFUL_QUANTITIES,
            harmful_probes,
            probe_batch,
            weight_distance,
        )
        from ..data.pairs import load_pairs
        from ..models.loading import load_model_node, load_row
        from .attack import row_unet

        p = ctx.params
        quantities = list(p["quantities"])
        if "attack" in ctx.inputs:
            unet_dir, trainable = Path(ctx.inputs["attack"]) / "unet", None
        else:
            unet_dir, trainable = row_unet(ctx.inputs)
        model_dir = Path(ctx.inputs["model"])
        bundle = load_row(model_dir, trainable, unet_dir, device=ctx.device, dtype="float32")
        bad = first_non_finite(bundle.unet.named_parameters())
        if bad is not None:
            raise NonFiniteError(
                f"the model to probe has non-finite weights ({bad!r}, loaded from "
                f"{unet_dir or trainable or model_dir}); it is not probed",
                hint="re-run the upstream node with settings that do not diverge",
            )
        values: dict[str, float] = {}
        info: dict[str, float] = {}
        seconds: dict[str, float] = {}
        if "weight_distance" in quantities:
            t0 = time.perf_counter()
            original = dict(
                load_model_node(
                    model_dir, device=ctx.device, dtype="float32"
                ).unet.named_parameters()
            )
            try:
                values.update(weight_distance(bundle.unet.named_parameters(), original))
            except KeyError as e:
                raise UserError(
                    f"{ctx.node.name}: the row's UNet and the model node's differ in their "
                    f"parameters ({e.args[0]})",
                    hint="probe a result that saved a merged unet/ (re-run its node)",
                ) from None
            seconds["weight_distance"] = time.perf_counter() - t0
        harmful = [q for q in quantities if q in HARMFUL_QUANTITIES]
        if harmful:
            t0 = time.perf_counter()
            channels = int(bundle.vae.config.in_channels)
            pairs = load_pairs(
                p["data"], ctx.params["datasets"], ctx.inputs, bundle.resolution, channels
            )
            enc = EncodedPairs.encode(bundle, pairs.images, pairs.captions, pairs.labels)
            batch = probe_batch(enc, bundle.noise_scheduler, int(p["batch_size"]), int(p["seed"]))
            # only what the quantities read is in the params (and the key)
            opts = {k: p.get(k) for k in ("power_iterations", "power_tol", "hutchinson_samples")}
            v, i = harmful_probes(
                bundle.unet, bundle.noise_scheduler, batch, harmful, seed=int(p["seed"]),
                **{k: x for k, x in opts.items() if x is not None},
            )  # fmt: skip
            values.update(v)
            info.update(i)
            info["items"] = float(len(enc))
            seconds["harmful"] = time.perf_counter() - t0
        for name, value in values.items():
            if not math.isfinite(value):
                raise NonFiniteError(
                    f"probe quantity {name} is {value}", hint="check the probed model"
                )
        ctx.log_metrics(values)
        record = {"values": values, "info": info, "seconds": seconds}
        atomic_write_text(Path(ctx.out) / PROBE_FILE, json.dumps(record, indent=2))
