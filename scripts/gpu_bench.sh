#!/usr/bin/env bash
# SD-scale memory-lever benchmark on one accelerator, in under 8 minutes.
#
# Uses only what the machine has (PyTorch, diffusers, peft): the UNets are built from their
# published architecture configs with random weights (resalign/models/sd_arch.py), nothing is
# downloaded. Runs one outer step of the published configuration (LoRA rank 4, J=3, K=5,
# published inner-config distribution) at 64x64 latents (512 px) per lever combination, each
# in a fresh process; peak memory is the CUDA allocator peak of the outer step.
#
#   scripts/gpu_bench.sh [OUT_DIR]      (default: $OUT, else ./bench-out)
#
# Writes OUT_DIR/sd14_gpu_latent64.json and OUT_DIR/sd14_gpu_latent64.txt (the table).
# Inner steps are capped at 10 (published: 5-30) to stay inside the time budget; the cap is
# recorded in the JSON. Each combination is limited to 55 s so one slow case cannot eat the
# budget; a combination that runs out of memory or time is reported as an error row.
set -euo pipefail
cd "$(dirname "$0")/.."
OUT_DIR="${1:-${OUT:-bench-out}}"
mkdir -p "$OUT_DIR"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
PY="${PYTHON:-python3}"
"$PY" - <<'PYEOF'
import diffusers, peft, torch
print("torch", torch.__version__, "diffusers", diffusers.__version__, "peft", peft.__version__)
assert torch.cuda.is_available(), "no CUDA device"
print(torch.cuda.get_device_name(), f"{torch.cuda.get_device_properties(0).total_memory / 2**30:.1f} GiB")
PYEOF
COMBOS="${COMBOS:-published,fp32,ckpt,bf16,bf16+ckpt,bf16+half,bf16+half+ckpt}"
timeout 470 "$PY" -m resalign.bench sd --arch sd14 --latent 64 --inner-steps 10 \
    --device cuda --combo-timeout 55 --levers "$COMBOS" \
    --json "$OUT_DIR/sd14_gpu_latent64.json" | tee "$OUT_DIR/sd14_gpu_latent64.txt"
