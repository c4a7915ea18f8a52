"""The dense study's students side by side across its `icd study` folders: AP at the last evaluation
per seed, from which iteration the box regression worked for good (a student of this regime can start with a
dead one: FCOS's ReLU box outputs all at 0), lift and real/fake AUC, and each row paired
per seed with the FPN-MSE row it is compared with.

    python results/dense/compare.py $STUDY

reads $STUDY/<study>/runs/<method>_e10_s<seed>/metrics.jsonl (the commands: results/dense/run_study.sh).
Runs of different studies pair here because every run is seeded (same initialisation and data order
per seed); `icd study` itself pairs only the runs it ran.
"""

from __future__ import annotations

import os
import sys

from icd.apps.study.report import last_eval_of, run_records
from icd.apps.study.stats import interval, mean_std

EPOCHS = 10
SEEDS = (0, 1, 2)
# (name, study folder, method, the row it pairs with (None: none))
ROWS = [
    ("baseline", "studyA", "baseline", None),
    ("FPN-MSE (weight 16)", "studyA", "fpn-mse", None),
    ("ICD, the paper's recipe", "studyA", "icd", "FPN-MSE (weight 16)"),
    ("ICD, side pre-trained 600 it.", "studyA", "icd-pre", "FPN-MSE (weight 16)"),
    ("ICD, side pre-trained 1500 it.", "studyC", "icd-pre", "FPN-MSE (weight 16)"),
    ("FPN-MSE + inherit", "studyD", "fpn-mse+inherit", None),
    ("ICD, side pre-trained 1500 it. + inherit", "studyD", "icd-pre+inherit", "FPN-MSE + inherit"),
    # stop 41: distillation from the first iteration (no warm-up), near-uniform distillation weights, weight 16
    ("ICD, the paper's recipe, no warm-up (seed 0)", "studyE_warm0", "icd", "FPN-MSE (weight 16)"),
    ("ICD, side pre-trained 1500 it., no warm-up", "studyF", "icd-pre", "FPN-MSE (weight 16)"),
    ("ICD, side pre-trained 1500 it., mask temperature 64", "studyG", "icd-pre", "FPN-MSE (weight 16)"),
    ("ICD, side pre-trained 1500 it., weight 16", "studyH", "icd-pre", "FPN-MSE (weight 16)"),
    ("ICD, the paper's recipe with the published code's projection optimiser and clamped fakes", "studyJ", "icd",
     "FPN-MSE (weight 16)"),
]


def revival(records: list[dict], sustained: int = 10) -> int | None:
    """The first logged iteration from which the GIoU box loss stays below 0.99 for ``sustained``
    logged iterations in a row (50 at --print-freq 5): until then no box was regressed for good
    (FCOS's ReLU outputs all 0 give exactly 1.0; a branch that comes back hovers near 1); None:
    never (or not for that long before the run ended)."""
    losses = [(r["iter"], r["loss_bbox_regression"]) for r in records if r.get("type") == "train"]
    for i, (iteration, _) in enumerate(losses):
        window = losses[i : i + sustained]
        if len(window) == sustained and all(value < 0.99 for _, value in window):
            return iteration
    return None


def fmt(values: list[float], digits: int = 2) -> str:
    if not values:
        return ""
    if len(values) == 1:
        return f"{values[0]:.{digits}f}"
    mean, std = mean_std(values)
    return f"{mean:.{digits}f} ± {std:.{digits}f}"


def main(root: str) -> None:
    ap, rows_out = {}, []
    for name, study, method, _ in ROWS:
        per_seed, boxes_from, lift, auc = {}, {}, [], []
        for seed in SEEDS:
            folder = os.path.join(root, study, "runs", f"{method}_e{EPOCHS}_s{seed}")
            if not os.path.exists(os.path.join(folder, "metrics.jsonl")):
                continue
            records = run_records(folder)
            last = last_eval_of(records)
            if last is None or last.get("epoch") != EPOCHS - 1:
                continue  # unfinished
            per_seed[seed] = last["AP"]
            start = revival(records)
            boxes_from[seed] = "never" if start is None else str(start)
            if "lift" in last:
                lift.append(last["lift"])
            if "aux_auc" in last:
                auc.append(last["aux_auc"])
        ap[name] = per_seed
        rows_out.append((name, per_seed, boxes_from, lift, auc))
    print("| student (10 epochs) | AP s0 / s1 / s2 | AP mean ± std | boxes regressed from iteration | lift | "
          "real/fake AUC | paired with | difference per seed | mean ± std | 95% interval |")  # fmt: skip
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    for (name, per_seed, boxes_from, lift, auc), (_, _, _, other) in zip(rows_out, ROWS, strict=True):
        cells = " / ".join(f"{per_seed[s]:.2f}" if s in per_seed else "-" for s in SEEDS)
        pair = ["", "", "", ""]
        if other is not None:
            diffs = {s: per_seed[s] - ap[other][s] for s in per_seed if s in ap[other]}
            if diffs:
                span = interval(list(diffs.values()))
                pair = [other, ", ".join(f"s{s}: {d:+.2f}" for s, d in diffs.items()), fmt(list(diffs.values())),
                        "" if span is None else f"{span[0]:+.2f} to {span[1]:+.2f}"]  # fmt: skip
        boxes = " / ".join(boxes_from.get(s, "-") for s in SEEDS)
        print(f"| {name} | {cells} | {fmt(list(per_seed.values()))} | {boxes} | {fmt(lift)} | "
              f"{fmt(auc)} | " + " | ".join(pair) + " |")  # fmt: skip


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit(__doc__)
    main(sys.argv[1])
