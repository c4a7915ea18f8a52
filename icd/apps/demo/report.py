"""The demo's numbers: each run's last evaluation, ``results.md``, and the summary over several outputs
(mean ± std, and the paired differences with ``icd study``'s verdicts)."""

from __future__ import annotations

import os
from collections.abc import Sequence

from icd.apps.demo.plan import RUN_NAMES, Run
from icd.apps.demo.settings import DemoConfig


def last_eval(run_dir: str) -> dict[str, float]:
    """The ``eval`` record of the latest iteration in ``run_dir/metrics.jsonl`` (``icd study``'s reader)."""
    from icd.apps.study.report import last_eval_of, run_records

    last = last_eval_of(run_records(run_dir))
    if last is None:
        raise RuntimeError(f"{run_dir}/metrics.jsonl has no evaluation")
    return last


def models(cfg: DemoConfig) -> dict[str, str]:
    """The model column of each run of the table."""
    return {
        "teacher": f"teacher {cfg.teacher_backbone} FPN {cfg.teacher_channels}",
        "baseline": f"student {cfg.student_backbone} FPN {cfg.student_channels}",
        "fpn_mse": f"{cfg.student_backbone} + FPN-MSE",
        "icd": f"{cfg.student_backbone} + ICD",
    }


def results_table(runs: Sequence[Run], cfg: DemoConfig) -> tuple[list[dict], str]:
    """One row per run of the table (AP, AP50, AP75 in %, wall seconds) and the markdown table."""
    rows = []
    by_name = {run.name: run for run in runs}
    for run in (by_name[name] for name in RUN_NAMES if name in by_name):
        metrics = last_eval(cfg.run_dir(run.name))
        rows.append(
            {
                "run": run.name,
                "model": models(cfg)[run.name],
                "AP": metrics["AP"],
                "AP50": metrics["AP50"],
                "AP75": metrics["AP75"],
                "lift": metrics.get("lift"),
                "distinctness": metrics.get("distinctness"),
                "iters": run.total_iters,
                "seconds": run.seconds,
                "reused": run.reused,
            }
        )
    lines = [
        "| run | model | AP | AP50 | AP75 | lift | distinctness | iterations | train + eval time |",
        "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for r in rows:
        when = f"{r['seconds']:.0f} s" + (" (reused)" if r["reused"] else "")
        lift = "" if r["lift"] is None else f"{r['lift']:.2f}"
        distinct = "" if r["distinctness"] is None else f"{r['distinctness']:.2f}"
        lines.append(
            f"| {r['run']} | {r['model']} | {r['AP']:.1f} | {r['AP50']:.1f} | {r['AP75']:.1f} | "
            f"{lift} | {distinct} | {r['iters']} | {when} |"
        )
    return rows, "\n".join(lines) + "\n"


def write_results(cfg: DemoConfig, table: str, runs: Sequence[Run] = ()) -> str:
    """``results.md`` under ``cfg.out_dir``: what was trained on what, the table, then ``icd study``'s
    sections on ``runs``: every loss-health warning of every run and the exact commands; returns its path."""
    from icd.apps.demo.plan import student_study
    from icd.apps.study.report import commands_section, health_section

    header = (
        f"# icd demo: {cfg.detector}, teacher {cfg.teacher_backbone} (FPN {cfg.teacher_channels}) "
        f"-> student {cfg.student_backbone} (FPN {cfg.student_channels})\n\n"
        f"Shapes data {cfg.num_train} train / {cfg.num_val} val images of {cfg.image_size} px, "
        f"seed {cfg.seed}; COCO bbox AP (%) on val after the last epoch.\n\n"
    )
    sections = [health_section(runs, cfg), commands_section(runs, student_study(cfg), what="demo")] if runs else []
    path = os.path.join(cfg.out_dir, "results.md")
    with open(f"{path}.tmp", "w") as f:
        f.write("\n".join([header + table, *sections]))
    os.replace(f"{path}.tmp", path)
    return path


def summarize(out_dirs: Sequence[str]) -> str:
    """Mean and spread of AP, AP50, AP75 of each run over several demo outputs (seeds), markdown.

    Spread: the sample standard deviation over the outputs, and (min, max). Also the per-output
    AP of each run, so a reader sees every number behind the mean.
    """
    from icd.apps.study.stats import mean_std

    per_run: dict[str, list[dict]] = {}
    for out in out_dirs:
        for name in RUN_NAMES:
            per_run.setdefault(name, []).append(last_eval(os.path.join(out, name)))
    lines = [
        f"| run | AP mean ± std (min-max) | AP50 mean ± std | AP75 mean ± std | AP per output ({len(out_dirs)}) |",
        "| --- | --- | --- | --- | --- |",
    ]
    for name, evals in per_run.items():
        cells = []
        for key in ("AP", "AP50", "AP75"):
            values = [e[key] for e in evals]
            mean, std = mean_std(values)
            cell = f"{mean:.2f} ± {std:.2f}"
            if key == "AP":
                cell += f" ({min(values):.2f}-{max(values):.2f})"
            cells.append(cell)
        each = ", ".join(f"{e['AP']:.2f}" for e in evals)
        lines.append(f"| {name} | {' | '.join(cells)} | {each} |")
    return "\n".join(lines) + "\n" + paired_verdicts({n: [e["AP"] for e in v] for n, v in per_run.items()})


def paired_verdicts(ap: dict[str, list[float]]) -> str:
    """The students' AP differences paired per output (seed), with ``icd study``'s verdicts
    (:func:`icd.apps.study.stats.verdict`): each distilled student against the baseline, and ICD
    against FPN-MSE."""
    from icd.apps.study.stats import verdict

    pairs = [("fpn_mse", "baseline"), ("icd", "baseline"), ("icd", "fpn_mse")]
    lines = [f"- {verdict(a, b, [x - y for x, y in zip(ap[a], ap[b], strict=True)])}." for a, b in pairs]
    return "\nPaired per output (the same seed):\n\n" + "\n".join(lines) + "\n"
