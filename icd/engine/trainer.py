"""The training loop: plain detector training (teachers, baselines) and distillation (ICD, FPN-MSE).

Reads like torchvision's references/detection/train.py: the arguments are the CLI's
(``icd train --help``), the checkpoint is a dict with model, optimizer, lr_scheduler, epoch and
args (plus what an exact resume needs, see icd.engine.checkpoint).

One iteration (``family``: the detector family of ``icd.detection.adapters``)::

    losses = family.losses(student, spec, images, targets)  # the detector's own losses
    batch = family.tap(student, spec).batch                 # its maps and input frame, labels 0..C-1
    teacher_maps = teacher_family.features(teacher, teacher_spec, batch.images)  # frozen, same frame
    losses |= distiller(teacher_maps, batch.features, batch.boxes, batch.labels, sizes, padded_size)
    sum(losses).backward(); SGD step (student side); AdamW step (ICD teacher side, clipped)

The run (``Trainer.train(start_iter, max_iter)``) is one loop over iterations: each draws the next
batch from ``icd.engine.batches.EpochBatches``, which goes on to the next epoch when one is used
up; the periodic work (health check, metrics lines, checkpoints, evaluations) is done by the
hooks of ``icd.engine.hooks``, after each step and at each epoch's end.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import math
import os
import random
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from icd.config import PRESET_IMAGES_PER_ITERATION
from icd.data.coco import CocoDetection, dataset_paths, report_categories
from icd.detection.adapters import family_of
from icd.detection.inherit import parse_parts
from icd.engine import optim
from icd.engine.batches import EpochBatches
from icd.engine.checkpoint import (
    capture_rng_state,
    load_checkpoint,
    restore_rng_state,
    save_atomic,
    state_dict_entry,
)
from icd.engine.distill import build_distiller, check_icd_heads, check_static_slots
from icd.engine.distributed import DistInfo, all_ranks, barrier, cleanup, init_distributed
from icd.engine.evaluator import autocast, eval_loader, evaluate
from icd.engine.finite import all_finite, first_non_finite, loss_report, nested_tensors
from icd.engine.health import ATTENTION_LIFT_FLOOR
from icd.engine.hooks import EpochEnd, HealthCheck, Hook, PeriodicCheckpoint, PeriodicEvaluation, TrainMetrics
from icd.engine.interrupt import StopRequest
from icd.engine.metrics import MetricsLog
from icd.engine.output_dir import claim_output_dir, remove_previous_run
from icd.engine.resume_settings import check_resume_compatible, resumed_position, schedule_changes
from icd.engine.run_spec import BARE_STATE_DICT_NORM, detector_spec_from_args, distiller_kwargs, load_frozen_teacher
from icd.engine.sampler import ResumableSampler
from icd.engine.speed import check_speed_flags, compile_error, compile_in_place, grad_scaler
from icd.errors import ConfigError, InterruptedRun, NonFiniteError, NothingDoneError
from icd.nn.attention_stats import is_detailed_statistic
from icd.ops.validation import value_checks

log = logging.getLogger("icd.train")

LAST_CHECKPOINT = "checkpoint.pth"
# teacher features above this magnitude overflow float32 when a loss squares them (sqrt of its max)
TEACHER_FEATURE_LIMIT = torch.finfo(torch.float32).max ** 0.5
BEST_CHECKPOINT = "model_best.pth"  # the evaluation with the highest best_metric() so far


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def run_length(args: argparse.Namespace, iters_per_epoch: int) -> tuple[int, int]:
    """(iterations, epochs) of the run: --iters when given (the last epoch may be partial),
    else --epochs whole epochs."""
    for flag in ("iters", "epochs", "stop_after_iters"):
        value = getattr(args, flag)
        if value is not None and value <= 0:
            raise ConfigError(f"--{flag.replace('_', '-')} {value}: expected a positive number")
    if iters_per_epoch <= 0:
        raise NothingDoneError("the training split has no image: nothing to train on")
    if args.iters is None:
        return args.epochs * iters_per_epoch, args.epochs
    return args.iters, math.ceil(args.iters / iters_per_epoch)


def load_teacher(path: str, num_classes: int, args: argparse.Namespace, device: torch.device) -> tuple[nn.Module, Any]:
    """The frozen teacher and its spec (``icd.engine.run_spec.load_frozen_teacher``): architecture
    from the checkpoint, or the --teacher-* flags for a bare state dict; weights loaded strictly."""
    flags = None
    if getattr(args, "teacher_detector", None) is not None and getattr(args, "teacher_backbone", None) is not None:
        values = {
            "detector": args.teacher_detector,
            "backbone": args.teacher_backbone,
            "fpn_channels": args.teacher_fpn_channels,
            "min_level": args.min_level,
            "max_level": args.max_level,
            "norm": args.teacher_norm or BARE_STATE_DICT_NORM,
            # icd pretrain's sizes may be unset: the spec's defaults then
            "min_size": getattr(args, "min_size", None),
            "max_size": getattr(args, "max_size", None),
        }
        flags = family_of(args.teacher_detector, "--teacher-detector").spec_from_args(values, num_classes)
    return load_frozen_teacher(path, num_classes, device, flags=flags)


def best_metric(detector: str, metrics: dict[str, float]) -> str:
    """The metric model_best.pth is chosen by (the detector family's ``best_metric``): mask AP for
    Mask R-CNN (when evaluated), else box AP."""
    return family_of(detector).best_metric(detector, metrics)


def _is_rank_zero() -> bool:
    """Rank 0 of a torchrun launch, or a single process (before the process group exists)."""
    return int(os.environ.get("RANK", "0")) == 0


def _refuse_non_finite(ckpt: dict, iteration: int) -> None:
    """NonFiniteError instead of writing a checkpoint with a NaN or inf tensor in it."""
    bad = first_non_finite(nested_tensors({k: v for k, v in ckpt.items() if k != "rng"}))
    if bad is not None:
        raise NonFiniteError(
            f"iteration {iteration}: {bad} is non-finite (NaN or inf); the checkpoint was not written"
        )


def _unwrap(model: nn.Module) -> nn.Module:
    return model.module if isinstance(model, DistributedDataParallel) else model


@dataclass
class PendingStep:
    """One optimiser step's losses, kept on the device until they are read (``Trainer.read_losses``).

    ``values``: float32 [len(names) + 1], each named loss then their sum; ``params_finite``: 0-dim
    bool, the parameters before this step had no NaN or inf (None: not known); ``teacher_peak``:
    0-dim, the largest magnitude of the teacher's FPN maps of this batch (None without a teacher).
    """

    iteration: int  # the step's number: ``Trainer.iteration`` once it is done
    names: tuple[str, ...]
    values: torch.Tensor
    params_finite: torch.Tensor | None
    teacher_peak: torch.Tensor | None


def _loss_key(name: str) -> str:
    """A loss's name in records and metrics: loss_<name> (names that start with loss_ kept)."""
    return name if name.startswith("loss_") else f"loss_{name}"


def _plain_args(args: argparse.Namespace) -> dict:
    """args as a dict of str/int/float/bool/None/list (weights_only-loadable)."""
    out = {}
    for key, value in vars(args).items():
        if callable(value):
            continue
        out[key] = list(value) if isinstance(value, tuple) else value
    return out


class Trainer:
    """Builds everything from the parsed ``icd train`` arguments; ``run()`` trains and evaluates."""

    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.inherit_parts = parse_parts(args.inherit_teacher)  # checked before anything is built
        if self.inherit_parts and not args.teacher:
            raise ConfigError(f"--inherit-teacher {args.inherit_teacher} needs --teacher")
        if args.teacher and args.distill == "none" and not self.inherit_parts:
            raise ConfigError(
                f"--teacher {args.teacher} --distill none: the teacher would not be used; add "
                "--inherit-teacher neck,head (inheritance only) or leave --teacher out (a baseline)"
            )
        if args.health_window < 2:
            raise ConfigError(f"--health-window {args.health_window}: expected at least 2 iterations")
        from icd.engine.distributed import resolve_device

        check_speed_flags(args, resolve_device(args.device))
        # another run's files there, or a live run in it, stop this one before anything is built;
        # rank 0 holds the folder (its lock) until close()
        self.claim = (
            claim_output_dir(args.output_dir, args.resume, getattr(args, "overwrite", False))
            if _is_rank_zero()
            else None
        )
        self.overwritten = self.claim.overwritten if self.claim is not None else []
        try:
            self._set_up()
        except BaseException:
            self._release_claim()
            raise

    def _set_up(self) -> None:
        """Everything a run needs, from the arguments (the folder already claimed)."""
        args = self.args
        self.info: DistInfo = init_distributed(args.device)
        seed_everything(args.seed)
        self._build_data()
        num_classes = self.train_set.num_classes
        self.family = family_of(args.detector)
        self.spec = detector_spec_from_args(args, num_classes)
        if getattr(self.spec, "norm", None) == "frozen_bn" and not args.backbone_weights and self.info.is_main:
            log.warning(
                "frozen_bn without --backbone-weights: the backbone's BatchNorm layers stay at identity "
                "and its weights start random; give ImageNet weights, or --norm gn to train from scratch"
            )
        if args.amp and self.info.device.type == "cpu" and self.info.is_main:
            log.warning(
                "--amp on the CPU: %s autocast makes torchvision's detectors slower there, not faster "
                "(a RetinaNet R18 step took 5.9x the CPU time of float32 in bfloat16, docs/nn.md); leave --amp "
                "for CUDA", getattr(args, "amp_dtype", None) or "bfloat16",
            )
        backbone = None  # ImageNet weights of the ResNet body, read like every checkpoint file
        if args.backbone_weights:
            backbone = state_dict_entry(load_checkpoint(args.backbone_weights, "--backbone-weights"),
                                        "--backbone-weights", args.backbone_weights)  # fmt: skip
        self.model = self.family.build(self.spec, backbone, f"--backbone-weights {args.backbone_weights}")
        self.model.to(self.info.device)
        sampler = ResumableSampler(self.train_set, self.info.world_size, self.info.rank, shuffle=True, seed=args.seed)
        self.batches = EpochBatches(
            self.train_set, sampler, args.batch_size, args.workers, args.seed,
            pin_memory=self.info.device.type == "cuda", progress=self.info.is_main and not args.no_progress,
        )
        self.total_iters, self.num_epochs = run_length(args, self.batches.per_epoch)
        self.tap = self.teacher = self.distiller = None
        if args.teacher:
            self._build_distillation(num_classes)
        self._build_optimisers()
        self.trained_params = [
            p for group in self._optimisers() for g in group.param_groups for p in g["params"] if p.requires_grad
        ]
        self._params_finite: torch.Tensor | None = None  # on the device, read at the next loss check
        self._teacher_maps: list[torch.Tensor] | None = None
        self._pending: list[PendingStep] = []  # steps whose losses are still on the device
        self.scaler = grad_scaler(self.info.device, args.amp, getattr(args, "amp_dtype", None))
        self._compile()
        self._wrap_ddp()
        self.iteration = 0  # optimiser steps done
        self.metrics = MetricsLog(args.output_dir, enabled=self.info.is_main)
        self.hooks: list[Hook] = []  # set by run()
        self.stop = StopRequest(enabled=False)  # run() installs the Ctrl-C handler
        self.tensorboard = None  # icd.engine.tensorboard.TensorBoardLog under --tensorboard, from run()
        self.best: dict | None = None  # {"metric", "value", "epoch", "iter"} of the best evaluation
        self.last_evaluation: dict[str, float] = {}
        self.pending_evaluation: tuple[int, dict | None] | None = None  # (epoch, its checkpoint) to evaluate
        if args.resume:
            self._resume(args.resume)

    # -- set-up ------------------------------------------------------------------------------
    def _build_data(self) -> None:
        args = self.args
        train_dir, train_ann = dataset_paths(args.data_path, args.train_split, args.train_ann, args.train_images)
        drop_empty = getattr(args, "drop_empty_categories", False)
        self.train_set = CocoDetection(
            train_dir,
            train_ann,
            train=True,
            flip_prob=args.flip_prob,
            on_bad_data=args.on_bad_data,
            seed=args.seed,
            with_masks=family_of(args.detector).needs_masks(args.detector),
            drop_empty_categories=drop_empty,
        )
        if self.info.is_main:
            report_categories(self.train_set)
        self.train_annotations = train_ann
        if self.train_set.num_annotations == 0 and self.info.is_main:
            log.warning(
                "%s has no (usable) annotations: the detector learns only background", train_ann
            )
        self.val_set = None
        if not args.no_eval:
            val_dir, val_ann = dataset_paths(args.data_path, args.val_split, args.val_ann, args.val_images, "val")
            classes = self.train_set.category_ids if drop_empty else None  # the val split's empty ones go too
            self.val_set = CocoDetection(val_dir, val_ann, on_bad_data=args.on_bad_data, categories=classes)

    def _build_distillation(self, num_classes: int) -> None:
        """The frozen teacher, the distiller and the tap on the student (``--distill none``: only
        the --inherit-teacher copy, after which the teacher is released)."""
        args, info = self.args, self.info
        self.teacher, teacher_spec = load_teacher(args.teacher, num_classes, args, info.device)
        self.teacher_family = family_of(teacher_spec.detector)
        self.teacher_spec = teacher_spec
        theirs = self.teacher_family.feature_layout(teacher_spec)
        ours = self.family.feature_layout(self.spec)
        if (theirs.levels, theirs.strides) != (ours.levels, ours.strides):
            raise ConfigError(
                f"teacher levels P{list(theirs.levels)} differ from the student's "
                f"P{list(ours.levels)}; pass --min-level/--max-level to match"
            )
        if args.distill == "none":
            self._inherit(teacher_spec)
            self.teacher = None  # inheritance only: no teacher forward passes, its memory goes
            return
        if args.distill == "icd":
            check_icd_heads(args.icd_heads, min(theirs.channels), args.teacher)
        warmup = args.distill_warmup_iters
        if warmup is None:
            warmup = optim.default_warmup_iters(self.total_iters)
        self.distiller = build_distiller(
            **distiller_kwargs(vars(args), teacher_spec, num_classes),
            warmup_iters=warmup,
            annotation_file=self.train_set.coco.dataset,  # as checked (bad annotations skipped)
            backend=args.icd_backend,
            static_shapes=args.icd_static_shapes,
        ).to(info.device)
        check_static_slots(self.distiller, self.train_set.most_instances, self.train_annotations)
        self.teacher_levels = theirs.names
        if getattr(args, "icd_init", None):
            self._load_icd_init(args.icd_init, teacher_spec)
        self.tap = self.family.tap(self.model, self.spec)
        self._inherit(teacher_spec)

    def _inherit(self, teacher_spec: Any) -> None:
        """--inherit-teacher: copy the teacher's parts into the student (its family's ``inherit``)."""
        if not self.inherit_parts:
            return
        copied = self.family.inherit(self.model, self.spec, self.teacher, teacher_spec, self.inherit_parts)
        if self.info.is_main:
            log.info("inherited %s from the teacher: %d tensors", ",".join(self.inherit_parts), len(copied))

    def _load_icd_init(self, path: str, teacher_spec: Any) -> None:
        """ICD's teacher side from ``icd pretrain``'s file, checked against this teacher."""
        from icd.engine.pretrain import load_teacher_side, teacher_fingerprint, teacher_side_signature

        if self.args.distill != "icd":
            raise ConfigError(f"--icd-init {path} needs --distill icd (got --distill {self.args.distill})")
        expected = teacher_side_signature(self.distiller, teacher_spec, teacher_fingerprint(self.teacher, teacher_spec))
        meta = load_teacher_side(self.distiller, path, expected)
        if self.info.is_main:
            log.info("ICD teacher side from %s (pre-trained %s iterations; attention %s); distillation "
                     "weights at mask temperature %g", path, meta.get("iteration"),
                     {k: round(v, 3) for k, v in meta.get("attention", {}).items() if k in ("lift", "distinctness")},
                     self.distiller.mask_temperature)  # fmt: skip

    def _build_optimisers(self) -> None:
        """SGD over the student and the distiller's student side; AdamW over ICD's teacher side."""
        args = self.args
        total_batch = args.batch_size * self.info.world_size
        lr = args.lr if args.lr is not None else optim.default_lr(args.detector, total_batch)
        if args.config and total_batch != PRESET_IMAGES_PER_ITERATION and self.info.is_main:
            log.warning(
                "--config %s: the presets' lr and schedule are for %d images per iteration; this run has %d "
                "(world size %d x --batch-size %d). Keep %d images, or scale --lr linearly (%.3g here)",
                args.config, PRESET_IMAGES_PER_ITERATION, total_batch, self.info.world_size, args.batch_size,
                PRESET_IMAGES_PER_ITERATION, lr * total_batch / PRESET_IMAGES_PER_ITERATION,
            )
        student_params = list(self.model.parameters())
        projection_by_teacher_side = getattr(args, "icd_projection_optimizer", "student") == "teacher-side"
        if self.distiller is not None and not projection_by_teacher_side:
            student_params += list(self.distiller.student_side_parameters())
        self.optimizer = optim.student_optimizer(
            student_params, lr, args.momentum, args.weight_decay, kind=self.family.student_optimizer(args.detector)
        )
        warmup_iters = args.warmup_iters
        if warmup_iters is None:
            warmup_iters = optim.default_warmup_iters(self.total_iters)
        self.lr_scheduler = optim.student_scheduler(
            self.optimizer, self.total_iters, warmup_iters, args.lr_steps
        )
        self.teacher_params = []
        self.teacher_optimizer = self.teacher_lr_scheduler = None
        if self.distiller is not None:
            self.teacher_params = [
                p for p in self.distiller.teacher_side_parameters() if p.requires_grad
            ]
            if projection_by_teacher_side:  # the published code: one AdamW, one joint clip
                self.teacher_params += [
                    p for p in self.distiller.student_side_parameters() if p.requires_grad
                ]
            if self.teacher_params:
                self.teacher_optimizer = optim.teacher_side_optimizer(self.teacher_params, args.icd_lr)
                self.teacher_lr_scheduler = optim.teacher_side_scheduler(
                    self.teacher_optimizer, self.total_iters
                )

    def _compile(self) -> None:
        """--compile: the student's and the teacher's ResNet + FPN and the distiller, compiled in
        place (state dict keys unchanged); --icd-cuda-graphs: the distiller in mode
        reduce-overhead (CUDA graphs of its forward and backward, fixed shapes)."""
        args = self.args
        graphs = getattr(args, "icd_cuda_graphs", False)
        if getattr(args, "compile", False):
            modules = self.family.compiled_parts(self.model)
            if self.teacher is not None:
                modules += self.teacher_family.compiled_parts(self.teacher)
            if self.distiller is not None and not graphs:
                modules.append(self.distiller)
            compile_in_place(modules, args.compile_backend or "inductor")
        if graphs:
            compile_in_place([self.distiller], "inductor", mode="reduce-overhead", dynamic=False)

    def _wrap_ddp(self) -> None:
        """DistributedDataParallel around the student and the distiller under torchrun."""
        info = self.info
        self.distiller_ddp = self.distiller
        if info.distributed:
            ids = [info.device.index] if info.device.type == "cuda" else None
            self.model = DistributedDataParallel(self.model, device_ids=ids)
            if self.distiller is not None and any(True for _ in self.distiller.parameters()):
                # every parameter takes part in every step: a batch without boxes gives ICD's
                # zero losses, which are still connected to all of them
                self.distiller_ddp = DistributedDataParallel(self.distiller, device_ids=ids)

    # -- checkpoints -------------------------------------------------------------------------
    def state(self, epoch: int, epoch_batches: int) -> dict:
        ckpt = {
            "model": _unwrap(self.model).state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "lr_scheduler": self.lr_scheduler.state_dict(),
            "epoch": epoch,
            "epoch_batches": epoch_batches,
            "iteration": self.iteration,
            "args": _plain_args(self.args),
            "detector_spec": self.family.spec_to_dict(self.spec),
            "world_size": self.info.world_size,
            "train_images": len(self.train_set),
            "categories": self.train_set.categories,
            "rng": capture_rng_state(),
        }
        if self.distiller is not None:
            ckpt["distiller"] = self.distiller.state_dict()
        if self.teacher_optimizer is not None:
            ckpt["teacher_optimizer"] = self.teacher_optimizer.state_dict()
            ckpt["teacher_lr_scheduler"] = self.teacher_lr_scheduler.state_dict()
        if self.scaler is not None:
            ckpt["scaler"] = self.scaler.state_dict()
        if self.best is not None:
            ckpt["best"] = dict(self.best)
        return ckpt

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
        if evaluation_due is not None:
            ckpt["pending_evaluation"] = evaluation_due
        _refuse_non_finite(ckpt, self.iteration)
        if also_epoch_file:
            save_atomic(ckpt, os.path.join(self.args.output_dir, f"model_{epoch - 1}.pth"))
        save_atomic(ckpt, os.path.join(self.args.output_dir, LAST_CHECKPOINT))
        return ckpt

    def _track_best(self, metrics: dict[str, float], epoch: int) -> bool:
        """Update the best evaluation so far with ``metrics``; True when it is the new best."""
        key = self.family.best_metric(self.spec.detector, metrics)
        if key not in metrics:
            return False
        value = float(metrics[key])
        if self.best is not None and self.best["metric"] == key and not value > self.best["value"]:
            return False
        self.best = {"metric": key, "value": value, "epoch": epoch, "iter": self.iteration}
        return True

    def _record_evaluation(self, saved: dict | None, improved: bool) -> None:
        """After the evaluation of the state ``saved`` (the checkpoint written just before it, rank
        0): model_best.pth when it is the new best, then checkpoint.pth again with the best so far
        and no pending evaluation."""
        if saved is None:
            return
        saved.pop("pending_evaluation", None)
        if self.best is not None:
            saved["best"] = dict(self.best)
        if improved:
            save_atomic(saved, os.path.join(self.args.output_dir, BEST_CHECKPOINT))
        save_atomic(saved, os.path.join(self.args.output_dir, LAST_CHECKPOINT))

    def _resume(self, path: str) -> None:
        ckpt = load_checkpoint(path, "--resume")
        world_size, train_images = self.info.world_size, len(self.train_set)
        check_resume_compatible(ckpt, path, self.args, self.family.spec_to_dict(self.spec), world_size, train_images)
        self.family.load_weights(_unwrap(self.model), ckpt, what="resumed", source=f"--resume {path}")
        self.optimizer.load_state_dict(ckpt["optimizer"])
        self.lr_scheduler.load_state_dict(ckpt["lr_scheduler"])
        if self.distiller is not None:
            if "distiller" not in ckpt:
                raise KeyError(
                    f"--resume {path} has no distiller state; it is not a "
                    f"--distill {self.args.distill} run"
                )
            self.distiller.load_state_dict(ckpt["distiller"])
        if self.teacher_optimizer is not None:
            self.teacher_optimizer.load_state_dict(ckpt["teacher_optimizer"])
            self.teacher_lr_scheduler.load_state_dict(ckpt["teacher_lr_scheduler"])
        if self.scaler is not None and "scaler" in ckpt:
            self.scaler.load_state_dict(ckpt["scaler"])
        self.iteration = int(ckpt["iteration"])
        position = int(ckpt.get("epoch_batches", 0))
        if schedule_changes(ckpt, self.args, world_size, train_images):  # --allow-resume-changes
            self._apply_new_schedule()
            position, note = resumed_position(ckpt, self.args.batch_size, world_size, train_images, self.args.seed)
            if note and self.info.is_main:
                log.warning("--allow-resume-changes: %s", note)
        self.batches.seek(int(ckpt["epoch"]), position)
        self.best = dict(ckpt["best"]) if "best" in ckpt else None
        if "pending_evaluation" in ckpt:  # killed during an epoch end's evaluation: run() does it first
            self.pending_evaluation = (int(ckpt["pending_evaluation"]), ckpt if self.info.is_main else None)
        restore_rng_state(ckpt["rng"])
        if self.info.is_main:
            log.info("resumed from %s at epoch %d, iteration %d", path, self.batches.epoch, self.iteration)

    def _apply_new_schedule(self) -> None:
        """The lr, momentum and weight decay of this run's flags in the resumed optimisers, and
        their lr at the resumed iteration by the new schedule (the schedulers' closed forms were
        built from the new flags; their saved state holds the old base lr)."""
        lr = self.optimizer.defaults["lr"]  # this run's --lr (or its default), set when it was built
        for group in self.optimizer.param_groups:
            group.update(momentum=self.args.momentum, weight_decay=self.args.weight_decay, initial_lr=lr)
        schedulers = [(self.lr_scheduler, [lr] * len(self.optimizer.param_groups))]
        if self.teacher_lr_scheduler is not None:
            schedulers.append((self.teacher_lr_scheduler, list(self.teacher_lr_scheduler.base_lrs)))
        for scheduler, base_lrs in schedulers:
            scheduler.base_lrs = base_lrs
            groups = scheduler.optimizer.param_groups
            for group, base, factor in zip(groups, base_lrs, scheduler.lr_lambdas, strict=True):
                group["lr"] = base * factor(scheduler.last_epoch)
        if self.info.is_main:
            log.warning("--allow-resume-changes: the lr schedule of this run's flags from iteration %d on (lr now "
                        "%.3g)", self.iteration, self.optimizer.param_groups[0]["lr"])  # fmt: skip

    def _optimisers(self) -> list[torch.optim.Optimizer]:
        return [opt for opt in (self.optimizer, self.teacher_optimizer) if opt is not None]

    # -- non-finite guard --------------------------------------------------------------------
    def _non_finite_error(
        self, iteration: int, record: dict[str, float], params_finite: bool, teacher_fault: str | None
    ) -> NonFiniteError:
        """The error of step ``iteration`` whose losses (``record``) or prior parameters are not
        finite (a failure path: it reads the parameters on the host)."""
        if not params_finite:
            named = [(n, p) for n, p in _unwrap(self.model).named_parameters()]
            if self.distiller is not None:
                named += [(f"distiller.{n}", p) for n, p in self.distiller.named_parameters()]
            bad = first_non_finite(named) or "a parameter"
            return NonFiniteError(
                f"iteration {iteration - 1}: the optimiser step made {bad} non-finite (NaN or inf) "
                f"with finite losses; stopped before checkpointing it. Lower --lr ({self._lr_text()})"
            )
        losses = {k: torch.tensor(v) for k, v in record.items() if k != "loss"}
        message = f"non-finite loss at iteration {iteration}: {loss_report(losses)}"
        if teacher_fault is not None:
            message += f"; {teacher_fault}"
        else:
            message += f"; the student diverged or the batch is bad: lower --lr ({self._lr_text()})"
        return NonFiniteError(message + "; nothing non-finite was checkpointed")

    def _teacher_maps_fault(self, maps: list[torch.Tensor]) -> str | None:
        """What is wrong with the teacher's FPN maps of this batch (non-finite, or too large for
        the distillation loss to square in float32), blaming the teacher; None when nothing is."""
        if first_non_finite(enumerate(maps)) is not None:
            return self._teacher_fault(float("nan"))
        return self._teacher_fault(max(float(m.detach().abs().max()) for m in maps))

    def _teacher_fault(self, peak: float) -> str | None:
        """The teacher's share of the blame when its FPN maps peak at ``peak`` (NaN: non-finite)."""
        if not math.isfinite(peak):
            found = "non-finite (NaN or inf)"
        elif peak <= TEACHER_FEATURE_LIMIT:
            return None
        else:
            found = f"as large as {peak:.3g} (the distillation loss squares them: float32 ends at 3.4e38)"
        return (
            f"the teacher's FPN outputs are {found} (--teacher {self.args.teacher}): the teacher, not the "
            "student, is at fault" + (" (float16 overflow? try without --amp)" if self.args.amp else "")
        )

    def _check_teacher_maps(self, maps: list[torch.Tensor]) -> None:
        """NonFiniteError blaming the teacher when its maps of this batch are unusable (CPU runs)."""
        fault = self._teacher_maps_fault(maps)
        if fault is not None:
            raise NonFiniteError(f"iteration {self.iteration + 1}: {fault}; nothing non-finite was checkpointed")

    def _lr_text(self) -> str:
        return f"now {self.optimizer.param_groups[0]['lr']:.3g}"

    # -- one iteration -----------------------------------------------------------------------
    def _losses(self, images: list[torch.Tensor], targets: list[dict]) -> dict[str, torch.Tensor]:
        graphs = getattr(self.args, "icd_cuda_graphs", False)
        with autocast(self.info.device, self.args.amp, getattr(self.args, "amp_dtype", None)):
            losses = self.family.losses(self.model, self.spec, images, targets)
            if self.distiller is not None:
                batch = self.tap.batch  # labels 0..C-1 in the student's input frame
                with torch.no_grad():
                    teacher_maps = self.teacher_family.features(self.teacher, self.teacher_spec, batch.images)
                self._teacher_maps = teacher_maps  # kept until the loss check (its report)
                if value_checks(teacher_maps[0]):  # free on the CPU; on a GPU the loss check reports it
                    self._check_teacher_maps(teacher_maps)
                labels, boxes = batch.labels, batch.boxes
                if graphs:  # fixed-shape inputs [N, K, 4], [N, K]: the graph's own
                    from icd.nn import pad_instances

                    boxes, labels = pad_instances(boxes, labels, self.distiller.sampler.max_labels)
                    torch.compiler.cudagraph_mark_step_begin()
                extra = self.distiller_ddp(
                    teacher_maps,
                    batch.features,
                    boxes,
                    labels,
                    batch.image_sizes.to(self.info.device, non_blocking=True),
                    batch.padded_size,
                )
                self.tap.clear()
                if graphs:  # a graph's outputs are overwritten by its next replay
                    extra = {k: v.clone() for k, v in extra.items()}
                losses.update(extra)
        return {k: v.float() for k, v in losses.items()}

    def train_step(self, images: list[torch.Tensor], targets: list[dict]) -> dict[str, float]:
        """One optimiser step checked at once: a non-finite loss (or parameter) stops it before
        the optimiser step; returns its losses as floats. Waits for the device (``Trainer.train``
        uses ``step``, whose losses are read every --print-freq steps)."""
        self.step(images, targets, check_now=True)
        return self.read_losses()[-1][1]

    def step(self, images: list[torch.Tensor], targets: list[dict], check_now: bool = False) -> None:
        """One optimiser step without reading anything on the host (on CUDA: no synchronisation
        by icd's code); its losses stay on the device in ``self._pending`` until ``read_losses``.

        ``check_now``: read the loss and the parameters' flag before the optimiser step (one sync)
        and stop there when either is non-finite.
        """
        device = self.info.device
        # copies that do not block the host (pinned memory on CUDA: the batches' pin_memory);
        # labels stay the dataset's 0..C-1: the family's losses convert them
        images = [im.to(device, non_blocking=True) for im in images]
        targets = [
            {
                "boxes": t["boxes"].to(device, non_blocking=True),
                "labels": t["labels"].to(device, non_blocking=True),
                **({"masks": t["masks"].to(device, non_blocking=True)} if "masks" in t else {}),
            }
            for t in targets
        ]
        with self._compile_errors():
            losses = self._losses(images, targets)
        total = sum(losses.values())
        teacher_maps, self._teacher_maps = self._teacher_maps, None
        teacher_peak = None
        if teacher_maps is not None:
            teacher_peak = torch.nn.utils.get_total_norm(
                [m.detach() for m in teacher_maps], norm_type=math.inf, foreach=None
            )
        if check_now:
            finite = torch.isfinite(total)
            if self._params_finite is not None:
                finite = finite & self._params_finite
            if not finite:
                record = {_loss_key(k): float(v.detach()) for k, v in losses.items()}
                params_finite = self._params_finite is None or bool(self._params_finite)
                fault = self._teacher_maps_fault(teacher_maps) if teacher_maps is not None else None
                raise self._non_finite_error(self.iteration + 1, record, params_finite, fault)
        self.optimizer.zero_grad(set_to_none=True)
        if self.teacher_optimizer is not None:
            self.teacher_optimizer.zero_grad(set_to_none=True)
        with self._compile_errors():  # inductor may compile a backward graph at its first call
            (self.scaler.scale(total) if self.scaler is not None else total).backward()
        if self.teacher_optimizer is not None:
            if self.scaler is not None:
                self.scaler.unscale_(self.teacher_optimizer)
            torch.nn.utils.clip_grad_norm_(self.teacher_params, self.args.icd_clip)
        for opt in (self.optimizer, self.teacher_optimizer):
            if opt is None:
                continue
            if self.scaler is not None:
                self.scaler.step(opt)  # torch reads its inf/NaN flag on the host here (float16 only)
            else:
                opt.step()
        if self.scaler is not None:
            self.scaler.update()
        self.lr_scheduler.step()
        if self.teacher_lr_scheduler is not None:
            self.teacher_lr_scheduler.step()
        if self.distiller is not None:
            self.distiller.step()
        names = tuple(_loss_key(k) for k in losses)
        values = torch.stack([v.detach() for v in losses.values()] + [total.detach()])
        self._pending.append(PendingStep(self.iteration + 1, names, values, self._params_finite, teacher_peak))
        self._params_finite = all_finite(self.trained_params)
        self.iteration += 1

    @contextlib.contextmanager
    def _compile_errors(self):
        """torch.compile's code-generation failures as one line naming --compile."""
        try:
            yield
        except Exception as err:
            failed = compile_error(err, getattr(self.args, "compile_backend", None) or "inductor")
            if failed is not None:
                raise failed from err
            raise

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
                hook.after_losses(self, iteration, record)

    # -- the run -----------------------------------------------------------------------------
    def run(self) -> dict[str, float]:
        """Train to the end of the schedule (or --stop-after-iters), evaluating per --eval-every
        and at the end; returns the last evaluation's metrics."""
        args = self.args
        stop_at = min(self.total_iters, args.stop_after_iters or self.total_iters)
        if self.overwritten and self.info.is_main:
            log.warning("--overwrite: removing the previous run's %s", ", ".join(self.overwritten))
            remove_previous_run(self.overwritten)
        if getattr(args, "tensorboard", False) and self.info.is_main:  # after the removal: its files are new
            from icd.engine.tensorboard import TensorBoardLog

            self.tensorboard = TensorBoardLog(args.output_dir, purge_step=self.iteration + 1 if args.resume else None)
            self.metrics.sinks.append(self.tensorboard.write)
        self.hooks = [
            HealthCheck(args.health_window, stop=args.on_unhealthy == "stop"),
            TrainMetrics(args.print_freq, last=stop_at),
            PeriodicCheckpoint(args.checkpoint_every, args.epoch_checkpoint_every),
        ]
        if self.val_set is not None:
            self.hooks.append(PeriodicEvaluation(args.eval_every))
        evaluated = self.pending_evaluation is not None and self.val_set is not None
        if evaluated:
            epoch, saved = self.pending_evaluation
            if self.info.is_main:
                log.info("the evaluation after epoch %d was interrupted: evaluating that state first", epoch)
            self.run_evaluation(epoch, saved)
        self.pending_evaluation = None
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
        if self.iteration == start and not evaluated:
            raise NothingDoneError(
                f"--resume {args.resume} is at iteration {self.iteration} and this run stops at iteration "
                f"{stop_at}: nothing to train; raise --stop-after-iters to go on (a longer --iters or --epochs "
                "changes the lr schedule: add --allow-resume-changes)"
            )
        return self.last_evaluation

    def train(self, start_iter: int, max_iter: int) -> None:
        """Optimiser steps ``start_iter`` + 1 .. ``max_iter``, drawing batch after batch across the
        epochs; ends earlier when the run's last epoch is used up (batches of only skipped images
        take no step). Each step runs the hooks' after_step; each epoch's end, and a stop part-way
        through one, their after_epoch."""
        data = self.batches
        self.iteration = start_iter
        self.model.train()
        while self.iteration < max_iter and data.epoch < self.num_epochs:
            batch = data.next()
            if batch is None:  # this epoch's batches are used up
                self._end_epoch(start_iter)
                data.next_epoch()
                continue
            images, targets = batch
            # a batch whose every image was a skipped corrupt one: under DDP all ranks skip
            # the step together, or the others would wait for its gradients forever. Only
            # --on-bad-data skip empties a batch: otherwise no collective (its flag is read on
            # the host, a synchronisation per step)
            if self.args.on_bad_data == "skip":
                if not all_ranks(bool(images), self.info):
                    continue
            elif not images:
                continue
            self.step(images, targets)
            if self.iteration % self.args.print_freq == 0 or self.iteration == max_iter or self.stop.requested:
                self.deliver_losses()  # the one read of the device per --print-freq steps
            for hook in self.hooks:
                hook.after_step(self)
            if self.stop.requested:  # Ctrl-C: the stop below writes the checkpoint
                break
        if self.iteration > start_iter and data.epoch < self.num_epochs:  # stopped at max_iter or Ctrl-C
            self._end_epoch(start_iter)

    def _interrupted(self, failed: bool) -> None:
        """InterruptedRun after Ctrl-C, naming the checkpoint to resume from (``failed``: the stop
        ended in an error, so the last checkpoint may be older than this iteration)."""
        last = os.path.join(self.args.output_dir, LAST_CHECKPOINT)
        if not os.path.exists(last):
            raise InterruptedRun(f"interrupted (Ctrl-C) at iteration {self.iteration}, before any checkpoint")
        done = "the last checkpoint is" if failed else "checkpoint written"
        raise InterruptedRun(
            f"interrupted (Ctrl-C) at iteration {self.iteration}; {done}: continue with --resume {last}"
        )

    def _end_epoch(self, start_iter: int) -> None:
        """The current epoch's end, or a stop part-way through it: the hooks' after_epoch
        (checkpoint, evaluation), then all ranks meet."""
        data = self.batches
        data.close()
        self.deliver_losses()
        if self.iteration == start_iter and data.drawn:
            raise NothingDoneError(
                f"epoch {data.epoch}: no optimiser step in {data.drawn} batches: every image of "
                f"{self.train_annotations} that was read was skipped as bad data (--on-bad-data "
                f"{self.args.on_bad_data}); nothing was trained or checkpointed"
            )
        last_epoch_done = data.used_up and data.epoch + 1 == self.num_epochs
        end = EpochEnd(data.epoch, data.position, data.used_up, self.iteration >= self.total_iters or last_epoch_done)
        end.evaluate = any(hook.evaluates(end) for hook in self.hooks)
        for hook in self.hooks:
            hook.after_epoch(self, end)
        barrier(self.info)

    def run_evaluation(self, epoch: int, saved: dict | None = None) -> dict[str, float]:
        """Evaluate on the val split and log it; a new best AP also writes model_best.pth from
        ``saved``, the checkpoint of this very state (rank 0)."""
        loader = eval_loader(self.val_set, self.info, self.args.batch_size, self.args.workers)
        metrics = evaluate(
            _unwrap(self.model),
            loader,
            self.val_set,
            self.info,
            family=self.family,
            spec=self.spec,
            amp=self.args.amp,
            amp_dtype=getattr(self.args, "amp_dtype", None),
            output_dir=self.args.output_dir,
            split=self.args.val_split,
            progress=not self.args.no_progress,
        )
        if self.args.teacher and self.args.distill == "icd" and self.info.is_main:
            from icd.engine.attention import attention_statistics

            detailed = getattr(self.args, "attention_detail", False)
            metrics.update(
                attention_statistics(self.distiller, self.teacher, self.val_set, self.teacher_levels,
                                     detailed=detailed, teacher_spec=self.teacher_spec)  # fmt: skip
            )
        improved = self._track_best(metrics, epoch)
        best = {}
        if self.best is not None:
            best = {f"best_{self.best['metric']}": self.best["value"], "best_epoch": self.best["epoch"],
                    "best_iter": self.best["iter"]}
        self.metrics.write({"type": "eval", "iter": self.iteration, "epoch": epoch, **metrics, **best})
        self.last_evaluation = metrics
        self._record_evaluation(saved, improved)
        if self.info.is_main:
            shown = {k: v for k, v in metrics.items() if not is_detailed_statistic(k)}
            print(
                f"epoch {epoch} iter {self.iteration}: " + " ".join(f"{k} {v:.2f}" for k, v in shown.items()),
                flush=True,
            )
            self._check_attention(metrics, epoch)
        return metrics

    def _check_attention(self, metrics: dict[str, float], epoch: int) -> None:
        """An ICD run whose real instances look less at their own boxes than at the average
        valid token (lift < 1) distils from the wrong places: one warning line and a health
        record per such evaluation."""
        lift = metrics.get("lift")
        if lift is None or not lift < ATTENTION_LIFT_FLOOR:
            return
        self.metrics.write({"type": "health", "iter": self.iteration, "epoch": epoch, "loss": "attention",
                            "problem": "looks-away", "value": lift})  # fmt: skip
        log.warning(
            "ICD's attention looks away from its instances at epoch %d: lift %.2f < %g (an instance's attention "
            "falls less on its own box than on the average valid token), distinctness %.2f; its distillation "
            "weights are then no better than uniform (docs/training.md, Dense scenes)",
            epoch, lift, ATTENTION_LIFT_FLOOR, metrics.get("distinctness", float("nan")),
        )

    def close(self) -> None:
        if self.tensorboard is not None:
            self.tensorboard.close()
        self.batches.close()
        if self.tap is not None:
            self.tap.remove()
        cleanup(self.info)
        self._release_claim()

    def _release_claim(self) -> None:
        if self.claim is not None:
            self.claim.release()


def train(args: argparse.Namespace) -> dict[str, float]:
    """Train as ``icd train`` does; returns the last evaluation's metrics ({} without one)."""
    trainer = Trainer(args)
    try:
        return trainer.run()
    finally:
        trainer.close()
