"""The one training loop of icd: optimiser steps over the epochs' batches, the periodic work as
hooks, atomic checkpoints, the non-finite guard, Ctrl-C as a clean stop.

``icd train`` (``icd.engine.trainer.Trainer``: a detector, optionally distilled) and ``icd
pretrain`` (``icd.engine.pretrain.Pretrainer``: ICD's teacher side alone) are two step strategies
on this loop: each subclass of :class:`Loop` builds its models, data and optimisers and says what
one step is (``step``), what its checkpoint holds (``state``) and which hooks it runs
(``default_hooks``). Everything else, resume position, metrics.jsonl and TensorBoard, the losses
kept on the device until they are read, the refusal to checkpoint a NaN, the progress bars and
Ctrl-C, is written once, here.

The hooks, in the order of :attr:`Loop.hooks` (the strategy's own, then those registered with
``hooks=`` or :meth:`Loop.register_hook`, in the order given):

- ``after_step(loop)`` after every optimiser step (``loop.iteration`` steps done);
- ``after_losses(loop, iteration, record)`` for each step's losses once they are read from the
  device (``record``: this rank's loss values of step ``iteration`` as floats, ``"loss"`` their
  sum), in step order: every --print-freq steps, at the run's last step, and before a checkpoint
  is written, so that no step waits for the GPU to report its losses;
- ``after_epoch(loop, end)`` when an epoch's batches are used up, or when the run stops
  part-way through one (``end`` says which; the checkpoint hook puts what it wrote in
  ``end.saved`` for the evaluation hook's model_best.pth).

This module imports nothing of ``trainer``, ``pretrain`` or ``hooks`` (which import it), so the
engine's modules import each other in one direction only (tests/test_engine_loop.py checks it).
"""

from __future__ import annotations

import logging
import math
import os
from collections.abc import Iterable
from dataclasses import dataclass

import torch

from icd.engine.batches import EpochBatches
from icd.engine.checkpoint import save_atomic
from icd.engine.distributed import DistInfo, all_ranks, barrier
from icd.engine.finite import all_finite, first_non_finite, loss_report, nested_tensors
from icd.engine.interrupt import StopRequest
from icd.engine.metrics import MetricsLog
from icd.engine.output_dir import remove_previous_run
from icd.engine.run_config import RunConfig
from icd.errors import ArgumentError, InterruptedRun, NonFiniteError, NothingDoneError

log = logging.getLogger("icd.train")

LAST_CHECKPOINT = "checkpoint.pth"


@dataclass
class EpochEnd:
    """Where an epoch ended: ``batches`` of epoch ``epoch`` drawn; ``finished``: all of them
    (else the run stopped part-way); ``run_over``: the end of the whole schedule; ``stopped``: this
    run's loop ends here (the schedule's end, --stop-after-iters or Ctrl-C)."""

    epoch: int
    batches: int
    finished: bool
    run_over: bool
    evaluate: bool = False  # an evaluation follows (the checkpoint records it as pending)
    saved: dict | None = None  # the checkpoint written at this end (rank 0)
    stopped: bool = False


class Hook:
    """Periodic work of the training loop; every method does nothing unless overridden.

    A hook of your own: subclass it, override what you need, and give it to the loop before
    ``run()``::

        class PrintLr(Hook):
            def after_step(self, loop):
                if loop.iteration % 100 == 0:
                    print(loop.iteration, loop.optimizer.param_groups[0]["lr"])

        trainer = Trainer(args, hooks=[PrintLr()])   # or trainer.register_hook(PrintLr())
        trainer.run()

    A hook must not read a tensor's value on the host in ``after_step`` (a synchronisation per
    step on a GPU): read loss values in ``after_losses``.
    """

    def after_step(self, loop: Loop) -> None:
        pass

    def after_losses(self, loop: Loop, iteration: int, record: dict[str, float]) -> None:
        pass

    def after_epoch(self, loop: Loop, end: EpochEnd) -> None:
        pass

    def evaluates(self, end: EpochEnd) -> bool:
        """Whether this hook evaluates at ``end`` (asked before any after_epoch)."""
        return False


