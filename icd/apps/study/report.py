"""``study.md``: per-run AP, mean ± std, paired differences, verdicts, loss health, the exact commands."""

from __future__ import annotations

import os
import shlex
from collections.abc import Sequence

from icd.apps.demo.plan import Run
from icd.apps.study.plan import run_name
from icd.apps.study.settings import StudyConfig
from icd.apps.study.stats import interval, mean_std, paired_differences, verdict


def run_records(run_dir: str) -> list[dict]:
    from icd.engine.metrics import read_metrics

    return read_metrics(run_dir)


def last_eval_of(records: Sequence[dict]) -> dict | None:
    evals = [r for r in records if r.get("type") == "eval"]
    return max(evals, key=lambda r: r["iter"]) if evals else None


def health_records(records: Sequence[dict]) -> list[dict]:
    return [r for r in records if r.get("type") == "health"]


def collect(cfg: StudyConfig) -> dict[int, dict[str, dict[int, dict]]]:
    """epochs -> method -> seed -> the run's last evaluation, for the runs that have one."""
    found: dict[int, dict[str, dict[int, dict]]] = {}
    for epochs in cfg.epochs:
        for method in cfg.methods:
            for seed in cfg.seeds:
                folder = cfg.run_dir(cfg.named(run_name(method, epochs, seed)))
                if not os.path.exists(os.path.join(folder, "metrics.jsonl")):
                    continue
                last = last_eval_of(run_records(folder))
                if last is not None:
                    found.setdefault(epochs, {}).setdefault(method, {})[seed] = last
    return found


def best_other(method: str, means: dict[str, float]) -> str | None:
    """The other non-baseline method of the highest mean AP (None when there is none)."""
    others = [m for m in means if m not in (method, "baseline")]
    return max(others, key=lambda m: means[m]) if others else None


