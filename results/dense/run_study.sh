#!/usr/bin/env bash
# The dense-scene study of docs/training.md ("Dense scenes"), from the repository root:
#   STUDY=study_dense bash results/dense/run_study.sh
# Sized for a shared 2-core CPU (each run single-threaded, two at a time): 128-px images,
# a teacher of 4 epochs, students of 2 epochs (100 iterations).
set -euo pipefail
S=${STUDY:-study_dense}
py=.venv/bin/python
[ -d $S/data ] || $py -m icd data shapes --out $S/data --num-train 400 --num-val 100 --image-size 128 \
  --scene dense --seed 0
# teacher: FCOS ResNet-34 / FPN-128, 12 epochs planned, stopped after its epoch-4 evaluation
# (model_best.pth then: the best of epochs 2 and 4)
[ -f $S/teacher/model_best.pth ] || OMP_NUM_THREADS=1 nice -n 10 $py -m icd train --data-path $S/data \
  --output-dir $S/teacher --detector fcos --backbone resnet34 --fpn-channels 128 --min-size 128 --max-size 128 \
  --batch-size 8 --lr 0.02 --epochs 12 --eval-every 2 --seed 0 --workers 0 --device cpu --print-freq 10 \
  --epoch-checkpoint-every 2 --no-progress --stop-after-iters 200
# teacher-side probe: where the attention goes while the auxiliary task trains (icd pretrain's
# defaults, 150 iterations, statistics on 50 val images every 50)
[ -d $S/pre_probe ] || OMP_NUM_THREADS=1 nice -n 10 $py -m icd pretrain --data-path $S/data \
  --teacher $S/teacher/model_best.pth --output-dir $S/pre_probe --iters 150 --eval-every 50 --attention-images 50 \
  --attention-detail --batch-size 8 --min-size 128 --max-size 128 --workers 0 --device cpu --no-progress
# students, two at a time: baseline, FPN-MSE, ICD (the paper's recipe), 3 seeds
for s in 0 1 2; do for m in baseline fpn_mse icd; do echo "$m $s 2"; done; done |
  xargs -P 2 -L 1 bash results/dense/student.sh
$py results/study/summarize.py $S/runs --against baseline fpn_mse
$py results/dense/attention_table.py $S/runs
