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
from collections.abc import Callable, Sequence

from icd.errors import DataFileError, OutputDirError

METRICS_FILE = "metrics.jsonl"
# what `icd plot --out` writes (matplotlib's formats that are pictures a user opens)
PLOT_SUFFIXES = (".png", ".jpg", ".jpeg", ".svg", ".pdf")


class MetricsLog:
    """Appends JSON lines; a no-op on ranks other than 0 (``enabled=False``). ``sinks``: callables that
    get every record written too (``icd.engine.tensorboard.TensorBoardLog.write``)."""

    def __init__(self, output_dir: str, enabled: bool = True) -> None:
        self.path = os.path.join(output_dir, METRICS_FILE)
        self.enabled = enabled
        self.sinks: list[Callable[[dict], None]] = []
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
        for sink in self.sinks:
            sink(record)


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


# one dash pattern per loss within a panel (the colour is the run's); "total" always gets the first
LOSS_DASHES = ("-", "--", ":", "-.", (0, (5, 1, 1, 1, 1, 1)), (0, (1, 3)), (0, (8, 2)), (0, (3, 1, 1, 1)))
AP_CURVES = (("AP", "-", "o", "AP"), ("AP50", "--", "s", "AP50"), ("segm_AP", ":", "^", "mask AP"))


def distillation_loss_keys() -> tuple[str, ...]:
    """The metrics.jsonl keys of the distillers' losses (ICD: distill, aux_conf, aux_reg; FPN-MSE:
    distill); every other ``loss_*`` key is a detection loss."""
    from icd.nn.distiller import LOSS_NAMES

    return tuple(f"loss_{name}" for name in LOSS_NAMES)


def _loss_curves(train: list[dict], keys: Sequence[str], total: str | None) -> dict[str, list[tuple[int, float]]]:
    """(iteration, value) points of each key in ``keys`` (values that are no finite number left out,
    and a total only where every one of its terms is), plus their sum as ``total`` when it is given
    and there are two keys or more."""
    curves = {}
    if total is not None and len(keys) > 1:
        curves[total] = [
            (r["iter"], sum(r[k] for k in keys if k in r))
            for r in train
            if all(_number(r[k]) for k in keys if k in r)
        ]
    for key in keys:
        curves[key[len("loss_"):]] = [(r["iter"], r[key]) for r in train if _number(r.get(key))]
    return {name: [(i, v) for i, v in points if math.isfinite(v)] for name, points in curves.items() if points}


def curves_figure(run_dirs: Sequence[str]):
    """The matplotlib Figure of ``icd plot``: three panels, the detection losses (their sum, "total",
    and each), the distillation losses (distill, aux_conf, aux_reg) and COCO AP / AP50 (mask AP for
    Mask R-CNN), against iterations. A colour per run, a dash pattern per loss (or AP curve), each
    panel's legend of dash patterns below it and the legend of runs above the panels, outside the data."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.lines import Line2D

    distillation = distillation_loss_keys()
    fig, (ax_det, ax_dist, ax_ap) = plt.subplots(1, 3, figsize=(16, 5.2))
    panels = {ax_det: {}, ax_dist: {}}  # panel -> loss name -> its dash pattern
    run_handles, ap_keys = [], set()
    for index, run in enumerate(run_dirs):
        colour = f"C{index % 10}"
        records = read_metrics(run)
        name = os.path.basename(os.path.normpath(run))
        run_handles.append(Line2D([], [], color=colour, linewidth=2.5, label=name))
        train = _last_per_iter([r for r in records if r.get("type") == "train"])
        losses = sorted({k for r in train for k in r if k.startswith("loss_")})
        for ax, keys, total in (
            (ax_det, [k for k in losses if k not in distillation], "total"),
            (ax_dist, [k for k in losses if k in distillation], None),
        ):
            for loss, points in _loss_curves(train, keys, total).items():
                dashes = panels[ax]
                style = dashes.setdefault(loss, LOSS_DASHES[len(dashes) % len(LOSS_DASHES)])
                ax.plot(*zip(*points, strict=True), color=colour, linestyle=style, linewidth=1.3)
        evals = _last_per_iter([r for r in records if r.get("type") == "eval"])
        for key, style, marker, _ in AP_CURVES:
            points = [(r["iter"], r[key]) for r in evals if _number(r.get(key))]  # segm_AP: Mask R-CNN runs only
            if points:
                ap_keys.add(key)
                ax_ap.plot(*zip(*points, strict=True), color=colour, linestyle=style, marker=marker, markersize=4)
    styles = {
        ax_det: [(loss, style, None) for loss, style in panels[ax_det].items()],
        ax_dist: [(loss, style, None) for loss, style in panels[ax_dist].items()],
        ax_ap: [(label, style, marker) for key, style, marker, label in AP_CURVES if key in ap_keys],
    }
    for ax, title, ylabel, empty in (
        (ax_det, "detection losses (total: their sum)", "loss", "no training records"),
        (ax_dist, "distillation losses", "loss", "no distillation losses (no --teacher)"),
        (ax_ap, "COCO AP (box; mask for Mask R-CNN)", "AP (%)", "no evaluation"),
    ):
        ax.set_title(title)
        ax.set_xlabel("iteration")
        ax.set_ylabel(ylabel)
        ax.grid(alpha=0.3)
        if not ax.has_data():
            ax.text(0.5, 0.5, empty, transform=ax.transAxes, ha="center", va="center", color="grey")
            continue
        if ax is not ax_ap:
            ax.set_yscale("log")
        handles = [
            Line2D([], [], color="black", linestyle=style, marker=marker, markersize=4, label=label)
            for label, style, marker in styles[ax]
        ]
        ax.legend(handles=handles, loc="upper center", bbox_to_anchor=(0.5, -0.14), ncol=3, fontsize=8, frameon=False)
    fig.legend(handles=run_handles, loc="upper center", ncol=min(len(run_handles), 6), fontsize=9, frameon=False)
    fig.tight_layout(rect=(0, 0, 1, 0.93))
    return fig


def plot_runs(run_dirs: Sequence[str], out_path: str) -> str:
    """``curves_figure`` of the runs written as a PNG at ``out_path``; returns the path."""
    import matplotlib.pyplot as plt

    fig = curves_figure(run_dirs)
    os.makedirs(os.path.dirname(os.path.abspath(out_path)), exist_ok=True)
    fig.savefig(out_path, dpi=100, bbox_inches="tight")
    plt.close(fig)
    return out_path
