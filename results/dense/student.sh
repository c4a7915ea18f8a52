#!/usr/bin/env bash
# Usage: student.sh METHOD SEED [EPOCHS] [extra flags...] -> ${STUDY:-study_dense}/runs/METHOD_eEPOCHS_sSEED
# A ResNet-18 / FPN-128 FCOS student on the dense shapes data (128 px), single-threaded, under nice.
# TEACHER (default ${STUDY}/teacher/model_best.pth) is the ResNet-34 / FPN-128 teacher.
set -euo pipefail
m=$1; s=$2; e=${3:-2}; shift 3 || shift $#
S=${STUDY:-study_dense}
T=${TEACHER:-$S/teacher/model_best.pth}
out=$S/runs/${m}_e${e}_s${s}
mkdir -p $S/runs
case $m in
  baseline) extra=() ;;
  fpn_mse) extra=(--teacher $T --distill fpn-mse) ;;  # per-channel, weight 16 (the defaults)
  fpn_mse_*) extra=(--teacher $T --distill fpn-mse) ;;  # variants: flags given after EPOCHS
  *) extra=(--teacher $T --distill icd --attention-detail) ;;  # icd and its variants (flags after EPOCHS)
esac
cd "$(dirname "$0")/../.."
OMP_NUM_THREADS=1 nice -n 10 .venv/bin/python -m icd train --data-path $S/data --output-dir $out \
  --detector fcos --backbone resnet18 --fpn-channels 128 --min-size 128 --max-size 128 --batch-size 8 \
  --lr 0.02 --epochs $e --eval-every 1 --seed $s --workers 0 --device cpu --print-freq 10 \
  --epoch-checkpoint-every 0 --no-progress --overwrite "${extra[@]}" "$@" > $out.log 2>&1
echo "$m s$s e$e: $(grep '"type": "eval"' $out/metrics.jsonl | tail -1 | cut -c1-160)"