def schedule_section(epochs: int, results: dict[str, dict[int, dict]], seeds: Sequence[int]) -> tuple[str, list[str]]:
    """The markdown of one schedule (AP table, paired differences) and its verdict sentences."""
    ap = {m: {s: e["AP"] for s, e in per_seed.items()} for m, per_seed in results.items()}
    means = {m: mean_std(list(v.values()))[0] for m, v in ap.items() if v}
    lines = [
        f"## {epochs}-epoch schedule",
        "",
        "| method | " + " | ".join(f"AP s{s}" for s in seeds) + " | AP mean ± std | AP50 mean ± std |",
        "| --- | " + " | ".join("---:" for _ in seeds) + " | --- | --- |",
    ]
    for method, per_seed in results.items():
        cells = [f"{per_seed[s]['AP']:.2f}" if s in per_seed else "" for s in seeds]
        m, sd = mean_std([e["AP"] for e in per_seed.values()])
        m50, sd50 = mean_std([e["AP50"] for e in per_seed.values()])
        lines.append(f"| {method} | {' | '.join(cells)} | {m:.2f} ± {sd:.2f} | {m50:.2f} ± {sd50:.2f} |")
    lines += [
        "",
        "Paired differences (AP of the method minus AP of the other, same seed):",
        "",
        "| method | against | per seed | mean ± std | seeds ahead | 95% interval of the mean |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    verdicts = []
    for method in results:
        if method == "baseline":
            continue
        against = ["baseline"] if "baseline" in ap else []
        other = best_other(method, means)
        if other is not None:
            against.append(other)
        for control in against:
            diffs = paired_differences(ap[method], ap[control])
            if not diffs:
                continue
            values = list(diffs.values())
            m, sd = mean_std(values)
            span = interval(values)
            span_text = "one seed: none" if span is None else f"{span[0]:+.2f} to {span[1]:+.2f}"
            per_seed = ", ".join(f"s{s}: {d:+.2f}" for s, d in diffs.items())
            ahead = sum(d > 0 for d in values)
            lines.append(
                f"| {method} | {control} | {per_seed} | {m:+.2f} ± {sd:.2f} | {ahead} of {len(values)} | {span_text} |"
            )
            verdicts.append(verdict(method, control, values))
    return "\n".join(lines) + "\n", verdicts


def headline(results: dict[str, dict[int, dict]]) -> str | None:
    """The study's answer at one schedule: the best method against the baseline and the runner-up."""
    ap = {m: {s: e["AP"] for s, e in v.items()} for m, v in results.items() if v}
    means = {m: mean_std(list(v.values()))[0] for m, v in ap.items()}
    best = max((m for m in means if m != "baseline"), key=lambda m: means[m], default=None)
    if best is None:
        return None
    parts = []
    if "baseline" in ap:
        parts.append(verdict(best, "baseline", list(paired_differences(ap[best], ap["baseline"]).values())))
    other = best_other(best, means)
    if other is not None:
        parts.append(verdict(best, other, list(paired_differences(ap[best], ap[other]).values())))
    return "; ".join(parts)


def health_section(runs: Sequence[Run], cfg: StudyConfig) -> str:
    rows = []
    for run in runs:
        folder = cfg.run_dir(run.name)
        if not os.path.exists(os.path.join(folder, "metrics.jsonl")):
            continue
        for r in health_records(run_records(folder)):
            value = r.get("value")
            shown = f"{value:.4g}" if isinstance(value, (int, float)) else str(value)
            rows.append(f"| {run.name} | {r.get('iter')} | {r.get('loss')} | {r.get('problem')} | {shown} |")
    head = ["## Loss health", ""]
    if not rows:
        return "\n".join(head + ['No run logged a loss-health warning (metrics.jsonl "health" records).', ""])
    return "\n".join(
        head
        + [
            'Every "health" record of every run\'s metrics.jsonl:',
            "",
            "| run | iteration | loss | problem | value |",
            "| --- | ---: | --- | --- | ---: |",
            *rows,
            "",
        ]
    )


def commands_section(
    runs: Sequence[Run], cfg: StudyConfig, extra: Sequence[Sequence[str]] = (), what: str = "study"
) -> str:
    """The markdown section of every run's command (``what``: the study or the demo that ran them);
    a run with ``all_threads`` (the demo's teacher) had every job slot's threads."""

    def env(threads: int) -> str:
        return f"OMP_NUM_THREADS={threads} " if not cfg.gpus else ""

    lines = [
        "## Commands",
        "",
        f"Each run, exactly as the {what} ran it (one process each, from the {what}'s working folder):",
        "",
        "```bash",
    ]
    for argv in extra:
        lines.append(f"{env(cfg.threads)}python -m icd {shlex.join(argv)}")
    for run in runs:
        threads = cfg.threads * (cfg.jobs if run.all_threads else 1)
        lines.append(f"{env(threads)}python -m icd {shlex.join(run.argv)}")
    return "\n".join([*lines, "```", ""])


def write_study_md(
    cfg: StudyConfig,
    runs: Sequence[Run],
    teacher_text: str,
    calibration_text: str,
    extra_commands: Sequence[Sequence[str]] = (),
    curves: str | None = None,
) -> tuple[str, list[str]]:
    """Write ``OUT/study.md``; returns its path and the headline verdicts (one per schedule)."""
    results = collect(cfg)
    parts = [
        f"# icd study: {', '.join(cfg.methods)}\n",
        f"Student: {cfg.detector} {cfg.backbone} FPN {cfg.fpn_channels}, lr {cfg.lr}, batch {cfg.batch_size}; "
        f"teacher {cfg.teacher}; data `{shlex.join(cfg.data_flags)}`; seeds {', '.join(map(str, cfg.seeds))}; "
        f"schedules {', '.join(f'{e} epochs' for e in cfg.epochs)}. AP: COCO bbox AP (%) on val at each run's "
        "last evaluation.\n",
        "How to read it: ± is the sample std over seeds; a method is called ahead (behind) only when the 95% "
        "interval of its mean paired difference (Student's t over the seeds) excludes 0, otherwise the two are "
        "level within the spread (docs/study.md).\n",
    ]
    headlines = []
    for epochs in cfg.epochs:
        if epochs in results:
            line = headline(results[epochs])
            if line:
                headlines.append(f"{epochs} epoch(s): {line}")
    if headlines:
        parts.append("## Verdict\n\n" + "\n".join(f"- {h}." for h in headlines) + "\n")
    parts.append(teacher_text)
    if calibration_text:
        parts.append(calibration_text)
    for epochs in cfg.epochs:
        if epochs not in results:
            parts.append(f"## {epochs}-epoch schedule\n\nNo finished run.\n")
            continue
        section, verdicts = schedule_section(epochs, results[epochs], cfg.seeds)
        parts.append(section)
        parts.append("Verdicts:\n\n" + "\n".join(f"- {v}." for v in verdicts) + "\n")
    if curves:
        parts.append(f"## Curves\n\n![loss and AP curves of every run]({os.path.basename(curves)})\n")
    parts.append(health_section(runs, cfg))
    parts.append(commands_section(runs, cfg, extra_commands))
    path = os.path.join(cfg.out_dir, "study.md")
    with open(f"{path}.tmp", "w") as f:
        f.write("\n".join(parts))
    os.replace(f"{path}.tmp", path)
    return path, headlines
