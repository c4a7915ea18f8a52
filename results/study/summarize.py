"""Mean ± sample std of each study run's last evaluation, and paired per-seed differences.

    python summarize.py RUNS_DIR [--against baseline fpn_mse]

Runs of the same seed share the student's initialisation and data order, so the per-seed
difference to a control (AP of the run minus AP of the control, same seed, same schedule)
removes most of the seed-to-seed spread; it is reported for every run against each control.
"""

import argparse
import json
import os
import re
import statistics
from collections import defaultdict


def mean_std(rows: list[dict], key: str) -> str:
    values = [r[key] for r in rows if key in r]
    if not values:
        return ""
    if len(values) == 1:
        return f"{values[0]:.2f}"
    return f"{statistics.fmean(values):.2f} ± {statistics.stdev(values):.2f}"


def paired(groups: dict, controls: list[str]) -> None:
    """Per-seed AP differences of every non-control run to each control of the same schedule."""
    print("\n| run | epochs | control | AP difference mean ± std | per seed | runs ahead |")
    print("| --- | ---: | --- | --- | --- | --- |")
    for (method, epochs), seeded in sorted(groups.items(), key=lambda kv: (kv[0][1], kv[0][0])):
        for control in controls:
            if method in controls or (control, epochs) not in groups:
                continue
            theirs = {s: r["AP"] for s, r in groups[(control, epochs)]}
            diffs = [(s, r["AP"] - theirs[s]) for s, r in sorted(seeded, key=lambda x: x[0]) if s in theirs]
            if not diffs:
                continue
            values = [d for _, d in diffs]
            spread = f" ± {statistics.stdev(values):.2f}" if len(values) > 1 else ""
            per_seed = ", ".join(f"s{s}: {d:+.2f}" for s, d in diffs)
            ahead = sum(d > 0 for d in values)
            print(f"| {method} | {epochs} | {control} | {statistics.fmean(values):+.2f}{spread} | {per_seed} | "
                  f"{ahead} of {len(values)} |")


def main(runs: str, controls: list[str]) -> None:
    groups = defaultdict(list)
    for name in sorted(os.listdir(runs)):
        match = re.match(r"(.+)_e(\d+)_s(\d+)$", name)
        path = os.path.join(runs, name, "metrics.jsonl")
        if not match or not os.path.exists(path):
            continue
        with open(path) as f:
            evals = [r for r in map(json.loads, f) if r.get("type") == "eval"]
        epochs = int(match.group(2))
        finished = [r for r in evals if r["epoch"] == epochs - 1]  # unfinished runs are left out
        if finished:
            groups[(match.group(1), epochs)].append((int(match.group(3)), finished[-1]))
    print("| run | epochs | AP mean ± std | AP50 | AP per seed | lift | distinctness |")
    print("| --- | ---: | --- | --- | --- | --- | --- |")
    for (method, epochs), seeded in sorted(groups.items(), key=lambda kv: (kv[0][1], kv[0][0])):
        seeded.sort(key=lambda x: x[0])
        rows = [r for _, r in seeded]
        per_seed = ", ".join(f"s{s}: {r['AP']:.2f}" for s, r in seeded)
        print(f"| {method} | {epochs} | {mean_std(rows, 'AP')} | {mean_std(rows, 'AP50')} | {per_seed} | "
              f"{mean_std(rows, 'lift')} | {mean_std(rows, 'distinctness')} |")
    paired(groups, controls)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("runs", help="the study's runs/ folder (METHOD_eEPOCHS_sSEED sub-folders)")
    parser.add_argument("--against", nargs="+", default=["baseline", "fpn_mse"], help="control runs")
    args = parser.parse_args()
    main(args.runs, args.against)
