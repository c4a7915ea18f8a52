"""The table of results/rtdetr/README.md from the runs of run.sh: python summarize.py WORK."""

from __future__ import annotations

import json
import os
import statistics
import sys

METHODS = ("baseline", "fpn-mse", "icd", "icd-pre")  # icd-pre: run_pretrained.sh (--icd-init)
SEEDS = (0, 1, 2)


def records(run: str) -> list[dict]:
    with open(os.path.join(run, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


def last(recs: list[dict], kind: str) -> dict:
    return [r for r in recs if r["type"] == kind][-1]


def mean_sd(values: list[float]) -> str:
    if not values:
        return "-"
    sd = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{statistics.mean(values):.2f} ± {sd:.2f}"


def main(work: str) -> None:
    teacher = records(os.path.join(work, "teacher"))
    ev, tr = last(teacher, "eval"), last(teacher, "train")
    print(f"Teacher (RT-DETR R50, {tr['iter']} iterations): AP {ev['AP']:.2f}, AP50 {ev['AP50']:.2f}; "
          f"last losses vfl {tr['loss_vfl']:.2f}, bbox {tr['loss_bbox']:.2f}, giou {tr['loss_giou']:.2f}\n")
    print("| student (R18) | seeds | AP | AP50 | AP75 | per seed AP | last loss_vfl | last loss_bbox | "
          "last loss_giou | last loss_distill | s/iter |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for method in METHODS:
        runs = [os.path.join(work, f"{method}-s{s}") for s in SEEDS]
        done = [records(r) for r in runs if os.path.exists(os.path.join(r, "metrics.jsonl"))]
        done = [r for r in done if any(x["type"] == "eval" for x in r)]
        if not done:
            continue
        evs = [last(r, "eval") for r in done]
        trs = [last(r, "train") for r in done]
        speed = [statistics.mean(x["sec_per_iter"] for x in r if x["type"] == "train") for r in done]

        def col(key: str, rows: list[dict]) -> str:
            return mean_sd([r[key] for r in rows if key in r])

        per_seed = ", ".join(f"{e['AP']:.2f}" for e in evs)
        print(f"| {method} | {len(done)} | {col('AP', evs)} | {col('AP50', evs)} | {col('AP75', evs)} | "
              f"{per_seed} | {col('loss_vfl', trs)} | {col('loss_bbox', trs)} | "
              f"{col('loss_giou', trs)} | {col('loss_distill', trs)} | {mean_sd(speed)} |")


if __name__ == "__main__":
    main(sys.argv[1])
