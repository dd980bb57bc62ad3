#!/usr/bin/env bash
# Every GPU criterion of the open issues in one call, on a CUDA machine that has the project's
# dependencies (a lent machine's time is short: one prepared script, logs kept under OUT).
#
#   scripts/gpu_checks.sh [OUT]       (default OUT: unet-work/gpu-checks)
#
# Environment: PYTHON (python3), BUDGET (training minutes, 25), TRAIN_TIMEOUT (seconds, none),
# WORK (unet-work/gpu). A training run stopped by TRAIN_TIMEOUT resumes, budget included, when the
# script runs again with the same WORK: the criterion is fold 0 within 25 GPU minutes to Dice >= 0.90.
#   1. unet-pipeline run configs/hippocampus.yaml on fold 0 under the budget (the GPU plan);
#   2. scripts/bench_inference.py --device cuda: the hippocampus volume, then 512x512x300 (peak memory);
#   3. scripts/bench_predict.py --device cuda: jobs a and b, and c when the chest CT is there.
set -u
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
BUDGET=${BUDGET:-25}
WORK=${WORK:-unet-work/gpu}
OUT=${1:-unet-work/gpu-checks}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
start=$(date +%s)
step() { echo "[+$(($(date +%s) - start)) s] $*"; }
limit() { if [ -n "${TRAIN_TIMEOUT:-}" ]; then timeout "$TRAIN_TIMEOUT" "$@"; else "$@"; fi; }

"$PYTHON" -c "import torch; assert torch.cuda.is_available(), 'no CUDA device'; print(torch.__version__, torch.cuda.get_device_name())" || exit 2
step "training: fold 0, $BUDGET minutes"
limit "$PYTHON" -m pipeline run configs/hippocampus.yaml --set train.time_budget_minutes="$BUDGET" \
  --set registry.compile_ahead_of_time=false --work-dir "$WORK" >"$OUT/train.log" 2>&1
echo "training exit code $?"
grep -A4 "Dice per label" "$OUT/train.log"
grep "Epochs trained" "$OUT/train.log"
model="$WORK/checkpoints/fold_0/model.pt"
[ -f "$model" ] || { step "no trained model at $model: the benchmarks need one"; exit 4; }

step "engine benchmark: hippocampus"
"$PYTHON" scripts/bench_inference.py --device cuda --model "$model" --volumes hippocampus \
  --out "$OUT/bench_inference_hippocampus.json" >"$OUT/bench_inference_hippocampus.log" 2>&1
tail -8 "$OUT/bench_inference_hippocampus.log"
step "engine benchmark: 512x512x300"
"$PYTHON" scripts/bench_inference.py --device cuda --model "$model" --volumes ct --ct synthetic --repeats 2 \
  --out "$OUT/bench_inference_ct.json" >"$OUT/bench_inference_ct.log" 2>&1
tail -8 "$OUT/bench_inference_ct.log"
jobs=ab
[ -d ../shared/data/dicom/chest_ct ] && jobs=abc
step "predict jobs: $jobs"
"$PYTHON" scripts/bench_predict.py --device cuda --model "$model" --work-dir "$WORK" --jobs "$jobs" \
  --out "$OUT/bench_predict.json" >"$OUT/bench_predict.log" 2>&1
grep -E "^\(|job ratio|wall s|peak" "$OUT/bench_predict.log"
step done
