#!/usr/bin/env bash
# Every GPU criterion of the open issues in one call, on a CUDA machine that has the project's
# dependencies (a lent machine's time is short: one prepared script, logs kept under OUT).
#
#   scripts/gpu_checks.sh [OUT]       (default OUT: unet-work/gpu-checks)
#
# Environment: PYTHON (python3), BUDGET (training minutes, 25), TRAIN_TIMEOUT (seconds, none),
# TASK (hippocampus, hn_ct or left_atrium: configs/TASK.yaml; default hippocampus),
# WORK (unet-work/gpu for hippocampus, unet-work/gpu-TASK otherwise). A training run stopped by
# TRAIN_TIMEOUT resumes, budget included, when the script runs again with the same WORK: the
# criterion is fold 0 within 25 GPU minutes to Dice >= 0.90 (hippocampus).
#   1. unet-pipeline run configs/TASK.yaml on fold 0 under the budget (the GPU plan);
#   2. scripts/bench_inference.py --device cuda: the hippocampus volume, then 512x512x300 (peak memory);
#   3. scripts/bench_predict.py --device cuda: jobs a and b, and c when the chest CT is there.
# Steps 2 and 3 run for TASK=hippocampus only; the other tasks report their Dice, their epochs and
# whether training with its validation ended within a minute of the budget.
#   TASK=hn_ct BUDGET=20 scripts/gpu_checks.sh unet-work/gpu-checks-hn_ct
#   TASK=left_atrium BUDGET=20 scripts/gpu_checks.sh unet-work/gpu-checks-left_atrium
set -u
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
BUDGET=${BUDGET:-25}
TASK=${TASK:-hippocampus}
case "$TASK" in
  hippocampus) WORK=${WORK:-unet-work/gpu} ;;
  hn_ct|left_atrium) WORK=${WORK:-unet-work/gpu-$TASK} ;;
  *) echo "TASK must be hippocampus, hn_ct or left_atrium (got $TASK)"; exit 2 ;;
esac
CONFIG=configs/$TASK.yaml
[ -f "../shared/data/$TASK/dataset.json" ] || { echo "no data at ../shared/data/$TASK (see its README.md)"; exit 2; }
OUT=${1:-unet-work/gpu-checks}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
start=$(date +%s)
step() { echo "[+$(($(date +%s) - start)) s] $*"; }
limit() { if [ -n "${TRAIN_TIMEOUT:-}" ]; then timeout "$TRAIN_TIMEOUT" "$@"; else "$@"; fi; }

"$PYTHON" -c "import torch; assert torch.cuda.is_available(), 'no CUDA device'; print(torch.__version__, torch.cuda.get_device_name())" || exit 2
step "training $TASK: fold 0, $BUDGET minutes"
limit "$PYTHON" -m pipeline run "$CONFIG" --set train.time_budget_minutes="$BUDGET" \
  --set registry.compile_ahead_of_time=false --work-dir "$WORK" >"$OUT/train.log" 2>&1
echo "training exit code $?"
grep -A7 "Dice per label" "$OUT/train.log"
grep "Epochs trained" "$OUT/train.log"
grep "planned into the time budget" "$OUT/train.log"
if [ "$TASK" != hippocampus ]; then
  # Training plus its validation passes, from the last checkpoint's clock (the final evaluation is separate).
  "$PYTHON" - "$WORK/checkpoints/fold_0/last.pt" "$BUDGET" <<'PY' || true
import sys
from pipeline.inference import load_checkpoint
last = load_checkpoint(sys.argv[1])
budget = float(sys.argv[2]) * 60
print(f"training and validation: {last['elapsed_s'] / 60:.2f} min of a {budget / 60:.0f}-minute budget "
      f"({'within' if last['elapsed_s'] <= budget + 60 else 'NOT within'} a minute), {last['epoch']} epochs")
PY
  step done
  exit 0
fi
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
