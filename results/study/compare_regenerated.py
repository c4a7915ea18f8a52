"""Runs of `icd study` regenerated beside results/README.md's tables: each row's AP per seed against
the table's, paired per seed, and against the regenerated baseline and FPN-MSE w16 of the same seeds.

    python results/study/compare_regenerated.py $STUDY

reads the runs of each study below ($STUDY/<study>/runs/<method>_e<epochs>_s<seed>/metrics.jsonl;
the commands: results/README.md) and prints markdown tables. Runs of different studies pair here
because every run is seeded (same initialisation and data order per seed); `icd study` itself pairs
only the runs it ran.
"""

from __future__ import annotations

import os
import sys

from icd.apps.demo.stamps import STAMP_FILE
from icd.apps.study.report import last_eval_of, run_records
from icd.apps.study.stats import interval, mean_std

# table -> (epochs, seeds, rows[, peer]); a row: (name, source, method, the table's AP per seed), the
# source being a study folder, or (folder, seeds) pairs where the seeds were run by several studies.
# A table's "baseline" row and its peer row (PEER unless named) are what the others pair with.
SEEDS = (0, 1, 2)
FIVE = (0, 1, 2, 3, 4)
PEER = "FPN-MSE, weight 16"
RAW_PEER = "FPN-MSE, raw, weight 1"
TABLES = {
    "4-epoch teacher, 2 epochs": (2, SEEDS, [
        ("baseline", "study4", "baseline", [5.56, 3.56, 4.48]),
        ("FPN-MSE, weight 2", "w2", "fpn-mse", [6.78, 4.59, 6.60]),
        ("FPN-MSE, weight 8", "w8", "fpn-mse", [8.14, 6.10, 7.70]),
        ("FPN-MSE, weight 16", "study4", "fpn-mse", [8.36, 6.35, 8.07]),
        ("ICD, the paper's recipe", "study4", "icd", [7.13, 6.49, 7.50]),
        ("ICD, pre-trained side, T = 1", "study4", "icd-pre", [3.31, 5.81, 7.13]),
        ("ICD, pre-trained side, T = 4", "study4_T4", "icd-pre", [6.41, 6.46, 7.46]),
        ("ICD + fakes clamped", "clamp", "icd", [7.07, 6.22, 7.48]),
        ("ICD + projection by the teacher-side AdamW", "proj", "icd", [7.23, 5.46, 5.99]),
        ("ICD + 1000-iteration warm-up", "warm", "icd", [5.56, 3.56, 4.48]),
    ]),
    "4-epoch teacher, 6 epochs": (6, SEEDS, [
        ("baseline", "study4_e6", "baseline", [11.11, 10.45, 11.29]),
        ("FPN-MSE, weight 16", "study4_e6", "fpn-mse", [11.94, 12.62, 12.24]),
        ("ICD, the paper's recipe", "study4_e6", "icd", [12.91, 11.80, 12.87]),
        ("ICD, pre-trained side, T = 1", "study4_e6_T1", "icd-pre", [10.87, 11.58, 10.96]),
        ("ICD, pre-trained side, T = 4", "study4_T4", "icd-pre", [12.25, 11.74, 12.79]),
    ]),
    "20-epoch teacher, 2 epochs (baseline: the 4-epoch teacher's, a baseline has no teacher)": (2, SEEDS, [
        ("baseline", "study4", "baseline", [5.56, 3.56, 4.48]),
        ("FPN-MSE, weight 16", "study20", "fpn-mse", [7.22, 6.81, 7.80]),
        ("ICD, the paper's recipe", "study20", "icd", [7.35, 7.17, 7.72]),
        ("ICD, pre-trained side, T = 1", "study20_T1", "icd-pre", [3.82, 3.44, 2.21]),
        ("ICD, pre-trained side, T = 2", "study20_T2", "icd-pre", [7.52, 5.54, 7.21]),
        ("ICD, pre-trained side, T = 4", "study20", "icd-pre", [7.72, 7.29, 7.18]),
    ]),
    "20-epoch teacher, 6 epochs (baseline: the 4-epoch teacher's)": (6, SEEDS, [
        ("baseline", "study4_e6", "baseline", [11.11, 10.45, 11.29]),
        ("FPN-MSE, weight 16", "study20", "fpn-mse", [15.96, 15.68, 15.23]),
        ("ICD, the paper's recipe", "study20", "icd", [16.75, 15.18, 15.98]),
        ("ICD, pre-trained side, T = 4", "study20", "icd-pre", [15.63, 16.04, 16.56]),
    ]),
    "20-epoch teacher, 6 epochs, 5 seeds (seeds 3 and 4: one more study, baseline included)": (6, FIVE, [
        ("baseline", (("study4_e6", SEEDS), ("study20_s34", (3, 4))), "baseline",
         [11.11, 10.45, 11.29, 11.32, 11.53]),
        ("FPN-MSE, weight 16", (("study20", SEEDS), ("study20_s34", (3, 4))), "fpn-mse",
         [15.96, 15.68, 15.23, 16.56, 16.42]),
        ("ICD, the paper's recipe", (("study20", SEEDS), ("study20_s34", (3, 4))), "icd",
         [16.75, 15.18, 15.98, 16.04, 15.61]),
        ("ICD, pre-trained side, T = 4", (("study20", SEEDS), ("study20_s34", (3, 4))), "icd-pre",
         [15.63, 16.04, 16.56, 16.42, 15.16]),
    ]),
    "Section 2: the earlier demo's 3-epoch ResNet-34 teacher, 2 epochs, raw FPN-MSE weight 1": (2, SEEDS, [
        ("baseline", "s2_main", "baseline", [4.74, 2.97, 5.33]),
        (RAW_PEER, "s2_main", "fpn-mse", [6.51, 7.03, 7.06]),
        ("ICD, the paper's recipe", "s2_main", "icd", [6.07, 5.76, 7.39]),
    ], RAW_PEER),
}
Source = str | tuple[tuple[str, tuple[int, ...]], ...]