@dataclass
class PendingStep:
    """One optimiser step's losses, kept on the device until they are read (``Loop.read_losses``).

    ``values``: float32 [len(names) + 1], each named loss then their sum; ``params_finite``: 0-dim
    bool, the parameters before this step had no NaN or inf (None: not known); ``teacher_peak``:
    0-dim, the largest magnitude of the teacher's FPN maps of this batch (None without a teacher).
    """

    iteration: int  # the step's number: ``Loop.iteration`` once it is done
    names: tuple[str, ...]
    values: torch.Tensor
    params_finite: torch.Tensor | None
    teacher_peak: torch.Tensor | None


def loss_key(name: str) -> str:
    """A loss's name in records and metrics: loss_<name> (names that start with loss_ kept)."""
    return name if name.startswith("loss_") else f"loss_{name}"


def refuse_non_finite(ckpt: dict, iteration: int) -> None:
    """NonFiniteError instead of writing a checkpoint with a NaN or inf tensor in it."""
    bad = first_non_finite(nested_tensors({k: v for k, v in ckpt.items() if k != "rng"}))
    if bad is not None:
        raise NonFiniteError(
            f"iteration {iteration}: {bad} is non-finite (NaN or inf); the checkpoint was not written"
        )


class Loop:
    """The loop over optimiser steps; subclasses are its step strategies.

    A subclass sets, while it builds itself: ``config`` (its RunConfig, built once from the
    command's flags: the loop reads ``config.loop``), ``info`` (DistInfo), ``batches``
    (EpochBatches), ``optimizer`` (its first param group's lr is the one reported),
    ``trained_params`` (checked for NaN after every step), ``total_iters`` and ``num_epochs``
    (the schedule), ``metrics`` (MetricsLog), ``train_annotations`` (named when every image was
    skipped) and ``overwritten`` (the previous run's files --overwrite removes), and provides
    ``step``, ``state`` and ``default_hooks``; ``before_train`` and ``after_train`` are optional.
    """

    config: RunConfig
    info: DistInfo
    batches: EpochBatches
    optimizer: torch.optim.Optimizer
    trained_params: list[torch.Tensor]
    total_iters: int
    num_epochs: int | float  # math.inf: epochs until total_iters steps (icd pretrain)
    metrics: MetricsLog
    train_annotations: object
    overwritten: list[str]
    diverging = "training"  # what a non-finite loss says diverged ("the student" for icd train)

    def __init__(self, hooks: Iterable[Hook] = ()) -> None:
        self._user_hooks: list[Hook] = []
        for hook in hooks:
            self.register_hook(hook)
        self.hooks: list[Hook] = []  # the strategy's hooks then the registered ones, set by run()
        self.iteration = 0  # optimiser steps done
        self.stop = StopRequest(enabled=False)  # run() installs the Ctrl-C handler
        self.tensorboard = None  # icd.engine.tensorboard.TensorBoardLog under --tensorboard, from run()
        self.saved_iteration: int | None = None  # the iteration of the last checkpoint.pth written
        self._pending: list[PendingStep] = []  # steps whose losses are still on the device
        self._params_finite: torch.Tensor | None = None  # on the device, read at the next loss check

    # -- what a step strategy provides ---------------------------------------------------------
    def step(self, images: list[torch.Tensor], targets: list[dict]) -> None:
        """One optimiser step on a batch; its losses go to :meth:`record_step`, unread."""
        raise NotImplementedError

    def state(self, epoch: int, epoch_batches: int) -> dict:
        """The checkpoint of this moment: continue with batch ``epoch_batches`` of ``epoch``."""
        raise NotImplementedError

    def default_hooks(self, stop_at: int) -> list[Hook]:
        """The strategy's own periodic work for a run that stops at iteration ``stop_at``."""
        return []

    def before_train(self) -> bool:
        """Work before the first step (an evaluation left pending, the curve's start); True when it
        evaluated (a run that then trains nothing is not an error)."""
        return False

    def after_train(self, start_iter: int, evaluated: bool) -> dict[str, float]:
        """What ``run()`` returns, after the loop stopped normally."""
        return {}

    def run_evaluation(self, epoch: int, saved: dict | None = None) -> dict[str, float]:
        """Evaluate on the val split after ``epoch`` (``saved``: the checkpoint of this state);
        for strategies whose hooks evaluate at epoch ends (``icd train``'s PeriodicEvaluation)."""
        raise NotImplementedError(f"{type(self).__name__} has no evaluation at epoch ends")

    def train_mode(self) -> None:
        """Put the trained modules in training mode (``train`` starts with it)."""

    # -- hooks ---------------------------------------------------------------------------------
    def register_hook(self, hook: Hook) -> None:
        """Add ``hook`` after the strategy's hooks and those registered before it (before ``run()``)."""
        if not isinstance(hook, Hook):
            raise ArgumentError(
                "register_hook: hook", f"{type(hook).__name__} is no icd.engine.hooks.Hook; subclass Hook"
            )
        self._user_hooks.append(hook)

    # -- losses on the device ------------------------------------------------------------------
    def record_step(
        self, losses: dict[str, torch.Tensor], total: torch.Tensor, teacher_peak: torch.Tensor | None = None
    ) -> None:
        """Count a step done whose ``losses`` (and their sum ``total``) stay on the device until
        read; flags the parameters it left (read with the next step's losses)."""
        names = tuple(loss_key(k) for k in losses)
        values = torch.stack([v.detach().float() for v in losses.values()] + [total.detach().float()])
        self._pending.append(PendingStep(self.iteration + 1, names, values, self._params_finite, teacher_peak))
        self._params_finite = all_finite(self.trained_params)
        self.iteration += 1

    def read_losses(self) -> list[tuple[int, dict[str, float]]]:
        """The losses of the steps since the last read, as (iteration, {name: value}) in step order:
        one copy to the host for all of them (the one synchronisation). Raises NonFiniteError for
        the first step whose losses, or the parameters it started from, are not finite, and when
        the last step left a non-finite parameter; up to --print-freq steps after the fact, so a
        run stops a few steps late, but before any checkpoint of them is written (``save`` reads
        them first)."""
        pending, self._pending = self._pending, []
        if not pending:
            return []
        unknown = torch.ones((), dtype=torch.bool, device=pending[0].values.device)
        parts = []
        for p in pending:
            flag = p.params_finite if p.params_finite is not None else unknown
            peak = p.teacher_peak if p.teacher_peak is not None else unknown.float()
            parts += [p.values.float(), flag.reshape(1).float(), peak.reshape(1).float()]
        last = self._params_finite if self._params_finite is not None else unknown
        parts.append(last.reshape(1).float())
        host = torch.cat(parts).cpu().tolist()
        out, at = [], 0
        for p in pending:
            n = len(p.names)
            values, params_ok, peak = host[at : at + n + 1], host[at + n + 1] > 0, host[at + n + 2]
            at += n + 3
            record = dict(zip((*p.names, "loss"), values, strict=True))
            if not params_ok:
                raise self._non_finite_error(p.iteration, record, False, None)
            if not math.isfinite(values[-1]):
                fault = self._teacher_fault(peak) if p.teacher_peak is not None else None
                raise self._non_finite_error(p.iteration, record, True, fault)
            out.append((p.iteration, record))
        if not host[at] > 0:  # the last step's optimiser update
            raise self._non_finite_error(pending[-1].iteration + 1, out[-1][1], False, None)
        return out

    def deliver_losses(self) -> None:
        """Read the pending steps' losses (``read_losses``) and hand each to the hooks' after_losses."""
        for iteration, record in self.read_losses():
            for hook in self.hooks:
                hook.after_losses(self, iteration, dict(record))  # its own copy: a hook may add to it

    def _named_checked_parameters(self) -> list[tuple[str, torch.Tensor]]:
        """The trained parameters by name, for the report of a non-finite one."""
        return [(f"trained parameter {i}", p) for i, p in enumerate(self.trained_params)]

    def _non_finite_error(
        self, iteration: int, record: dict[str, float], params_finite: bool, teacher_fault: str | None
    ) -> NonFiniteError:
        """The error of step ``iteration`` whose losses (``record``) or prior parameters are not
        finite (a failure path: it reads the parameters on the host)."""
        if not params_finite:
            bad = first_non_finite(self._named_checked_parameters()) or "a parameter"
            return NonFiniteError(
                f"iteration {iteration - 1}: the optimiser step made {bad} non-finite (NaN or inf) "
                f"with finite losses; stopped before checkpointing it. Lower --lr ({self._lr_text()})"
            )
        losses = {k: torch.tensor(v) for k, v in record.items() if k != "loss"}
        message = f"non-finite loss at iteration {iteration}: {loss_report(losses)}"
        if teacher_fault is not None:
            message += f"; {teacher_fault}"
        else:
            message += f"; {self.diverging} diverged or the batch is bad: lower --lr ({self._lr_text()})"
        return NonFiniteError(message + "; nothing non-finite was checkpointed")

    def _teacher_fault(self, peak: float) -> str | None:
        """The teacher's share of the blame for a non-finite loss (none without a teacher)."""
        return None

    def _lr_text(self) -> str:
        return f"now {self.optimizer.param_groups[0]['lr']:.3g}"

    # -- checkpoints ---------------------------------------------------------------------------
    def save(
        self, epoch: int, epoch_batches: int, also_epoch_file: bool = False, evaluation_due: int | None = None
    ) -> dict | None:
        """Write model_{epoch-1}.pth, then checkpoint.pth, on rank 0; returns what was written.

        The epoch file goes first: a run killed between the two resumes from the checkpoint
        before, redoes this epoch's end and writes it again. ``evaluation_due``: the epoch whose
        evaluation follows; recorded as ``pending_evaluation`` until it is done, so that a run
        killed during it evaluates on --resume.
        """
        self.deliver_losses()  # every rank: its steps' losses checked (and logged) before they are saved
        if not self.info.is_main:
            return None
        ckpt = self.state(epoch, epoch_batches)
        ckpt["config"] = self.config.to_dict()
        if evaluation_due is not None:
            ckpt["pending_evaluation"] = evaluation_due
        refuse_non_finite(ckpt, self.iteration)
        if also_epoch_file:
            save_atomic(ckpt, os.path.join(self.config.loop.output_dir, f"model_{epoch - 1}.pth"))
        save_atomic(ckpt, os.path.join(self.config.loop.output_dir, LAST_CHECKPOINT))
        self.saved_iteration = self.iteration
        return ckpt

    # -- the run -------------------------------------------------------------------------------
    def stop_at(self) -> int:
        """The iteration this run stops at: the schedule's end, or --stop-after-iters before it."""
        return min(self.total_iters, self.config.loop.stop_after_iters or self.total_iters)

    def run(self) -> dict[str, float]:
        """Train to the end of the schedule (or --stop-after-iters), running the hooks; returns
        ``after_train``'s result (``icd train``: the last evaluation's metrics)."""
        settings = self.config.loop
        stop_at = self.stop_at()
        if self.overwritten and self.info.is_main:
            log.warning("--overwrite: removing the previous run's %s", ", ".join(self.overwritten))
            remove_previous_run(self.overwritten)
        if settings.tensorboard and self.info.is_main:  # after the removal: its files are new
            from icd.engine.tensorboard import TensorBoardLog

            purge = self.iteration + 1 if settings.resume else None
            self.tensorboard = TensorBoardLog(settings.output_dir, purge_step=purge)
            self.metrics.sinks.append(self.tensorboard.write)
        self.hooks = [*self.default_hooks(stop_at), *self._user_hooks]
        evaluated = self.before_train()
        start = self.iteration
        with StopRequest(enabled=not self.info.distributed) as self.stop:
            try:
                self.train(start, stop_at)
            except Exception:
                if not self.stop.requested:
                    raise
                self._interrupted(failed=True)  # e.g. the data workers, which Ctrl-C ends too
        if self.stop.requested:
            self._interrupted(failed=False)
        return self.after_train(start, evaluated)

    def train(self, start_iter: int, max_iter: int) -> None:
        """Optimiser steps ``start_iter`` + 1 .. ``max_iter``, drawing batch after batch across the
        epochs; ends earlier when the run's last epoch is used up (batches of only skipped images
        take no step). Each step runs the hooks' after_step; each epoch's end, and a stop part-way
        through one, their after_epoch."""
        data, settings = self.batches, self.config.loop
        self.iteration = start_iter
        self.train_mode()
        while self.iteration < max_iter and data.epoch < self.num_epochs:
            batch = data.next()
            if batch is None:  # this epoch's batches are used up
                self._end_epoch(start_iter, stopped=False)
                data.next_epoch()
                continue
            images, targets = batch
            # a batch whose every image was a skipped corrupt one: under DDP all ranks skip
            # the step together, or the others would wait for its gradients forever. Only
            # --on-bad-data skip empties a batch: otherwise no collective (its flag is read on
            # the host, a synchronisation per step)
            if settings.on_bad_data == "skip":
                if not all_ranks(bool(images), self.info):
                    continue
            elif not images:
                continue
            self.step(images, targets)
            if self.iteration % settings.print_freq == 0 or self.iteration == max_iter or self.stop.requested:
                self.deliver_losses()  # the one read of the device per --print-freq steps
            for hook in self.hooks:
                hook.after_step(self)
            if self.stop.requested:  # Ctrl-C: the stop below writes the checkpoint
                break
        if self.iteration > start_iter and data.epoch < self.num_epochs:  # stopped at max_iter or Ctrl-C
            self._end_epoch(start_iter, stopped=True)

    def _interrupted(self, failed: bool) -> None:
        """InterruptedRun after Ctrl-C, naming the checkpoint to resume from (``failed``: the stop
        ended in an error, so the last checkpoint may be older than this iteration)."""
        last = os.path.join(self.config.loop.output_dir, LAST_CHECKPOINT)
        if not os.path.exists(last):
            raise InterruptedRun(f"interrupted (Ctrl-C) at iteration {self.iteration}, before any checkpoint")
        done = "the last checkpoint is" if failed else "checkpoint written"
        raise InterruptedRun(
            f"interrupted (Ctrl-C) at iteration {self.iteration}; {done}: continue with --resume {last}"
        )

    def _end_epoch(self, start_iter: int, stopped: bool) -> None:
        """The current epoch's end, or a stop part-way through it: the hooks' after_epoch
        (checkpoint, evaluation), then all ranks meet."""
        data = self.batches
        data.close()
        self.deliver_losses()
        if self.iteration == start_iter and data.drawn:
            raise NothingDoneError(
                f"epoch {data.epoch}: no optimiser step in {data.drawn} batches: every image of "
                f"{self.train_annotations} that was read was skipped as bad data (--on-bad-data "
                f"{self.config.loop.on_bad_data}); nothing was trained or checkpointed"
            )
        last_epoch_done = data.used_up and data.epoch + 1 == self.num_epochs
        run_over = self.iteration >= self.total_iters or last_epoch_done
        end = EpochEnd(data.epoch, data.position, data.used_up, run_over, stopped=stopped or run_over)
        end.evaluate = any(hook.evaluates(end) for hook in self.hooks)
        for hook in self.hooks:
            hook.after_epoch(self, end)
        barrier(self.info)

    def close(self) -> None:
        """Close what the run opened (TensorBoard's file, the data loader and its bar)."""
        if self.tensorboard is not None:
            self.tensorboard.close()
            self.tensorboard = None
        self.batches.close()
