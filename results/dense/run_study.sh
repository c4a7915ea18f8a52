#!/usr/bin/env bash
# The dense-scene study of docs/training.md ("Dense scenes of small objects"), from the repository root:
#   STUDY=study_dense bash results/dense/run_study.sh
# Sized for a shared 2-core CPU (each run single-threaded and niced, students two at a time):
# 128-px images, a teacher of 4 epochs, students of 1 epoch (50 iterations).
set -euo pipefail
S=${STUDY:-study_dense}
py=.venv/bin/python
run() { OMP_NUM_THREADS=1 nice -n 10 $py -m icd "$@"; }
[ -d $S/data ] || $py -m icd data shapes --out $S/data --num-train 400 --num-val 100 --image-size 128 \
  --scene dense --seed 0
# teacher: FCOS ResNet-34 / FPN-128, evaluated every 2 epochs, stopped after epoch 4 (the study's
# run was started with --epochs 12 and killed during epoch 5); model_best.pth = epoch 2 (= model_1.pth)
[ -f $S/teacher/model_best.pth ] || run train --data-path $S/data --output-dir $S/teacher --detector fcos \
  --backbone resnet34 --fpn-channels 128 --min-size 128 --max-size 128 --batch-size 8 --lr 0.02 --epochs 12 \
  --eval-every 2 --seed 0 --workers 0 --device cpu --print-freq 10 --epoch-checkpoint-every 2 --no-progress \
  --stop-after-iters 200
T=$S/teacher/model_best.pth
# what a freshly initialised teacher side (the paper's recipe) looks at, 3 initialisation seeds
(cd $S && OMP_NUM_THREADS=1 nice -n 10 ../$py ../results/dense/init_attention.py teacher/model_best.pth data \
  > init_attention.md)
# teacher-side probes: what the auxiliary task learns (icd pretrain's defaults otherwise)
probe() { out=$1; shift; [ -d $S/$out ] || run pretrain --data-path $S/data --teacher $T --output-dir $S/$out \
  --attention-images 50 --attention-detail --batch-size 8 --min-size 128 --max-size 128 --workers 0 --device cpu \
  --no-progress "$@"; }
probe pre_probe --iters 150 --eval-every 50 --print-freq 10
probe pre_probe_ps16 --iters 150 --eval-every 50 --print-freq 10 --icd-position-scale 16
probe pre_probe_neg1 --iters 150 --eval-every 50 --print-freq 10 --icd-neg-ratio 1
probe pre_600 --iters 600 --eval-every 150 --print-freq 20
probe pre_600_s1 --iters 600 --eval-every 150 --print-freq 20 --seed 1
probe pre_600_ps16 --iters 600 --eval-every 150 --print-freq 20 --icd-position-scale 16
probe pre_600_ps16_s1 --iters 600 --eval-every 150 --print-freq 20 --icd-position-scale 16 --seed 1
# students, two at a time: ICD (the paper's recipe), FPN-MSE, baseline; seeds 0-2
xargs -P 2 -L 1 bash results/dense/student.sh < results/dense/queue.txt
bash results/dense/tables.sh > results/dense/tables.md
