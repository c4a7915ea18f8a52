#!/usr/bin/env bash
# Usage: student.sh METHOD SEED [EPOCHS] [extra flags...]  -> ${STUDY:-study}/${RUNS:-runs}/METHOD_eEPOCHS_sSEED
# TEACHER (default ${STUDY}/teacher4/checkpoint.pth), RUNS and PRE (pretrain.sh's) pick the
# teacher, the runs' folder and the pre-trained teacher sides of the icd_pre runs.
set -euo pipefail
m=$1; s=$2; e=${3:-2}; shift 3 || shift $#
T=${TEACHER:-${STUDY:-study}/teacher4/checkpoint.pth}
out=${STUDY:-study}/${RUNS:-runs}/${m}_e${e}_s${s}
case $m in
  baseline) extra=() ;;
  fpn_mse) extra=(--teacher $T --distill fpn-mse --fpn-mse-norm channel --distill-weight 2) ;;
  icd_paper) extra=(--teacher $T --distill icd) ;;
  fpn_mse_*) extra=(--teacher $T --distill fpn-mse --fpn-mse-norm channel) ;;  # weight etc. given after EPOCHS
  icd_pre) extra=(--teacher $T --distill icd --icd-init ${STUDY:-study}/${PRE:-pre}_s$s/teacher_side.pth --icd-mask-temperature 1) ;;  # as run before the default became 4
  icd_pre_*) extra=(--teacher $T --distill icd --icd-init ${STUDY:-study}/${PRE:-pre}_s$s/teacher_side.pth) ;;  # flags after EPOCHS
  *) extra=(--teacher $T --distill icd) ;;   # variants: flags given after EPOCHS
esac
cd "$(dirname "$0")/../.."
OMP_NUM_THREADS=1 .venv/bin/python -m icd train --data-path ${STUDY:-study}/data --output-dir $out \
  --detector fcos --backbone resnet18 --fpn-channels 64 --min-size 96 --max-size 96 --batch-size 8 \
  --lr 0.02 --epochs $e --eval-every 1 --seed $s --workers 0 --device cpu --print-freq 5 \
  --epoch-checkpoint-every 0 --no-progress "${extra[@]}" "$@" > $out.log 2>&1
echo "$m s$s e$e: $(grep '"type": "eval"' $out/metrics.jsonl | tail -1 | cut -c1-200)"
