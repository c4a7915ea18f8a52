#!/usr/bin/env bash
# The dense-scene study of docs/training.md ("Dense scenes of small objects"), from the repository root:
#   STUDY=study_dense bash results/dense/run_study.sh
# Sized for a 2-core CPU: the teacher on both cores, the students one thread each, two at a time
# (icd study's slots); ~2 h in all. Each step is skipped when its output exists.
set -euo pipefail
S=${STUDY:-study_dense}
py=${PYTHON:-.venv/bin/python}
icd() { $py -m icd "$@"; }
[ -d $S/data ] || icd data shapes --out $S/data --num-train 400 --num-val 100 --image-size 128 --scene dense --seed 0
# teacher: FCOS ResNet-34 / FPN-128 at 128 px, 24 epochs (1200 iterations), evaluated every 4;
# model_best.pth = epoch 19, 2.68 AP (AP50 6.9)
[ -f $S/teacher/model_best.pth ] || OMP_NUM_THREADS=2 icd train --data-path $S/data --output-dir $S/teacher \
  --detector fcos --backbone resnet34 --fpn-channels 128 --min-size 128 --max-size 128 --batch-size 8 --lr 0.02 \
  --epochs 24 --eval-every 4 --seed 0 --workers 0 --device cpu --print-freq 10 --epoch-checkpoint-every 0 \
  --no-progress
T=$S/teacher/model_best.pth
# the students: ResNet-18 / FPN-128, 10 epochs (500 iterations), seeds 0-2; baseline, FPN-MSE (per-channel,
# weight 16), ICD (the paper's recipe), ICD from a pre-trained teacher side (icd pretrain, 600 iterations)
study() { out=$1; shift; icd study --data-path $S/data --teacher $T --backbone resnet18 --fpn-channels 128 \
  --min-size 128 --max-size 128 --batch-size 8 --lr 0.02 --seeds 0 1 2 --epochs 10 --jobs 2 --threads 1 \
  --out $S/$out --no-progress "$@" $([ -d $S/$out ] && echo --resume); }
study studyA --methods baseline fpn-mse icd icd-pre --train-flags '--attention-detail'
# ICD with its teacher side at icd pretrain's optimiser (AdamW lr 1e-3, norm clip 1) instead of the paper's
study studyB --methods icd --train-flags '--attention-detail --icd-lr 1e-3 --icd-clip 1'
# teacher-side probes: what the auxiliary task learns over a longer pre-training
probe() { out=$1; shift; [ -d $S/probes/$out ] || OMP_NUM_THREADS=1 icd pretrain --data-path $S/data --teacher $T \
  --output-dir $S/probes/$out --min-size 128 --max-size 128 --batch-size 8 --workers 0 --device cpu --no-progress \
  --attention-images 50 --attention-detail --print-freq 20 "$@"; }
probe long1200 --iters 1200 --eval-every 200 --seed 0
$py results/dense/attention_table.py --study "paper recipe=$S/studyA" "side lr 1e-3=$S/studyB" \
  --pretrain $S/studyA/runs/pretrain_s0 $S/probes/* > results/dense/tables.md
