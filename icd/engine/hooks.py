"""The periodic work of ``icd train``'s loop as small hooks: health check, metrics lines,
checkpoints, evaluation.

:class:`Hook` and :class:`EpochEnd` are defined in ``icd.engine.loop`` (which calls the hooks:
when each method runs is said there) and exported here too: subclass ``Hook`` for work of your
own and give it to ``Trainer(args, hooks=[...])`` / ``Pretrainer(args, hooks=[...])`` or their
``register_hook``. ``icd pretrain``'s own hooks are in ``icd.engine.pretrain``.
"""

from __future__ import annotations

import logging

import torch

from icd.engine.distributed import DistInfo
from icd.engine.health import LossHealth, UnhealthyTrainingError
from icd.engine.loop import EpochEnd, Hook, Loop

__all__ = [
    "EpochEnd",
    "HealthCheck",
    "Hook",
    "PeriodicCheckpoint",
    "PeriodicEvaluation",
    "TrainMetrics",
    "average_across_ranks",
]

log = logging.getLogger("icd.train")


def average_across_ranks(record: dict[str, float], info: DistInfo) -> dict[str, float]:
    """The mean of each value over the ranks (what the whole batch's loss is)."""
    if not info.distributed:
        return record
    keys = sorted(record)
    values = torch.tensor([record[k] for k in keys], dtype=torch.float64, device=info.device)
    torch.distributed.all_reduce(values)
    return {k: float(v) / info.world_size for k, v in zip(keys, values.tolist(), strict=True)}


class HealthCheck(Hook):
    """Warn (once per loss and problem) about stuck or blowing-up losses of this rank, or stop
    under ``stop``; reads only the records' floats (no device synchronisation of its own), so it
    speaks when they are read, up to --print-freq steps later. Under torchrun a stopping rank ends
    the whole job, as any rank's error does."""

    def __init__(self, window: int, stop: bool) -> None:
        self.health = LossHealth(window)
        self.stop = stop

    def after_losses(self, loop: Loop, iteration: int, record: dict[str, float]) -> None:
        for problem in self.health.check(iteration, record):
            loop.metrics.write({"type": "health", "iter": problem.iteration, "loss": problem.loss,
                                   "problem": problem.kind, "value": problem.value})
            where = f"rank {loop.info.rank}: " if loop.info.distributed else ""
            if self.stop:
                raise UnhealthyTrainingError(f"{where}{problem.message} (--on-unhealthy stop)")
            log.warning("%s%s", where, problem.message)


class TrainMetrics(Hook):
    """A "train" line in metrics.jsonl (losses averaged over the ranks) every ``every``
    iterations and at iteration ``last`` (where the run stops); its loss on the progress bar."""

    def __init__(self, every: int, last: int) -> None:
        self.every, self.last = every, last

    def after_losses(self, loop: Loop, iteration: int, record: dict[str, float]) -> None:
        if iteration % self.every != 0 and iteration != self.last:
            return
        record = average_across_ranks(record, loop.info)
        record.update(
            type="train",
            iter=iteration,
            epoch=loop.batches.epoch,
            lr=loop.optimizer.param_groups[0]["lr"],
            sec_per_iter=loop.batches.seconds_per_batch(),
        )
        loop.metrics.write(record)
        loop.batches.show(loss=f"{record['loss']:.4f}")


class PeriodicCheckpoint(Hook):
    """checkpoint.pth every ``every`` iterations (0: only at epoch ends) and at each epoch's end
    or stop; at the end of every ``epoch_file_every``-th epoch also model_{epoch}.pth (0: never)."""

    def __init__(self, every: int, epoch_file_every: int) -> None:
        self.every, self.epoch_file_every = every, epoch_file_every

    def after_step(self, loop: Loop) -> None:
        if self.every and loop.iteration % self.every == 0:
            loop.save(loop.batches.epoch, loop.batches.position)

    def after_epoch(self, loop: Loop, end: EpochEnd) -> None:
        due = end.epoch if end.evaluate else None
        if end.finished:  # the next run goes on with the next epoch
            epoch_file = bool(self.epoch_file_every) and (end.epoch + 1) % self.epoch_file_every == 0
            end.saved = loop.save(end.epoch + 1, 0, also_epoch_file=epoch_file, evaluation_due=due)
        else:
            end.saved = loop.save(end.epoch, end.batches, evaluation_due=due)


class PeriodicEvaluation(Hook):
    """Evaluate after every ``every``-th epoch (0: never) and at the end of the schedule (not at a
    --stop-after-iters stop before it)."""

    def __init__(self, every: int) -> None:
        self.every = every

    def evaluates(self, end: EpochEnd) -> bool:
        periodic = end.finished and self.every and (end.epoch + 1) % self.every == 0
        return bool(end.run_over or periodic)

    def after_epoch(self, loop: Loop, end: EpochEnd) -> None:
        if self.evaluates(end):
            loop.run_evaluation(end.epoch, end.saved)
