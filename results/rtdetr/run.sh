#!/bin/bash
# The RT-DETR comparison of results/rtdetr/README.md: an RT-DETR R18 student (baseline, FPN-MSE,
# ICD; seeds 0-2) distilled from an RT-DETR R50 teacher on the shapes data, all on the CPU.
# Usage: bash results/rtdetr/run.sh WORK   (WORK: a folder for the data and the runs)
# Two runs at a time (OMP_NUM_THREADS=1 each): the teacher beside the baselines, then the students.
set -euo pipefail
WORK=${1:?usage: run.sh WORK}
PY=${PYTHON:-.venv/bin/python}
export OMP_NUM_THREADS=1
mkdir -p "$WORK"
DATA=$WORK/shapes
[ -d "$DATA/annotations" ] || $PY -m icd data shapes --out "$DATA" --num-train 600 --num-val 100 --image-size 128
# both detectors: 64-wide hybrid encoder, half-width ResNets, 50 queries, 3 decoder layers, 128 px input
MODEL="--detector rtdetr --fpn-channels 64 --min-size 128 --rtdetr-width 0.5 --rtdetr-queries 50 --rtdetr-decoder-layers 3 --rtdetr-denoising 50"
COMMON="--data-path $DATA --batch-size 8 --lr 2e-4 --workers 0 --device cpu --no-progress --epoch-checkpoint-every 0 --print-freq 20"
TEACHER_ITERS=${TEACHER_ITERS:-400}
STUDENT_ITERS=${STUDENT_ITERS:-200}

student() {  # method seed
  local method=$1 seed=$2 extra=""
  [ "$method" != baseline ] && extra="--teacher $WORK/teacher/checkpoint.pth --distill $method"
  nice -n 10 $PY -m icd train $COMMON $MODEL --backbone resnet18 --iters "$STUDENT_ITERS" --eval-every 100 \
    --seed "$seed" $extra --output-dir "$WORK/$method-s$seed" --overwrite > "$WORK/$method-s$seed.log" 2>&1
}

( nice -n 10 $PY -m icd train $COMMON $MODEL --backbone resnet50 --iters "$TEACHER_ITERS" --eval-every 100 \
    --output-dir "$WORK/teacher" --overwrite > "$WORK/teacher.log" 2>&1 ) &
teacher=$!
for seed in 0 1 2; do student baseline $seed; done
wait $teacher
( for seed in 0 1 2; do student icd $seed; done ) &
icd_runs=$!
for seed in 0 1 2; do student fpn-mse $seed; done
wait $icd_runs
echo done
