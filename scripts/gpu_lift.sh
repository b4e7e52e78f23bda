#!/bin/bash
# The GPU recipe of the Lift world models (one H100, ~9 minutes): three `hma-gym train` runs side by side
# from the token cache that `hma-gym tokenize` made here (see docs/checkpoints.md), then the learned
# env's speed on the GPU. Writes everything under $1 (default: outputs/gpu).
#   dp        shipped size (d=160, 4 layers), expert demos + GT rollouts of 8 imperfect DP checkpoints
#   expert    shipped size, expert demos only (the data ablation)
#   dp_large  d=256, 8 layers, expert demos + DP rollouts (the capacity ablation)
set -o pipefail
out=${1:-outputs/gpu}
mkdir -p "$out"
export PYTHONUNBUFFERED=1
nvidia-smi -L
T="--tokens data/lift_dp_tokens.safetensors --data data/lift.hdf5 --tokenizer runs/tokenizer --patch-size 2"
T="$T --prompt-frames 1 --batch-size 64 --warmup 300 --eval-windows 24 --bf16 --device cuda"
# the masking-objective mixture of the shipped models (HMAConfig's default is 0.7 / 0.1 / 0.1 / 0.1)
T="$T --objective-probs '{\"forward\": 0.8, \"full\": 0.1, \"passive\": 0.05, \"policy\": 0.05}'"
X="--extra-data data/dp_a.hdf5 data/dp_b.hdf5"
"${PYTHON:-python3}" scripts/parallel_train.py --budget "${BUDGET:-330}" --out "$out" --root runs/gpu \
  --run dp "$T $X --d-model 160 --n-layer 4 --n-head 4 --lr 1.5e-3" \
  --run expert "$T --d-model 160 --n-layer 4 --n-head 4 --lr 1.5e-3" \
  --run dp_large "$T $X --d-model 256 --n-layer 8 --n-head 8 --lr 1e-3" 2>&1 | tee "$out/train.log"
"${PYTHON:-python3}" -m benchmarks.env_speed --device cuda --skip-gt --steps 200 --long-steps 500 --vector-sizes 1 4 16 64 \
  2>&1 | grep -v WARN | tail -12
cp benchmarks/results/env_speed_cuda.json "$out/"
