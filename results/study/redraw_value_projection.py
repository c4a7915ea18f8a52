"""A pre-trained teacher side with its value projections re-drawn: the "value projection re-drawn
(xavier)" row of results/README.md's "Why pre-training hurt".

ICD's distillation targets are the value projection of the teacher's features, so a pre-trained
side's v_proj shapes *what* the student regresses while its attention shapes *where*. This copies
``icd pretrain``'s teacher_side.pth with every decoder layer's v_proj weight re-drawn as at
initialisation (xavier-uniform, zero bias; ``icd.nn.decoder``), everything else kept; the copy
goes to ``icd train --icd-init`` (through ``icd study --train-flags``) like any teacher side.

    python results/study/redraw_value_projection.py TEACHER_SIDE.pth OUT.pth [--seed 0]
"""

import argparse

import torch

from icd.engine.checkpoint import save_atomic

parser = argparse.ArgumentParser()
parser.add_argument("teacher_side")
parser.add_argument("out")
parser.add_argument("--seed", type=int, default=0, help="seed of the re-drawn weights")
args = parser.parse_args()

blob = torch.load(args.teacher_side, weights_only=True, map_location="cpu")
state = blob["teacher_side"]
generator = torch.Generator().manual_seed(args.seed)
redrawn = sorted(k for k in state if k.startswith("decoder.") and k.endswith(".v_proj.weight"))
if not redrawn:
    raise SystemExit(f"{args.teacher_side}: no decoder v_proj weights (is it icd pretrain's teacher_side.pth?)")
for key in redrawn:
    weight = torch.empty_like(state[key])
    torch.nn.init.xavier_uniform_(weight, generator=generator)
    state[key] = weight
    state[key.replace(".weight", ".bias")].zero_()
save_atomic(blob, args.out)
print(f"{args.out}: {', '.join(redrawn)} re-drawn (seed {args.seed})")