def run_ap(study: str, method: str, epochs: int, seed: int) -> float | None:
    """AP of one run of ``study`` (its last evaluation in its metrics.jsonl; None while the run is
    missing or unfinished: without the stamp the study writes at its end)."""
    folder = os.path.join(study, "runs", f"{method}_e{epochs}_s{seed}")
    if not os.path.exists(os.path.join(folder, STAMP_FILE)):
        return None
    last = last_eval_of(run_records(folder))
    return None if last is None else float(last["AP"])


def regenerated_ap(root: str, source: Source, method: str, epochs: int, seeds: tuple[int, ...]) -> list[float] | None:
    """AP of ``seeds`` of ``method`` (in seed order), each from the study ``source`` names for it;
    None while any of them is missing."""
    pairs = ((source, seeds),) if isinstance(source, str) else source
    study_of = {seed: study for study, group in pairs for seed in group}
    values = [run_ap(os.path.join(root, study_of[seed]), method, epochs, seed) for seed in seeds]
    return None if any(v is None for v in values) else values


def _ms(values: list[float], sign: str = "") -> str:
    mean, std = mean_std(values)
    return f"{mean:{sign}.2f} ± {std:.2f}"


def _paired(a: list[float], b: list[float]) -> str:
    diffs = [x - y for x, y in zip(a, b, strict=True)]
    low, high = interval(diffs)
    ahead = sum(d > 0 for d in diffs)
    return f"{_ms(diffs, '+')} ({ahead} of {len(diffs)}; 95% {low:+.2f} to {high:+.2f})"


def main(root: str) -> None:
    for title, (epochs, seeds, rows, *named) in TABLES.items():
        peer_name = named[0] if named else PEER
        found = {name: regenerated_ap(root, source, method, epochs, seeds) for name, source, method, _ in rows}
        base, peer = found["baseline"], found[peer_name]
        print(f"\n{title}\n")
        print("| run | AP, table (per seed) | AP, regenerated (per seed) | regenerated - table, paired "
              f"| regenerated vs baseline | regenerated vs {peer_name} |")
        print("| --- | --- | --- | --- | --- | --- |")
        for name, _, _, old in rows:
            new = found[name]
            if new is None:
                print(f"| {name} | {_ms(old)} ({', '.join(f'{v:.2f}' for v in old)}) | not run | | | |")
                continue
            seeds = ", ".join(f"{v:.2f}" for v in new)
            vs_base = _paired(new, base) if base and name != "baseline" else ""
            vs_peer = _paired(new, peer) if peer and name not in ("baseline", peer_name) else ""
            print(f"| {name} | {_ms(old)} ({', '.join(f'{v:.2f}' for v in old)}) | {_ms(new)} ({seeds}) "
                  f"| {_paired(new, old)} | {vs_base} | {vs_peer} |")


if __name__ == "__main__":
    main(sys.argv[1])
