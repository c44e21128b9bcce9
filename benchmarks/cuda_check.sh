#!/usr/bin/env bash
# The torch backend on an NVIDIA GPU: its CUDA tests, then speed and memory of 0.6B- and 1.7B-shaped random
# checkpoints (bench_speed.py --device cuda), beside the official qwen-asr package when OFFICIAL_PYTHON names an
# interpreter that imports it. Everything goes to OUT/log.txt and OUT/bench-*.json.
#
#   benchmarks/cuda_check.sh OUT [SIZES [STEPS]]   e.g. benchmarks/cuda_check.sh /tmp/cuda "0.6b 1.7b"
#
# STEPS (default all): tests (the CUDA tests), eager (bf16 with CUDA graphs off), speed (CONFIGS, default
# bf16,fp16,fp32,int8, and the official package), cold-batch (fresh process to first transcript; batch 1
# against batch 8). RUNS: timed transcriptions per process (default 3).
#
# Needs python3 with torch (CUDA build), pytest and this package's dependencies importable (PYTHONPATH may
# point at them); the repository root is put on PYTHONPATH. Checkpoints are written under MODELS
# (default /tmp/mlx-asr-models). A step that fails is logged and the next one runs.
set -uo pipefail
OUT=${1:?usage: cuda_check.sh OUT [SIZES]}
SIZES=${2-0.6b 1.7b}  # "" for none (tests only)
STEPS=" ${3:-tests eager speed cold-batch} "
MODELS=${MODELS:-/tmp/mlx-asr-models}
PY=${PYTHON:-python3}
mkdir -p "$OUT" "$MODELS"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
LOG="$OUT/log.txt"

step() {  # step SECONDS NAME COMMAND...: run with a time limit, log its output and its exit status
    local limit=$1 name=$2
    shift 2
    echo "=== $name ($(date -u +%T))" | tee -a "$LOG"
    timeout "$limit" "$@" 2>&1 | tee -a "$LOG"
    echo "=== $name: exit ${PIPESTATUS[0]}" | tee -a "$LOG"
}

official=()
[ -n "${OFFICIAL_PYTHON:-}" ] && official=(--official-python "$OFFICIAL_PYTHON")

step 30 "machine" sh -c "nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader; \
    $PY -c 'import torch; print(\"torch\", torch.__version__, \"cuda\", torch.version.cuda, torch.cuda.get_device_name())'"
want() { [[ $STEPS == *" $1 "* ]]; }

want tests && step 300 "CUDA tests" "$PY" -m pytest -q -p no:cacheprovider -rs tests/test_torch_backend.py \
    -k "cuda or fixed_shape or float32_conv"

for size in $SIZES; do
    model="$MODELS/$size-random"
    [ -f "$model/config.json" ] ||
        step 300 "checkpoint $size" "$PY" benchmarks/make_checkpoint.py --size "$size" --out "$model"
    bench=("$PY" benchmarks/bench_speed.py --device cuda --model "$model" --runs "${RUNS:-3}")
    want eager && step 200 "$size eager steps" "${bench[@]}" --configs bf16 --skip cold,batch,official \
        --env MLX_ASR_CUDA_GRAPHS=0 --json "$OUT/bench-$size-eager.json"
    want speed && step 400 "$size speed" "${bench[@]}" --configs "${CONFIGS:-bf16,fp16,fp32,int8}" \
        --skip cold,batch "${official[@]}" --json "$OUT/bench-$size-speed.json"
    want cold-batch && step 300 "$size cold start and batch" "${bench[@]}" --configs bf16 --skip speed \
        --batch-configs bf16 --batch-sizes 1,8 --batch-clips 8 "${official[@]}" --json "$OUT/bench-$size-cold-batch.json"
done
