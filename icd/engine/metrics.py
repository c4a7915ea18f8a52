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

from icd.errors import DataFileError, OutputDirError

METRICS_FILE = "metrics.jsonl"
# what `icd plot --out` writes (matplotlib's formats that are pictures a user opens)
PLOT_SUFFIXES = (".png", ".jpg", ".jpeg", ".svg", ".pdf")


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
        try:
            with open(self.path, "a") as f:
                f.write(json.dumps(record) + "\n")
                f.flush()
        except OSError as err:  # a full disk, a file-size limit: one line, not a traceback
            raise OutputDirError(self.path, f"could not be written ({err.strerror or err})") from None


def read_metrics(run_dir: str) -> list[dict]:
    """The records of a run: JSON objects with an ``iter``; a line that is not one (a truncated
    last line of a killed run, a foreign line) is skipped, and a file with none is a DataFileError."""
    path = os.path.join(run_dir, METRICS_FILE)
    if not os.path.isfile(path):
        raise DataFileError(run_dir, f"no {METRICS_FILE} (not the output folder of an icd run)")
    records = []
    with open(path, encoding="utf-8", errors="replace") as f:
        for line in f:
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                continue
            if isinstance(record, dict) and isinstance(record.get("iter"), (int, float)):
                records.append(record)
    if not records and os.path.getsize(path):
        raise DataFileError(path, "no line is a JSON object with an 'iter'; not the metrics of an icd run")
    return records


def _last_per_iter(records: list[dict]) -> list[dict]:
    """A resumed run re-logs iterations after its checkpoint: keep the last record per iteration."""
    by_iter = {}
    for r in records:
        by_iter[r["iter"]] = r
    return [by_iter[k] for k in sorted(by_iter)]


def _number(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


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
            points = [(r["iter"], r["loss"]) for r in train if _number(r.get("loss"))]
            line = ax_total.plot(*zip(*points, strict=True), label=name)[0] if points else None
            keys = sorted({k for r in train for k in r if k.startswith("loss_")})
            for key, style in zip(keys, ("-", "--", ":", "-.") * 3, strict=False):
                pts = [(r["iter"], r[key]) for r in train if _number(r.get(key))]
                if pts:
                    ax_parts.plot(*zip(*pts, strict=True), linestyle=style,
                                  color=line.get_color() if line else None, label=f"{name} {key[5:]}")  # fmt: skip
        evals = _last_per_iter([r for r in records if r.get("type") == "eval"])
        colour = None  # the run's colour, taken from its first curve
        for key, style, label in (("AP", "-o", "AP"), ("AP50", "--s", "AP50"), ("segm_AP", ":^", "mask AP")):
            points = [(r["iter"], r[key]) for r in evals if _number(r.get(key))]  # segm_AP: Mask R-CNN runs only
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
