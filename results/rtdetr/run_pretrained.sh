#!/bin/bash
# The extra row of results/rtdetr/README.md: ICD students whose teacher side was pre-trained first
# (icd pretrain, then --icd-init), on the teacher and data of run.sh. Usage: bash run_pretrained.sh WORK
set -euo pipefail
WORK=${1:?usage: run_pretrained.sh WORK}
PY=${PYTHON:-.venv/bin/python}
export OMP_NUM_THREADS=1
DATA=$WORK/shapes
MODEL="--detector rtdetr --fpn-channels 64 --min-size 128 --rtdetr-width 0.5 --rtdetr-queries 50 --rtdetr-decoder-layers 3 --rtdetr-denoising 50"
COMMON="--data-path $DATA --batch-size 8 --lr 2e-4 --workers 0 --device cpu --no-progress --epoch-checkpoint-every 0 --print-freq 20"
nice -n 10 $PY -m icd pretrain --data-path "$DATA" --teacher "$WORK/teacher/checkpoint.pth" --iters 300 --batch-size 8 \
  --workers 0 --device cpu --no-progress --output-dir "$WORK/pretrain" --overwrite > "$WORK/pretrain.log" 2>&1
student() {  # seed
  nice -n 10 $PY -m icd train $COMMON $MODEL --backbone resnet18 --iters "${STUDENT_ITERS:-200}" --eval-every 100 \
    --seed "$1" --teacher "$WORK/teacher/checkpoint.pth" --distill icd --icd-init "$WORK/pretrain/$2" \
    --output-dir "$WORK/icd-pre-s$1" --overwrite > "$WORK/icd-pre-s$1.log" 2>&1
}
student 0 teacher_side.pth & first=$!
student 1 teacher_side.pth
wait $first
student 2 teacher_side.pth
echo done
