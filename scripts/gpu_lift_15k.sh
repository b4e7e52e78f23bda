#!/bin/bash
# GPU recipe for the next step of issue 3 (not run yet): MaskGIT world models on the 15,360-code tokenizer
# (hma_gym/assets/tokenizer_15k, 31.4 dB on held-out frames against 27.3 for the shipped checkpoints' one), two
# `hma-gym train` runs side by side on one GPU from the token cache that `make tokens-15k` makes here
# (data/lift_mix_tokens_15k.safetensors, 23 MB: carry it to the GPU machine). Writes runs.tar.part* under
# $1 (default: outputs/gpu15k); `python scripts/unpack_runs.py OUT runs/gpu15k` unpacks them here, then
# `make lift-15k-pack RUN=runs/gpu15k/d160` packs and evaluates one (see docs/checkpoints.md).
#   d160   the shipped checkpoint's size (d=160, 4 layers, 4 heads)
#   d256   d=256, 8 layers, 8 heads
# BUDGET (seconds of training, default 330), BATCH (default 64) and TRAIN_FLAGS (default: bf16 on cuda)
# override; e.g. BUDGET=20 BATCH=4 TRAIN_FLAGS="--device cpu" is a dry run on a CPU.
set -eo pipefail
out=${1:-outputs/gpu15k}
mkdir -p "$out"
export PYTHONUNBUFFERED=1
command -v nvidia-smi >/dev/null && nvidia-smi -L
T="--tokens data/lift_mix_tokens_15k.safetensors --data data/lift.hdf5 --extra-data data/dp_shipped.hdf5"
T="$T data/lift_noisy.hdf5 --tokenizer hma_gym/assets/tokenizer_15k --patch-size 2 --prompt-frames 1"
T="$T --batch-size ${BATCH:-64} --warmup 300 --eval-windows 24 ${TRAIN_FLAGS:---bf16 --device cuda}"
# the masking-objective mixture of the shipped models (HMAConfig's default is 0.7 / 0.1 / 0.1 / 0.1)
T="$T --objective-probs '{\"forward\": 0.8, \"full\": 0.1, \"passive\": 0.05, \"policy\": 0.05}'"
"${PYTHON:-python3}" scripts/parallel_train.py --budget "${BUDGET:-330}" --out "$out" --root "${ROOT:-runs/gpu15k}" \
  --run d160 "$T --d-model 160 --n-layer 4 --n-head 4 --lr 1.5e-3" \
  --run d256 "$T --d-model 256 --n-layer 8 --n-head 8 --lr 1e-3" 2>&1 | tee "$out/train.log"
