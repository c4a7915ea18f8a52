"""``icd study --calibrate``: each distilling method's loss weight from short runs on one seed.

Two ways, both on the study's first seed:

* ``sweep``: one run of ``--calibrate-epochs`` per weight of a small grid (FPN-MSE 4, 16, 64;
  ICD 2, 8, 32 by default); the weight of the best val AP is kept (a tie: the smaller weight).
* ``match``: one run at weight 1, the first 30 iterations of the study's first schedule (its lr
  and warm-up; where the fraction was measured, results/README.md); the weight is chosen so
  that the weighted distillation loss is ``fraction`` times the detection loss over iterations
  16-30 (rounded to a power of 2):
  ``weight = fraction * mean(detection loss) / mean(loss_distill at weight 1)``.

The runs are scheduled like the study's own (``OUT/runs/calibrate_METHOD_wW``) and reused on
``--resume``.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Sequence

from icd.apps.demo.plan import Run
from icd.apps.study.plan import iterations_per_epoch, train_argv
from icd.apps.study.report import last_eval_of, run_records
from icd.apps.study.settings import StudyConfig, base_method

MODES = ("sweep", "match")
MATCH_ITERS = 30  # the match rule's run: --stop-after-iters
SWEEP = {"fpn-mse": (4.0, 16.0, 64.0), "icd": (2.0, 8.0, 32.0)}  # around each default (16, 8)


def calibrated_methods(cfg: StudyConfig) -> list[str]:
    """The distilling base methods whose weight is calibrated (``fpn-mse``, ``icd``; icd-pre
    shares icd's weight): those of the study without a weight given."""
    bases = {"icd" if base_method(m) == "icd-pre" else base_method(m) for m in cfg.methods}
    return [m for m in ("fpn-mse", "icd") if m in bases and m not in cfg.weights]


def calibration_name(method: str, weight: float) -> str:
    return f"calibrate_{method}_w{weight:g}"


def calibration_runs(
    cfg: StudyConfig, mode: str, epochs: int, num_train: int, grid: dict[str, Sequence[float]] | None = None
) -> list[Run]:
    """The short runs of ``mode`` for every calibrated method (seed: the study's first)."""
    grid = grid or SWEEP
    runs = []
    seed = cfg.seeds[0]
    for method in calibrated_methods(cfg):
        for weight in grid[method] if mode == "sweep" else (1.0,):
            name = calibration_name(method, weight)
            if mode == "sweep":
                argv = train_argv(cfg, method, epochs, seed, weight=weight, output_dir=cfg.run_dir(name))
                length = epochs * iterations_per_epoch(num_train, cfg.batch_size)
            else:  # the study's schedule (its warm-up), stopped early: no evaluation
                argv = train_argv(cfg, method, cfg.epochs[0], seed, weight=weight, output_dir=cfg.run_dir(name))
                argv += ["--print-freq", "1", "--stop-after-iters", str(MATCH_ITERS)]
                length = MATCH_ITERS
            runs.append(Run(name, f"calibrate {method} w{weight:g}", argv, length))
    return runs


def loss_ratio(records: Sequence[dict], weight: float) -> float:
    """mean(detection loss) / mean(unweighted loss_distill) over the second half of a run's
    training records (``weight``: the run's --distill-weight)."""
    from icd.engine.metrics import distillation_loss_keys

    distill_keys = set(distillation_loss_keys())
    train = [r for r in records if r.get("type") == "train" and "loss_distill" in r]
    half = train[len(train) // 2 :]
    if not half:
        raise RuntimeError("no training record with loss_distill")
    detection = statistics.fmean(
        sum(v for k, v in r.items() if k.startswith("loss_") and k not in distill_keys) for r in half
    )
    distill = statistics.fmean(r["loss_distill"] for r in half) / weight
    if distill <= 0:
        raise RuntimeError("the distillation loss was 0 over the run's second half")
    return detection / distill


def matched_weight(ratio: float, fraction: float) -> float:
    """``fraction * ratio`` rounded to the nearest power of 2."""
    return float(2 ** round(math.log2(fraction * ratio)))


def pick_weights(cfg: StudyConfig, mode: str, runs: Sequence[Run]) -> dict:
    """{method: {"weight", "evidence"}} from the finished calibration runs (match: at ``cfg.match_fraction``)."""
    fraction = cfg.match_fraction
    picked = {}
    for method in calibrated_methods(cfg):
        mine = [r for r in runs if r.name.startswith(f"calibrate_{method}_w")]
        if mode == "sweep":
            scores = []
            for run in mine:
                weight = float(run.name.rsplit("_w", 1)[1])
                ap = last_eval_of(run_records(cfg.run_dir(run.name)))["AP"]
                scores.append((ap, -weight, weight))
            best = max(scores)
            evidence = ", ".join(f"w{w:g}: {ap:.2f} AP" for ap, _, w in sorted(scores, key=lambda s: s[2]))
            picked[method] = {"weight": best[2], "evidence": evidence}
        else:
            ratio = loss_ratio(run_records(cfg.run_dir(mine[0].name)), 1.0)
            weight = matched_weight(ratio, fraction)
            picked[method] = {
                "weight": weight,
                "evidence": f"detection / distillation loss at weight 1: {ratio:.3g}; "
                f"x {fraction:g} -> {fraction * ratio:.3g} -> {weight:g}",
            }
    return picked


def calibration_text(mode: str, picked: dict, epochs: int, seed: int, fraction: float) -> str:
    if not picked:
        return ""
    how = (
        "a sweep, the weight of the best val AP"
        if mode == "sweep"
        else f"the weighted distillation loss matched to {fraction:g}x the detection loss"
    )
    lines = [f"## Calibrated loss weights ({how}; seed {seed}, {epochs} epochs)", ""]
    lines += [f"- {m}: weight {p['weight']:g} ({p['evidence']})" for m, p in picked.items()]
    return "\n".join(lines) + "\n"
