"""``icd train``: plain detector training (teachers, baselines) and distillation (ICD, FPN-MSE),
as a step strategy of the one training loop (``icd.engine.loop.Loop``).

Reads like torchvision's references/detection/train.py: the arguments are the CLI's
(``icd train --help``), read once into a typed ``RunConfig`` (``icd.engine.run_config``); the
checkpoint is a dict with model, optimizer, lr_scheduler, epoch, args and config (plus what an
exact resume needs, see icd.engine.checkpoint).

One iteration (``Trainer.step``; ``family``: the detector family of ``icd.detection.adapters``)::

    losses = family.losses(student, spec, images, targets)  # the detector's own losses
    batch = family.tap(student, spec).batch                 # its maps and input frame, labels 0..C-1
    teacher_maps = teacher_family.features(teacher, teacher_spec, batch.images)  # frozen, same frame
    losses |= distiller(teacher_maps, batch.features, batch.boxes, batch.labels, sizes, padded_size)
    sum(losses).backward(); SGD step (student side); AdamW step (ICD teacher side, clipped)

The run (``Loop.train(start_iter, max_iter)``) is one loop over iterations: each draws the next
batch from ``icd.engine.batches.EpochBatches``, which goes on to the next epoch when one is used
up; the periodic work (health check, metrics lines, checkpoints, evaluations) is done by the
hooks of ``icd.engine.hooks`` (``Trainer.default_hooks``) and any of the caller's, after each
step and at each epoch's end."""

from __future__ import annotations

import argparse
import contextlib
import logging
import math
import os
from collections.abc import Iterable
from typing import Any

import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from icd.config import PRESET_IMAGES_PER_ITERATION
from icd.data.coco import CocoDetection, dataset_paths, report_categories
from icd.detection.adapters import check_teacher_frame, family_of
from icd.detection.inherit import parse_parts
from icd.engine import optim
from icd.engine.batches import EpochBatches
from icd.engine.checkpoint import (
    capture_rng_state,
    load_checkpoint,
    plain_args,
    restore_rng_state,
    save_atomic,
    seed_everything,
    state_dict_entry,
)
from icd.engine.distill import build_distiller, check_icd_heads, check_static_slots
from icd.engine.distributed import DistInfo, cleanup, init_distributed
from icd.engine.evaluator import autocast, eval_loader, evaluate
from icd.engine.finite import first_non_finite
from icd.engine.health import ATTENTION_LIFT_FLOOR
from icd.engine.hooks import HealthCheck, Hook, PeriodicCheckpoint, PeriodicEvaluation, TrainMetrics
from icd.engine.loop import LAST_CHECKPOINT, Loop, loss_key
from icd.engine.metrics import MetricsLog
from icd.engine.output_dir import claim_output_dir
from icd.engine.resume_settings import check_resume_compatible, resumed_position, schedule_changes
from icd.engine.run_config import LoopConfig, RunConfig
from icd.engine.run_spec import detector_spec_from_args, distiller_kwargs, load_teacher
from icd.engine.sampler import ResumableSampler
from icd.engine.speed import check_speed_flags, compile_error, compile_in_place, grad_scaler
from icd.errors import ConfigError, NonFiniteError, NothingDoneError
from icd.nn.attention_stats import is_detailed_statistic
from icd.ops.validation import value_checks

log = logging.getLogger("icd.train")

# teacher features above this magnitude overflow float32 when a loss squares them (sqrt of its max)
TEACHER_FEATURE_LIMIT = torch.finfo(torch.float32).max ** 0.5
BEST_CHECKPOINT = "model_best.pth"  # the evaluation with the highest best_metric() so far


def run_length(loop: LoopConfig, iters_per_epoch: int) -> tuple[int, int]:
    """(iterations, epochs) of the run: --iters when given (the last epoch may be partial),
    else --epochs whole epochs (LoopConfig has checked both)."""
    if iters_per_epoch <= 0:
        raise NothingDoneError("the training split has no image: nothing to train on")
    if loop.iters is None:
        if loop.epochs is None:
            raise ConfigError("--epochs or --iters: give the run's length")
        return loop.epochs * iters_per_epoch, loop.epochs
    return loop.iters, math.ceil(loop.iters / iters_per_epoch)


def best_metric(detector: str, metrics: dict[str, float]) -> str:
    """The metric model_best.pth is chosen by (the detector family's ``best_metric``): mask AP for
    Mask R-CNN (when evaluated), else box AP."""
    return family_of(detector).best_metric(detector, metrics)


def _is_rank_zero() -> bool:
    """Rank 0 of a torchrun launch, or a single process (before the process group exists)."""
    return int(os.environ.get("RANK", "0")) == 0


