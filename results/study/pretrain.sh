#!/usr/bin/env bash
# Usage: pretrain.sh SEED -> ${STUDY:-study}/pre_sSEED (ICD teacher side on the demo teacher)
set -euo pipefail
s=$1
cd "$(dirname "$0")/../.."
OMP_NUM_THREADS=1 .venv/bin/python -m icd pretrain --data-path ${STUDY:-study}/data \
  --teacher ${STUDY:-study}/teacher4/checkpoint.pth --output-dir ${STUDY:-study}/pre_s$s \
  --min-size 96 --max-size 96 --batch-size 8 --iters 600 --eval-every 100 --seed $s \
  --workers 0 --device cpu --print-freq 20 --no-progress > ${STUDY:-study}/pre_s$s.log 2>&1
