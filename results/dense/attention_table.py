"""Where ICD's attention goes in the dense study, and what its auxiliary task learns: the last
evaluation of each ICD run (``icd study`` folders, runs METHOD_eEPOCHS_sSEED trained with
--attention-detail), mean ± sample std over seeds, and the evaluations of ``icd pretrain`` runs.

    python attention_table.py --study LABEL=STUDY_DIR [...] [--pretrain PRETRAIN_DIR ...]
"""

import argparse
import json
import os
import re
import statistics
from collections import defaultdict

ATTENTION = ["lift", "lift_P3", "lift_P4", "lift_tiny", "lift_small", "distinctness", "mass_own", "mass_others",
             "mass_background", "mass_border", "mass_P3"]  # fmt: skip
AUXILIARY = ["aux_auc", "aux_auc_tiny", "aux_auc_small", "aux_conf_real", "aux_conf_fake", "aux_reg_real",
             "aux_reg_real_tiny"]  # fmt: skip
COLUMNS = ATTENTION + AUXILIARY


def cell(values: list[float]) -> str:
    if not values:
        return ""
    if len(values) == 1:
        return f"{values[0]:.2f}"
    return f"{statistics.fmean(values):.2f} ± {statistics.stdev(values):.2f}"


def records(path: str, kind: str) -> list[dict]:
    with open(path) as f:
        return [r for r in map(json.loads, f) if r.get("type") == kind]


def last_evaluations(study: str) -> dict[tuple[str, int], list[dict]]:
    """{(method, epochs): the last evaluation of each seed's run} of the ICD runs of a study."""
    groups = defaultdict(list)
    runs = os.path.join(study, "runs")
    for name in sorted(os.listdir(runs)):
        match = re.match(r"(.+)_e(\d+)_s(\d+)$", name)
        path = os.path.join(runs, name, "metrics.jsonl")
        if not match or not os.path.exists(path):
            continue
        evals = [r for r in records(path, "eval") if "lift" in r and r["epoch"] == int(match.group(2)) - 1]
        if evals:
            groups[(match.group(1), int(match.group(2)))].append(evals[-1])
    return groups


def main(studies: list[str], pretrain: list[str]) -> None:
    print("| study | run | epochs | seeds | " + " | ".join(COLUMNS) + " |")
    print("| --- | --- | ---: | ---: |" + " --- |" * len(COLUMNS))
    for labelled in studies:
        label, _, folder = labelled.rpartition("=")
        for (method, epochs), rows in sorted(last_evaluations(folder).items()):
            cells = [cell([r[c] for r in rows if c in r]) for c in COLUMNS]
            print(f"| {label or folder} | {method} | {epochs} | {len(rows)} | " + " | ".join(cells) + " |")
    for folder in pretrain:
        print(f"\n{folder} (icd pretrain; aux_conf: the training loss, mean of the logged iterations since the "
              "evaluation before):\n")  # fmt: skip
        print("| iter | " + " | ".join(COLUMNS) + " | aux_conf (train) |")
        print("| ---: |" + " --- |" * (len(COLUMNS) + 1))
        path = os.path.join(folder, "metrics.jsonl")
        losses = records(path, "pretrain")
        before = -1
        for r in records(path, "attention"):
            window = [x["loss_aux_conf"] for x in losses if before < x["iter"] <= r["iter"]]
            before = r["iter"]
            train = f"{statistics.fmean(window):.3f}" if window else ""
            print(f"| {r['iter']} | " + " | ".join(f"{r[c]:.2f}" if c in r else "" for c in COLUMNS) + f" | {train} |")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--study", nargs="*", default=[], help="LABEL=FOLDER of an icd study (or just FOLDER)")
    parser.add_argument("--pretrain", nargs="*", default=[], help="icd pretrain output folders")
    args = parser.parse_args()
    main(args.study, args.pretrain)
