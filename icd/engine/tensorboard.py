"""TensorBoard event files beside ``metrics.jsonl`` (``icd train --tensorboard``, ``icd pretrain
--tensorboard``); ``metrics.jsonl`` stays the record, TensorBoard is a view of it.

Every line written to ``metrics.jsonl`` is also written to ``OUTPUT_DIR/events.out.tfevents.*``:
each number of the line as a scalar named ``{type}/{key}`` at step ``iter`` (``train/loss``,
``train/loss_distill``, ``train/lr``, ``eval/AP``, ``eval/lift_P3``, ``pretrain/loss_aux_conf``,
``attention/distinctness``, ...: the keys of metrics.jsonl, grouped by the line's type), and each
health finding as text under ``health``. A resumed run discards the events the interrupted one
wrote after its checkpoint (``purge_step``), as metrics.jsonl's readers keep the last line per
iteration. Needs the ``tensorboard`` package (the ``tensorboard`` extra); view with
``tensorboard --logdir OUTPUT_DIR``.
"""

from __future__ import annotations

import math
from typing import Any

from icd.errors import ConfigError

EVENT_FILE_PATTERN = "events.out.tfevents.*"
_NOT_SCALARS = ("type", "iter", "time")


def tensorboard_missing() -> str | None:
    """Why ``--tensorboard`` cannot work here (the package is not installed); None when it can."""
    import importlib.util

    if importlib.util.find_spec("tensorboard") is None:
        return (
            "--tensorboard: needs the tensorboard package: run pip install --no-build-isolation "
            '".[tensorboard]" in the icd checkout (or leave --tensorboard out: metrics.jsonl has every value)'
        )
    return None


class TensorBoardLog:
    """Writes metrics.jsonl records as TensorBoard scalars (see the module docstring); rank 0 only.

    Args:
        log_dir: the run's output folder.
        purge_step: a resumed run's first iteration: events of an earlier run at this step or later
            are discarded by TensorBoard (None for a new run).
    """

    def __init__(self, log_dir: str, purge_step: int | None = None) -> None:
        problem = tensorboard_missing()
        if problem is not None:
            raise ConfigError(problem)  # already "<where>: <what>"
        from torch.utils.tensorboard import SummaryWriter

        self.writer = SummaryWriter(log_dir=log_dir, purge_step=purge_step)

    def write(self, record: dict[str, Any]) -> None:
        """One metrics.jsonl record; a record without ``type`` and ``iter`` is not a curve point."""
        kind, step = record.get("type"), record.get("iter")
        if kind is None or not isinstance(step, int):
            return
        if kind == "health":
            text = f"{record.get('loss')}: {record.get('problem')} (value {record.get('value')})"
            self.writer.add_text("health", text, step)
            return
        for key, value in record.items():
            if key in _NOT_SCALARS or isinstance(value, bool) or not isinstance(value, (int, float)):
                continue
            if math.isfinite(value):
                self.writer.add_scalar(f"{kind}/{key}", value, step)
        self.writer.flush()

    def close(self) -> None:
        self.writer.close()
