"""Mean ± sample std of each study run's last evaluation: python summarize.py RUNS_DIR"""

import json
import os
import re
import statistics
import sys
from collections import defaultdict


def mean_std(rows: list[dict], key: str) -> str:
    values = [r[key] for r in rows if key in r]
    if not values:
        return ""
    if len(values) == 1:
        return f"{values[0]:.2f}"
    return f"{statistics.fmean(values):.2f} ± {statistics.stdev(values):.2f}"


def main(runs: str) -> None:
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


if __name__ == "__main__":
    main(sys.argv[1])
