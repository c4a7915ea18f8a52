"""Where ICD's attention goes in the dense study: the last evaluation of each ICD run, mean ± sample
std over seeds (runs METHOD_eEPOCHS_sSEED with --attention-detail), and icd pretrain's curve.

    python attention_table.py RUNS_DIR [--pretrain PRETRAIN_DIR ...]
"""

import argparse
import json
import os
import re
import statistics
from collections import defaultdict

LEVELS = ("P3", "P4", "P5", "P6", "P7")
COLUMNS = (
    ["lift", "lift_P3", "lift_P4", "lift_P5", "lift_tiny", "lift_small", "distinctness", "distinctness_P3"]
    + ["mass_own", "mass_others", "mass_background", "mass_border", "mass_padding"]
    + [f"mass_{lvl}" for lvl in LEVELS]
)


def cell(values: list[float]) -> str:
    if not values:
        return ""
    if len(values) == 1:
        return f"{values[0]:.2f}"
    return f"{statistics.fmean(values):.2f} ± {statistics.stdev(values):.2f}"


def records(path: str, kind: str) -> list[dict]:
    with open(path) as f:
        return [r for r in map(json.loads, f) if r.get("type") == kind]


def main(runs: str, pretrain: list[str]) -> None:
    groups = defaultdict(list)
    for name in sorted(os.listdir(runs)):
        match = re.match(r"(.+)_e(\d+)_s(\d+)$", name)
        path = os.path.join(runs, name, "metrics.jsonl")
        if not match or not os.path.exists(path):
            continue
        evals = [r for r in records(path, "eval") if "mass_own" in r and r["epoch"] == int(match.group(2)) - 1]
        if evals:
            groups[(match.group(1), int(match.group(2)))].append(evals[-1])
    print("| run | epochs | seeds | " + " | ".join(COLUMNS) + " |")
    print("| --- | ---: | ---: |" + " --- |" * len(COLUMNS))
    for (method, epochs), rows in sorted(groups.items()):
        cells = [cell([r[c] for r in rows if c in r]) for c in COLUMNS]
        print(f"| {method} | {epochs} | {len(rows)} | " + " | ".join(cells) + " |")
    for folder in pretrain:
        print(f"\n{folder} (icd pretrain):\n")
        print("| iter | " + " | ".join(COLUMNS) + " |")
        print("| ---: |" + " --- |" * len(COLUMNS))
        for r in records(os.path.join(folder, "metrics.jsonl"), "attention"):
            print(f"| {r['iter']} | " + " | ".join(f"{r[c]:.2f}" if c in r else "" for c in COLUMNS) + " |")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("runs", help="the study's runs/ folder")
    parser.add_argument("--pretrain", nargs="*", default=[], help="icd pretrain output folders")
    args = parser.parse_args()
    main(args.runs, args.pretrain)