def _unwrap(model: nn.Module) -> nn.Module:
    return model.module if isinstance(model, DistributedDataParallel) else model


class Trainer(Loop):
    """Builds everything from the parsed ``icd train`` arguments, which it reads once into its
    ``config`` (``RunConfig.from_args``: every setting it reads after that is a config field);
    ``run()`` trains and evaluates.

    ``hooks``: periodic work of your own (``icd.engine.hooks.Hook``s), run after the trainer's
    (health check, metrics, checkpoints, evaluation) in the order given; ``register_hook`` adds
    more before ``run()``.
    """

    diverging = "the student"

    def __init__(self, args: argparse.Namespace, hooks: Iterable[Hook] = ()) -> None:
        super().__init__(hooks)
        self.args = args  # saved in checkpoints as ``args`` (older icds read it); the engine reads config
        self.config = RunConfig.from_args(args, "train")  # everything a run reads, built once
        distill = self.config.distill
        # checked before anything is built, against the student's family's parts
        self.inherit_parts = parse_parts(
            distill.inherit_teacher, family_of(self.config.model.detector).inheritable_parts
        )
        if self.inherit_parts and not distill.teacher:
            raise ConfigError(f"--inherit-teacher {distill.inherit_teacher} needs --teacher")
        if distill.teacher and distill.method == "none" and not self.inherit_parts:
            raise ConfigError(
                f"--teacher {distill.teacher} --distill none: the teacher would not be used; add "
                "--inherit-teacher neck,head (inheritance only) or leave --teacher out (a baseline)"
            )
        from icd.engine.distributed import resolve_device

        check_speed_flags(self.config.speed, distill, resolve_device(self.config.loop.device))
        # another run's files there, or a live run in it, stop this one before anything is built;
        # rank 0 holds the folder (its lock) until close()
        self.claim = (
            claim_output_dir(self.config.loop.output_dir, self.config.loop.resume, self.config.loop.overwrite)
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
        loop, model, speed = self.config.loop, self.config.model, self.config.speed
        self.info: DistInfo = init_distributed(loop.device)
        seed_everything(loop.seed)
        self._build_data()
        num_classes = self.train_set.num_classes
        self.family = family_of(model.detector)
        self.spec = detector_spec_from_args(model.values(), num_classes)
        if getattr(self.spec, "norm", None) == "frozen_bn" and not model.backbone_weights and self.info.is_main:
            log.warning(
                "frozen_bn without --backbone-weights: the backbone's BatchNorm layers stay at identity "
                "and its weights start random; give ImageNet weights, or --norm gn to train from scratch"
            )
        if speed.amp and self.info.device.type == "cpu" and self.info.is_main:
            log.warning(
                "--amp on the CPU: %s autocast makes torchvision's detectors slower there, not faster "
                "(a RetinaNet R18 step took 5.9x the CPU time of float32 in bfloat16, docs/nn.md); leave --amp "
                "for CUDA", speed.amp_dtype or "bfloat16",
            )
        backbone = None  # ImageNet weights of the ResNet body, read like every checkpoint file
        if model.backbone_weights:
            backbone = state_dict_entry(load_checkpoint(model.backbone_weights, "--backbone-weights"),
                                        "--backbone-weights", model.backbone_weights)  # fmt: skip
        self.model = self.family.build(self.spec, backbone, f"--backbone-weights {model.backbone_weights}")
        self.model.to(self.info.device)
        sampler = ResumableSampler(self.train_set, self.info.world_size, self.info.rank, shuffle=True, seed=loop.seed)
        self.batches = EpochBatches(
            self.train_set, sampler, loop.batch_size, loop.workers, loop.seed,
            pin_memory=self.info.device.type == "cuda", progress=self.info.is_main and loop.progress,
        )
        self.total_iters, self.num_epochs = run_length(loop, self.batches.per_epoch)
        self.tap = self.teacher = self.distiller = None
        if self.config.distill.teacher:
            self._build_distillation(num_classes)
        self._build_optimisers()
        self.trained_params = [
            p for group in self._optimisers() for g in group.param_groups for p in g["params"] if p.requires_grad
        ]
        self._teacher_maps: list[torch.Tensor] | None = None
        self.scaler = grad_scaler(self.info.device, speed.amp, speed.amp_dtype)
        self._compile()
        self._wrap_ddp()
        self.metrics = MetricsLog(loop.output_dir, enabled=self.info.is_main)
        self.best: dict | None = None  # {"metric", "value", "epoch", "iter"} of the best evaluation
        self.last_evaluation: dict[str, float] = {}
        self.pending_evaluation: tuple[int, dict | None] | None = None  # (epoch, its checkpoint) to evaluate
        if loop.resume:
            self._resume(loop.resume)

    # -- set-up ------------------------------------------------------------------------------
    def _build_data(self) -> None:
        data, loop, detector = self.config.data, self.config.loop, self.config.model.detector
        train_dir, train_ann = dataset_paths(data.data_path, data.train_split, data.train_ann, data.train_images)
        drop_empty = data.drop_empty_categories
        self.train_set = CocoDetection(
            train_dir,
            train_ann,
            train=True,
            flip_prob=data.flip_prob,
            on_bad_data=loop.on_bad_data,
            seed=loop.seed,
            with_masks=family_of(detector).needs_masks(detector),
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
        if self.config.hooks.evaluate:
            val_dir, val_ann = dataset_paths(data.data_path, data.val_split, data.val_ann, data.val_images, "val")
            classes = self.train_set.category_ids if drop_empty else None  # the val split's empty ones go too
            self.val_set = CocoDetection(val_dir, val_ann, on_bad_data=loop.on_bad_data, categories=classes)

    def _build_distillation(self, num_classes: int) -> None:
        """The frozen teacher, the distiller and the tap on the student (``--distill none``: only
        the --inherit-teacher copy, after which the teacher is released)."""
        distill, info = self.config.distill, self.info
        teacher_flags = {**self.config.model.values(), **distill.values()}  # --teacher-*, the levels, sizes
        self.teacher, teacher_spec = load_teacher(distill.teacher, num_classes, teacher_flags, info.device)
        self.teacher_family = family_of(teacher_spec.detector)
        self.teacher_spec = teacher_spec
        theirs = self.teacher_family.feature_layout(teacher_spec)
        ours = self.family.feature_layout(self.spec)
        if (theirs.levels, theirs.strides) != (ours.levels, ours.strides):
            raise ConfigError(
                f"teacher levels P{list(theirs.levels)} differ from the student's "
                f"P{list(ours.levels)}; pass --min-level/--max-level to match"
            )
        differences = check_teacher_frame(
            self.teacher_family, self.teacher, self.family, _unwrap(self.model), f"--teacher {distill.teacher}"
        )
        for difference in differences:
            if self.info.is_main:
                log.warning(
                    "%s: the teacher reads the student's frame, so it sees the objects at the student's scale, "
                    "not at the one it was trained on (--teacher %s)", difference, distill.teacher,
                )
        if distill.method == "none":
            self._inherit(teacher_spec)
            self.teacher = None  # inheritance only: no teacher forward passes, its memory goes
            return
        settings = distill.settings()  # the method's config (its registry entry's)
        if distill.method == "icd":
            check_icd_heads(settings.heads, min(theirs.channels), distill.teacher)
        warmup = distill.warmup_iters
        if warmup is None:
            warmup = optim.default_warmup_iters(self.total_iters)
        self.distiller = build_distiller(
            **distiller_kwargs(teacher_flags, teacher_spec, num_classes),
            warmup_iters=warmup,
            annotation_file=self.train_set.coco.dataset,  # as checked (bad annotations skipped)
            backend=distill.backend,
            static_shapes=distill.static_shapes,
        ).to(info.device)
        check_static_slots(self.distiller, self.train_set.most_instances, self.train_annotations)
        self.teacher_levels = theirs.names
        if distill.icd_init:
            self._load_icd_init(distill.icd_init, teacher_spec)
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

        method = self.config.distill.method
        if method != "icd":
            raise ConfigError(f"--icd-init {path} needs --distill icd (got --distill {method})")
        expected = teacher_side_signature(self.distiller, teacher_spec, teacher_fingerprint(self.teacher, teacher_spec))
        meta = load_teacher_side(self.distiller, path, expected)
        if self.info.is_main:
            log.info("ICD teacher side from %s (pre-trained %s iterations; attention %s); distillation "
                     "weights at mask temperature %g", path, meta.get("iteration"),
                     {k: round(v, 3) for k, v in meta.get("attention", {}).items() if k in ("lift", "distinctness")},
                     self.distiller.mask_temperature)  # fmt: skip

    def _build_optimisers(self) -> None:
        """SGD over the student and the distiller's student side; AdamW over ICD's teacher side."""
        settings, batch_size = self.config.optim, self.config.loop.batch_size
        total_batch = batch_size * self.info.world_size
        lr = settings.lr if settings.lr is not None else optim.default_lr(self.config.model.detector, total_batch)
        if settings.preset and total_batch != PRESET_IMAGES_PER_ITERATION and self.info.is_main:
            log.warning(
                "--config %s: the presets' lr and schedule are for %d images per iteration; this run has %d "
                "(world size %d x --batch-size %d). Keep %d images, or scale --lr linearly (%.3g here)",
                settings.preset, PRESET_IMAGES_PER_ITERATION, total_batch, self.info.world_size, batch_size,
                PRESET_IMAGES_PER_ITERATION, lr * total_batch / PRESET_IMAGES_PER_ITERATION,
            )
        student_params = list(self.model.parameters())
        projection_by_teacher_side = settings.projection_optimizer == "teacher-side"
        if self.distiller is not None and not projection_by_teacher_side:
            student_params += list(self.distiller.student_side_parameters())
        self.optimizer = optim.student_optimizer(
            student_params, lr, settings.momentum, settings.weight_decay,
            kind=self.family.student_optimizer(self.spec.detector),
        )
        warmup_iters = settings.warmup_iters
        if warmup_iters is None:
            warmup_iters = optim.default_warmup_iters(self.total_iters)
        self.lr_scheduler = optim.student_scheduler(
            self.optimizer, self.total_iters, warmup_iters, settings.lr_steps
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
                self.teacher_optimizer = optim.teacher_side_optimizer(self.teacher_params, settings.teacher_lr)
                self.teacher_lr_scheduler = optim.teacher_side_scheduler(
                    self.teacher_optimizer, self.total_iters
                )

    def _compile(self) -> None:
        """--compile: the student's and the teacher's ResNet + FPN and the distiller, compiled in
        place (state dict keys unchanged); --icd-cuda-graphs: the distiller in mode
        reduce-overhead (CUDA graphs of its forward and backward, fixed shapes)."""
        speed = self.config.speed
        graphs = speed.cuda_graphs
        if speed.compile:
            modules = self.family.compiled_parts(self.model)
            if self.teacher is not None:
                modules += self.teacher_family.compiled_parts(self.teacher)
            if self.distiller is not None and not graphs:
                modules.append(self.distiller)
            compile_in_place(modules, speed.compile_backend or "inductor")
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
            "args": plain_args(self.args),
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
            save_atomic(saved, os.path.join(self.config.loop.output_dir, BEST_CHECKPOINT))
        save_atomic(saved, os.path.join(self.config.loop.output_dir, LAST_CHECKPOINT))

    def _resume(self, path: str) -> None:
        ckpt = load_checkpoint(path, "--resume")
        world_size, train_images = self.info.world_size, len(self.train_set)
                # the checkpoint's config (of icd train, one this icd reads) against this run's
        check_resume_compatible(ckpt, path, self.config, self.family.spec_to_dict(self.spec), world_size, train_images)
        self.family.load_weights(_unwrap(self.model), ckpt, what="resumed", source=f"--resume {path}")
        self.optimizer.load_state_dict(ckpt["optimizer"])
        self.lr_scheduler.load_state_dict(ckpt["lr_scheduler"])
        if self.distiller is not None:
            if "distiller" not in ckpt:
                raise KeyError(
                    f"--resume {path} has no distiller state; it is not a "
                    f"--distill {self.config.distill.method} run"
                )
            self.distiller.load_state_dict(ckpt["distiller"])
        if self.teacher_optimizer is not None:
            self.teacher_optimizer.load_state_dict(ckpt["teacher_optimizer"])
            self.teacher_lr_scheduler.load_state_dict(ckpt["teacher_lr_scheduler"])
        if self.scaler is not None and "scaler" in ckpt:
            self.scaler.load_state_dict(ckpt["scaler"])
        self.iteration = int(ckpt["iteration"])
        position = int(ckpt.get("epoch_batches", 0))
        if schedule_changes(ckpt, self.config, world_size, train_images):  # --allow-resume-changes
            self._apply_new_schedule()
            loop = self.config.loop
            position, note = resumed_position(ckpt, loop.batch_size, world_size, train_images, loop.seed)
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
            settings = self.config.optim
            group.update(momentum=settings.momentum, weight_decay=settings.weight_decay, initial_lr=lr)
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
    def _named_checked_parameters(self) -> list[tuple[str, torch.Tensor]]:
        named = list(_unwrap(self.model).named_parameters())
        if self.distiller is not None:
            named += [(f"distiller.{n}", p) for n, p in self.distiller.named_parameters()]
        return named

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
            f"the teacher's FPN outputs are {found} (--teacher {self.config.distill.teacher}): the teacher, not "
            "the student, is at fault" + (" (float16 overflow? try without --amp)" if self.config.speed.amp else "")
        )

    def _check_teacher_maps(self, maps: list[torch.Tensor]) -> None:
        """NonFiniteError blaming the teacher when its maps of this batch are unusable (CPU runs)."""
        fault = self._teacher_maps_fault(maps)
        if fault is not None:
            raise NonFiniteError(f"iteration {self.iteration + 1}: {fault}; nothing non-finite was checkpointed")

    # -- one iteration -----------------------------------------------------------------------
    def _losses(self, images: list[torch.Tensor], targets: list[dict]) -> dict[str, torch.Tensor]:
        speed = self.config.speed
        graphs = speed.cuda_graphs
        with autocast(self.info.device, speed.amp, speed.amp_dtype):
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
                record = {loss_key(k): float(v.detach()) for k, v in losses.items()}
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
            torch.nn.utils.clip_grad_norm_(self.teacher_params, self.config.optim.teacher_clip)
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
        self.record_step(losses, total, teacher_peak)

    @contextlib.contextmanager
    def _compile_errors(self):
        """torch.compile's code-generation failures as one line naming --compile."""
        try:
            yield
        except Exception as err:
            failed = compile_error(err, self.config.speed.compile_backend or "inductor")
            if failed is not None:
                raise failed from err
            raise

    # -- the run -------------------------------------------------------------------------------
    def default_hooks(self, stop_at: int) -> list[Hook]:
        """Health check, "train" metrics lines, checkpoints, and evaluation when there is a val split."""
        settings = self.config.hooks
        hooks = [
            HealthCheck(settings.health_window, stop=settings.on_unhealthy == "stop"),
            TrainMetrics(self.config.loop.print_freq, last=stop_at),
            PeriodicCheckpoint(settings.checkpoint_every, settings.epoch_checkpoint_every),
        ]
        if self.val_set is not None:
            hooks.append(PeriodicEvaluation(settings.eval_every))
        return hooks

    def before_train(self) -> bool:
        """The evaluation a killed run left pending (its checkpoint says which epoch's), first."""
        evaluated = self.pending_evaluation is not None and self.val_set is not None
        if evaluated:
            epoch, saved = self.pending_evaluation
            if self.info.is_main:
                log.info("the evaluation after epoch %d was interrupted: evaluating that state first", epoch)
            self.run_evaluation(epoch, saved)
        self.pending_evaluation = None
        return evaluated

    def after_train(self, start_iter: int, evaluated: bool) -> dict[str, float]:
        """The last evaluation's metrics; NothingDoneError when the run neither trained nor evaluated."""
        if self.iteration == start_iter and not evaluated:
            raise NothingDoneError(
                f"--resume {self.config.loop.resume} is at iteration {self.iteration} and this run stops at iteration "
                f"{self.stop_at()}: nothing to train; raise --stop-after-iters to go on (a longer --iters or "
                "--epochs changes the lr schedule: add --allow-resume-changes)"
            )
        return self.last_evaluation

    def train_mode(self) -> None:
        self.model.train()

    def run_evaluation(self, epoch: int, saved: dict | None = None) -> dict[str, float]:
        """Evaluate on the val split and log it; a new best AP also writes model_best.pth from
        ``saved``, the checkpoint of this very state (rank 0)."""
        loop = self.config.loop
        loader = eval_loader(self.val_set, self.info, loop.batch_size, loop.workers)
        metrics = evaluate(
            _unwrap(self.model),
            loader,
            self.val_set,
            self.info,
            family=self.family,
            spec=self.spec,
            amp=self.config.speed.amp,
            amp_dtype=self.config.speed.amp_dtype,
            output_dir=loop.output_dir,
            split=self.config.data.val_split,
            progress=loop.progress,
        )
        distill = self.config.distill
        if distill.teacher and distill.method == "icd" and self.info.is_main:
            from icd.engine.attention import attention_statistics

            detailed = distill.attention_detail
            metrics.update(
                attention_statistics(self.distiller, self.teacher, self.val_set, self.teacher_levels,
                                     detailed=detailed, teacher_spec=self.teacher_spec, auxiliary=True)  # fmt: skip
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
        super().close()
        if self.tap is not None:
            self.tap.remove()
        cleanup(self.info)
        self._release_claim()

    def _release_claim(self) -> None:
        if self.claim is not None:
            self.claim.release()


def train(args: argparse.Namespace, hooks: Iterable[Hook] = ()) -> dict[str, float]:
    """Train as ``icd train`` does (with ``hooks`` of your own after the trainer's); returns the
    last evaluation's metrics ({} without one)."""
    trainer = Trainer(args, hooks)
    try:
        return trainer.run()
    finally:
        trainer.close()
