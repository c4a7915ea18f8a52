"""Runs of `icd study` regenerated beside results/README.md's tables: each row's AP per seed against
the table's, paired per seed, and against the regenerated baseline and FPN-MSE w16 of the same seeds.

    python results/study/compare_regenerated.py $STUDY

reads the runs of each study below ($STUDY/<study>/runs/<method>_e<epochs>_s<seed>/metrics.jsonl;
the commands: results/README.md) and prints markdown tables. Runs of different studies pair here
because every run is seeded (same initialisation and data order per seed); `icd study` itself pairs
only the runs it ran.
"""

from __future__ import annotations

import json
import os
import sys

from icd.apps.demo.stamps import STAMP_FILE
from icd.apps.study.report import last_eval_of
from icd.apps.study.stats import interval, mean_std

# table -> (epochs, rows); a row: (name, study folder, method, the table's AP for seeds 0, 1, 2). A
# table's "baseline" and "FPN-MSE, weight 16" rows are what the others pair with.
TABLES = {
    "4-epoch teacher, 2 epochs": (2, [
        ("baseline", "study4", "baseline", [5.56, 3.56, 4.48]),
        ("FPN-MSE, weight 2", "w2", "fpn-mse", [6.78, 4.59, 6.60]),
        ("FPN-MSE, weight 8", "w8", "fpn-mse", [8.14, 6.10, 7.70]),
        ("FPN-MSE, weight 16", "study4", "fpn-mse", [8.36, 6.35, 8.07]),
        ("ICD, the paper's recipe", "study4", "icd", [7.13, 6.49, 7.50]),
        ("ICD + fakes clamped", "clamp", "icd", [7.07, 6.22, 7.48]),
        ("ICD + projection by the teacher-side AdamW", "proj", "icd", [7.23, 5.46, 5.99]),
        ("ICD + 1000-iteration warm-up", "warm", "icd", [5.56, 3.56, 4.48]),
    ]),
    "4-epoch teacher, 6 epochs": (6, [
        ("baseline", "study4_e6", "baseline", [11.11, 10.45, 11.29]),
        ("FPN-MSE, weight 16", "study4_e6", "fpn-mse", [11.94, 12.62, 12.24]),
        ("ICD, the paper's recipe", "study4_e6", "icd", [12.91, 11.80, 12.87]),
    ]),
    "20-epoch teacher, 2 epochs (baseline: the 4-epoch teacher's, a baseline has no teacher)": (2, [
        ("baseline", "study4", "baseline", [5.56, 3.56, 4.48]),
        ("FPN-MSE, weight 16", "study20", "fpn-mse", [7.22, 6.81, 7.80]),
        ("ICD, the paper's recipe", "study20", "icd", [7.35, 7.17, 7.72]),
        ("ICD, pre-trained side, T = 4", "study20", "icd-pre", [7.72, 7.29, 7.18]),
    ]),
    "20-epoch teacher, 6 epochs (baseline: the 4-epoch teacher's)": (6, [
        ("baseline", "study4_e6", "baseline", [11.11, 10.45, 11.29]),
        ("FPN-MSE, weight 16", "study20", "fpn-mse", [15.96, 15.68, 15.23]),
        ("ICD, the paper's recipe", "study20", "icd", [16.75, 15.18, 15.98]),
        ("ICD, pre-trained side, T = 4", "study20", "icd-pre", [15.63, 16.04, 16.56]),
    ]),
}
SEEDS = (0, 1, 2)


def regenerated_ap(study: str, method: str, epochs: int) -> list[float] | None:
    """AP of seeds 0-2 of ``method`` in ``study`` (each run's last evaluation in its metrics.jsonl;
    None while a run is missing or unfinished: without the stamp the study writes at its end)."""
    values = []
    for seed in SEEDS:
        folder = os.path.join(study, "runs", f"{method}_e{epochs}_s{seed}")
        path = os.path.join(folder, "metrics.jsonl")
        if not os.path.exists(os.path.join(folder, STAMP_FILE)):  # unfinished (or not run)
            return None
        with open(path) as f:
            last = last_eval_of([json.loads(line) for line in f if line.strip()])
        if last is None:
            return None
        values.append(float(last["AP"]))
    return values


def _ms(values: list[float], sign: str = "") -> str:
    mean, std = mean_std(values)
    return f"{mean:{sign}.2f} ± {std:.2f}"


def _paired(a: list[float], b: list[float]) -> str:
    diffs = [x - y for x, y in zip(a, b, strict=True)]
    low, high = interval(diffs)
    ahead = sum(d > 0 for d in diffs)
    return f"{_ms(diffs, '+')} ({ahead} of 3; 95% {low:+.2f} to {high:+.2f})"


def main(root: str) -> None:
    for title, (epochs, rows) in TABLES.items():
        found = {name: regenerated_ap(os.path.join(root, study), method, epochs)
                 for name, study, method, _ in rows}  # fmt: skip
        base, peer = found["baseline"], found["FPN-MSE, weight 16"]
        print(f"\n{title}\n")
        print("| run | AP, table (per seed) | AP, regenerated (per seed) | regenerated - table, paired "
              "| regenerated vs baseline | regenerated vs FPN-MSE w16 |")
        print("| --- | --- | --- | --- | --- | --- |")
        for name, _, _, old in rows:
            new = found[name]
            if new is None:
                print(f"| {name} | {_ms(old)} | not run | | | |")
                continue
            seeds = ", ".join(f"{v:.2f}" for v in new)
            vs_base = _paired(new, base) if base and name != "baseline" else ""
            vs_peer = _paired(new, peer) if peer and name not in ("baseline", "FPN-MSE, weight 16") else ""
            print(f"| {name} | {_ms(old)} ({', '.join(f'{v:.2f}' for v in old)}) | {_ms(new)} ({seeds}) "
                  f"| {_paired(new, old)} | {vs_base} | {vs_peer} |")


if __name__ == "__main__":
    main(sys.argv[1])
