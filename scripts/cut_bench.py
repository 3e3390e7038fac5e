"""Each hot-path cut alone, old and new alternating in one process on the demo's model (CPU
time, one thread): ``PYTHONPATH=<tree> python scripts/cut_bench.py MODEL_NODE_DIR [reps]``.

Prints, per cut, the median CPU seconds per call of the old and the new code path and their
ratio (docs/benchmarks.md, "The hot path"). The paths are switched with the same switches
tests/test_hot_path.py uses.
"""

from __future__ import annotations

import statistics
import sys
import time
from pathlib import Path


def alternate(old, new, reps: int) -> tuple[float, float]:
    a, b = [], []
    for _ in range(reps):
        for f, acc in ((old, a), (new, b)):
            t = time.process_time()
            f()
            acc.append(time.process_time() - t)
    return statistics.median(a), statistics.median(b)


def main() -> int:
    import torch

    torch.set_num_threads(1)
    from resalign.algorithms import attack
    from resalign.algorithms.objectives import Denoiser, EncodedPairs, denoise_loss, noise_batch
    from resalign.models.loading import load_model_node

    reps = int(sys.argv[2]) if len(sys.argv) > 2 else 15
    bundle = load_model_node(Path(sys.argv[1]), device="cpu", dtype="float32")
    unet = bundle.unet
    unet.requires_grad_(True)
    g = torch.Generator().manual_seed(0)
    caps = [f"a handwritten digit {w}" for w in ("zero", "one", "two", "three", "four")] * 4
    pairs = EncodedPairs.encode(bundle, torch.rand(20, 1, 8, 8) * 2 - 1, caps)
    nb = noise_batch(pairs.sample(16, g), bundle.objective, g)
    params = {n: p.detach().requires_grad_(True) for n, p in unet.named_parameters()}
    den = Denoiser(unet, bundle.objective, {})
    rows = []

    def grad_step(tied: bool):
        def f():
            den._tied = tied
            loss = denoise_loss(den, params, nb)
            torch.autograd.grad(loss, list(params.values()))

        return f

    rows.append(("forward+backward of one inner step (functional_call untie)",
                 *alternate(grad_step(True), grad_step(False), reps)))  # fmt: skip

    class P:  # what run_attack reads
        images = torch.zeros(20, 1, 8, 8)
        captions = caps

    table = attack._CaptionTable.build(bundle, [P], None)
    batch = caps[:16]
    rows.append(("conditioning of a 16-caption attack micro-batch",
                 *alternate(lambda: bundle.encode_condition(batch),
                            lambda: table.condition(batch), reps)))  # fmt: skip

    def opt_step(foreach):
        ps = [torch.nn.Parameter(p.detach().clone()) for p in unet.parameters()]
        for p in ps:
            p.grad = torch.randn_like(p)
        opt = torch.optim.AdamW(ps, lr=1e-3, weight_decay=1e-2, foreach=foreach)
        opt.step()  # state allocated outside the timing
        return opt.step

    rows.append(("AdamW step over the UNet's 299 tensors",
                 *alternate(opt_step(None), opt_step(True), reps)))  # fmt: skip

    for name, o, n in rows:
        print(f"| {name} | {o * 1e3:.1f} | {n * 1e3:.1f} | {n / o:.2f} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
