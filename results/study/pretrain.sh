#!/usr/bin/env bash
# Usage: pretrain.sh SEED -> ${STUDY:-study}/${PRE:-pre}_sSEED (ICD teacher side on the study's teacher)
# TEACHER (default ${STUDY}/teacher4/checkpoint.pth) and PRE pick the teacher and the output name.
set -euo pipefail
s=$1
T=${TEACHER:-${STUDY:-study}/teacher4/checkpoint.pth}
out=${STUDY:-study}/${PRE:-pre}_s$s
cd "$(dirname "$0")/../.."
OMP_NUM_THREADS=1 .venv/bin/python -m icd pretrain --data-path ${STUDY:-study}/data \
  --teacher $T --output-dir $out \
  --min-size 96 --max-size 96 --batch-size 8 --iters 600 --eval-every 100 --seed $s \
  --workers 0 --device cpu --print-freq 20 --no-progress > $out.log 2>&1
