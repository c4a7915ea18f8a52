"""Run records: one JSON object per line in ``OUTPUT_DIR/metrics.jsonl``, and their plots.

Training lines: {"type": "train", "iter", "epoch", "lr", "loss", <each named loss>, "sec_per_iter", "time"}.
Evaluation lines: {"type": "eval", "iter", "epoch", "AP", "AP50", ..., "time"}.
Health lines: {"type": "health", "iter", "loss", "problem", "value", "time"} (icd.engine.hooks.HealthCheck;
``icd pretrain`` writes one with "loss": "attention", "problem": "shared" when its kept teacher side
does not single instances out).
"""

from __future__ import annotations

import json
import math
import os
import time
from collections.abc import Sequence

METRICS_FILE = "metrics.jsonl"


class MetricsLog:
    """Appends JSON lines; a no-op on ranks other than 0 (``enabled=False``)."""

    def __init__(self, output_dir: str, enabled: bool = True) -> None:
        self.path = os.path.join(output_dir, METRICS_FILE)
        self.enabled = enabled
        if enabled:
            os.makedirs(output_dir, exist_ok=True)

    def write(self, record: dict) -> None:
        if not self.enabled:
            return
        record = {**record, "time": round(time.time(), 3)}
        with open(self.path, "a") as f:
            f.write(json.dumps(record) + "\n")
            f.flush()


def read_metrics(run_dir: str) -> list[dict]:
    """The records of a run; a truncated last line (a killed run) is skipped."""
    path = os.path.join(run_dir, METRICS_FILE)
    records = []
    with open(path) as f:
        for line in f:
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError:
                continue
    return records


def _last_per_iter(records: list[dict]) -> list[dict]:
    """A resumed run re-logs iterations after its checkpoint: keep the last record per iteration."""
    by_iter = {}
    for r in records:
        by_iter[r["iter"]] = r
    return [by_iter[k] for k in sorted(by_iter)]


def plot_runs(run_dirs: Sequence[str], out_path: str) -> str:
    """Total loss, each named loss, and AP / AP50 (and mask AP) against iterations for the runs, as one PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_total, ax_parts, ax_ap) = plt.subplots(1, 3, figsize=(16, 4.5))
    for run in run_dirs:
        records = read_metrics(run)
        name = os.path.basename(os.path.normpath(run))
        train = _last_per_iter([r for r in records if r.get("type") == "train"])
        if train:
            line = ax_total.plot(
                [r["iter"] for r in train], [r["loss"] for r in train], label=name
            )[0]
            keys = sorted({k for r in train for k in r if k.startswith("loss_")})
            for key, style in zip(keys, ("-", "--", ":", "-.") * 3, strict=False):
                pts = [(r["iter"], r[key]) for r in train if key in r and math.isfinite(r[key])]
                ax_parts.plot(
                    *zip(*pts, strict=True),
                    linestyle=style,
                    color=line.get_color(),
                    label=f"{name} {key[5:]}",
                )
        evals = _last_per_iter([r for r in records if r.get("type") == "eval"])
        colour = None  # the run's colour, taken from its first curve
        for key, style, label in (("AP", "-o", "AP"), ("AP50", "--s", "AP50"), ("segm_AP", ":^", "mask AP")):
            points = [(r["iter"], r[key]) for r in evals if key in r]  # segm_AP: Mask R-CNN runs only
            if points:
                line = ax_ap.plot(*zip(*points, strict=True), style, color=colour, label=f"{name} {label}")[0]
                colour = line.get_color()
    for ax, title, ylabel in (
        (ax_total, "total training loss", "loss"),
        (ax_parts, "named losses", "loss"),
        (ax_ap, "COCO AP (box; mask for Mask R-CNN)", "AP (%)"),
    ):
        ax.set_title(title)
        ax.set_xlabel("iteration")
        ax.set_ylabel(ylabel)
        ax.grid(alpha=0.3)
        if ax.has_data():
            ax.legend(fontsize=7)
    for ax in (ax_total, ax_parts):
        if ax.has_data():
            ax.set_yscale("log")
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(out_path)), exist_ok=True)
    fig.savefig(out_path, dpi=100)
    plt.close(fig)
    return out_path
