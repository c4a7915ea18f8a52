#!/usr/bin/env bash
# The dense-scene study of docs/training.md ("Dense scenes of small objects"), from the repository root:
#   STUDY=study_dense bash results/dense/run_study.sh
# Sized for a 2-core CPU: the teacher on both cores, the students one thread each, two at a time
# (icd study's slots); ~4 h of one core for studyA, 0.5-1.5 h for each of the others, ~5 h in all on two.
# Each step is skipped when its output exists.
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
  --out $S/$out --no-progress "$@" $([ -f $S/$out/study.json ] && echo --resume); }
study studyA --methods baseline fpn-mse icd icd-pre --train-flags '--attention-detail'
# ICD from a teacher side pre-trained long enough to tell real instances from fakes (1500 iterations)
study studyC --methods icd-pre --pretrain-iters 1500 --train-flags '--attention-detail'
# every student with the teacher's neck and head (no dead box branch at the start): FPN-MSE against the same ICD
study studyD --methods fpn-mse+inherit icd-pre+inherit --pretrain-iters 1500 --train-flags '--attention-detail'
# what else could close the gap to FPN-MSE (one slot each; the pre-trained sides are studyC's, copied: the
# study reuses a finished run whose command is its own):
# the paper's ICD distilling from the first iteration (no warm-up, during which seed 0's box branch dies)
study studyE_warm0 --methods icd --seeds 0 --train-flags '--attention-detail --distill-warmup-iters 0'
with_sides() { [ -d $S/$1 ] || { mkdir -p $S/$1/runs; for s in ${2:-0 1 2}; do cp -r $S/studyC/runs/pretrain_s$s $S/$1/runs/; done
  cp -r $S/studyC/runs/teacher_eval $S/$1/runs/; }; }
# ICD from the 1500-iteration sides: no warm-up; distillation weights near uniform (whole-map imitation
# through ICD's projections); weight 16 instead of 8
with_sides studyF; study studyF --methods icd-pre --pretrain-iters 1500 --train-flags '--attention-detail --distill-warmup-iters 0'
with_sides studyG "1 2"; study studyG --methods icd-pre --pretrain-iters 1500 --seeds 1 2 \
  --train-flags '--attention-detail --icd-mask-temperature 64'
with_sides studyH; study studyH --methods icd-pre --pretrain-iters 1500 --weight icd=16 --train-flags '--attention-detail'
# the paper's recipe with the published code's choices where ours differ: the student's value projection
# trained by the teacher side's AdamW under its clip, fake boxes clamped to the image
study studyJ --methods icd --seeds 1 2 0 --train-flags '--attention-detail --icd-projection-optimizer teacher-side --icd-clamp-fakes'
# teacher-side probes: what the auxiliary task learns over a longer pre-training, and the published details
probe() { out=$1; shift; [ -d $S/probes/$out ] || OMP_NUM_THREADS=1 icd pretrain --data-path $S/data --teacher $T \
  --output-dir $S/probes/$out --min-size 128 --max-size 128 --batch-size 8 --workers 0 --device cpu --no-progress \
  --attention-images 50 --attention-detail --print-freq 20 --iters 1200 --eval-every 200 --seed 0 "$@"; }
probe long1200
probe long1200_ps8 --icd-position-scale 8
probe long1200_neg1 --icd-neg-ratio 1
# the same on the shapes data (a few large objects), when SHAPES names results/README.md's study folder
# (its data/ and 4-epoch teacher4/): the lift rises there without the real/fake AUC
[ -z "${SHAPES:-}" ] || [ -d $S/probes/shapes600 ] || OMP_NUM_THREADS=1 icd pretrain --data-path $SHAPES/data \
  --teacher $SHAPES/teacher4/checkpoint.pth --output-dir $S/probes/shapes600 --min-size 96 --max-size 96 \
  --batch-size 8 --workers 0 --device cpu --no-progress --attention-images 50 --iters 600 --eval-every 100 --print-freq 20
$py results/dense/compare.py $S > results/dense/students.md
$py results/dense/attention_table.py --study "paper recipe, pre-trained 600=$S/studyA" "pre-trained 1500=$S/studyC" \
  "+ inherit=$S/studyD" --pretrain $S/probes/*/ > results/dense/tables.md
for s in studyA studyC studyD studyE_warm0 studyF studyG studyH studyJ; do cp $S/$s/study.md results/dense/$s.md; done
