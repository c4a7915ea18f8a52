"""The training loop's periodic work as small hooks: health check, metrics lines, checkpoints, evaluation.

``Trainer.train`` calls each hook, in the order of ``Trainer.hooks``:

- ``after_step(trainer)`` after every optimiser step (``trainer.iteration`` steps done);
- ``after_losses(trainer, iteration, record)`` for each step's losses once they are read from the
  device (``record``: this rank's loss values of step ``iteration`` as floats), in step order: every
  --print-freq steps, at the run's last step, and before a checkpoint is written, so that no step
  waits for the GPU to report its losses;
- ``after_epoch(trainer, end)`` when an epoch's batches are used up, or when the run stops
  part-way through one (``end`` says which; the checkpoint hook puts what it wrote in
  ``end.saved`` for the evaluation hook's model_best.pth).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from icd.engine.distributed import DistInfo
from icd.engine.health import LossHealth, UnhealthyTrainingError

if TYPE_CHECKING:
    from icd.engine.trainer import Trainer

log = logging.getLogger("icd.train")


@dataclass
class EpochEnd:
    """Where an epoch ended: ``batches`` of epoch ``epoch`` drawn; ``finished``: all of them
    (else the run stopped part-way); ``run_over``: the end of the whole schedule."""

    epoch: int
    batches: int
    finished: bool
    run_over: bool
    evaluate: bool = False  # an evaluation follows (the checkpoint records it as pending)
    saved: dict | None = None  # the checkpoint written at this end (rank 0)


class Hook:
    """Periodic work of the training loop; both methods do nothing unless overridden."""

    def after_step(self, trainer: Trainer) -> None:
        pass

    def after_losses(self, trainer: Trainer, iteration: int, record: dict[str, float]) -> None:
        pass

    def after_epoch(self, trainer: Trainer, end: EpochEnd) -> None:
        pass

    def evaluates(self, end: EpochEnd) -> bool:
        """Whether this hook evaluates at ``end`` (asked before any after_epoch)."""
        return False


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

    def after_losses(self, trainer: Trainer, iteration: int, record: dict[str, float]) -> None:
        for problem in self.health.check(iteration, record):
            trainer.metrics.write({"type": "health", "iter": problem.iteration, "loss": problem.loss,
                                   "problem": problem.kind, "value": problem.value})
            where = f"rank {trainer.info.rank}: " if trainer.info.distributed else ""
            if self.stop:
                raise UnhealthyTrainingError(f"{where}{problem.message} (--on-unhealthy stop)")
            log.warning("%s%s", where, problem.message)


class TrainMetrics(Hook):
    """A "train" line in metrics.jsonl (losses averaged over the ranks) every ``every``
    iterations and at iteration ``last`` (where the run stops); its loss on the progress bar."""

    def __init__(self, every: int, last: int) -> None:
        self.every, self.last = every, last

    def after_losses(self, trainer: Trainer, iteration: int, record: dict[str, float]) -> None:
        if iteration % self.every != 0 and iteration != self.last:
            return
        record = average_across_ranks(record, trainer.info)
        record.update(
            type="train",
            iter=iteration,
            epoch=trainer.batches.epoch,
            lr=trainer.optimizer.param_groups[0]["lr"],
            sec_per_iter=trainer.batches.seconds_per_batch(),
        )
        trainer.metrics.write(record)
        trainer.batches.show(loss=f"{record['loss']:.4f}")


class PeriodicCheckpoint(Hook):
    """checkpoint.pth every ``every`` iterations (0: only at epoch ends) and at each epoch's end
    or stop; at the end of every ``epoch_file_every``-th epoch also model_{epoch}.pth (0: never)."""

    def __init__(self, every: int, epoch_file_every: int) -> None:
        self.every, self.epoch_file_every = every, epoch_file_every

    def after_step(self, trainer: Trainer) -> None:
        if self.every and trainer.iteration % self.every == 0:
            trainer.save(trainer.batches.epoch, trainer.batches.position)

    def after_epoch(self, trainer: Trainer, end: EpochEnd) -> None:
        due = end.epoch if end.evaluate else None
        if end.finished:  # the next run goes on with the next epoch
            epoch_file = bool(self.epoch_file_every) and (end.epoch + 1) % self.epoch_file_every == 0
            end.saved = trainer.save(end.epoch + 1, 0, also_epoch_file=epoch_file, evaluation_due=due)
        else:
            end.saved = trainer.save(end.epoch, end.batches, evaluation_due=due)


class PeriodicEvaluation(Hook):
    """Evaluate after every ``every``-th epoch (0: never) and at the end of the schedule (not at a
    --stop-after-iters stop before it)."""

    def __init__(self, every: int) -> None:
        self.every = every

    def evaluates(self, end: EpochEnd) -> bool:
        periodic = end.finished and self.every and (end.epoch + 1) % self.every == 0
        return bool(end.run_over or periodic)

    def after_epoch(self, trainer: Trainer, end: EpochEnd) -> None:
        if self.evaluates(end):
            trainer.run_evaluation(end.epoch, end.saved)
