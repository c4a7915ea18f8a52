"""Teacher-side pre-training: ICD's encoder, decoder and auxiliary head trained on the frozen
teacher alone, before and apart from any student.

ICD's teacher side learns only from its auxiliary task (real vs fake instances, box
regression from a jittered centre), which needs nothing but the teacher's FPN maps. Trained
inside a short student run with the paper's recipe (AdamW 1e-4, gradient-norm clip 0.01, made
for 90k iterations) it has not yet learnt where each instance should look when the student's
distillation loss starts to matter. ``icd pretrain`` trains it first, once per teacher; every
student of that teacher then starts from the file with ``icd train --icd-init``::

    icd pretrain --data-path DATA --teacher runs/teacher/checkpoint.pth --output-dir runs/icd_init
    icd train --data-path DATA ... --teacher runs/teacher/checkpoint.pth --distill icd \\
        --icd-init runs/icd_init/teacher_side.pth

Output directory: ``checkpoint.pth`` (the whole state, for ``--resume``), ``teacher_side.pth``
(the teacher-side weights of the evaluation with the best attention score, lift x
distinctness, with the teacher signature they belong to), ``metrics.jsonl`` (aux losses, and
lift / distinctness per evaluation) and ``attention_curve.png``.
"""

from __future__ import annotations

import argparse
import hashlib
import logging
import math
import os
import time
from collections.abc import Mapping
from typing import Any

import torch
from torch import nn
from torch.utils.data import DataLoader
from tqdm import tqdm

from icd.data.coco import CocoDetection, collate, dataset_paths, report_categories
from icd.detection.adapters import family_of
from icd.engine import optim
from icd.engine.attention import attention_statistics
from icd.engine.checkpoint import capture_rng_state, load_checkpoint, restore_rng_state, save_atomic
from icd.engine.distill import build_distiller, check_icd_heads, check_static_slots
from icd.engine.feature_cache import TeacherFeatureCache
from icd.engine.interrupt import StopRequest
from icd.engine.metrics import MetricsLog, read_metrics
from icd.engine.output_dir import claim_output_dir, remove_previous_run
from icd.engine.run_spec import distiller_kwargs
from icd.engine.sampler import ResumableSampler
from icd.errors import CheckpointError, ConfigError, InterruptedRun

log = logging.getLogger("icd.pretrain")

TEACHER_SIDE_FILE = "teacher_side.pth"
LAST_CHECKPOINT = "checkpoint.pth"
TEACHER_SIDE_PREFIXES = ("encoder.", "decoder.", "aux_task.")
# Chosen by measurement on the shapes data (results/README.md): the paper's AdamW 1e-4 with a
# 0.01 norm clip leaves the attention nearly uniform for thousands of iterations; 1e-3 with a
# 1.0 clip and the query projection x4 at the start reached lift > 3, distinctness > 0.3.
PRETRAIN_LR = 1e-3
PRETRAIN_CLIP = 1.0
PRETRAIN_ATTENTION_GAIN = 4.0
# Below this distinctness the kept teacher side does not single instances out: measured runs
# either reach 0.2-0.4 or collapse onto a few locations every instance of an image shares
# (0.01-0.08, with each head's peak at 0.8-0.99; results/README.md).
SHARED_ATTENTION_DISTINCTNESS = 0.1


# --- the file every student of a teacher can start from ----------------------------------------


def teacher_fingerprint(teacher: nn.Module, teacher_spec: Any) -> str:
    """sha256 of the weights that make the teacher's distilled maps (what ICD's teacher side reads:
    its family's ``feature_module``, torchvision's backbone + FPN), 16 hex."""
    digest = hashlib.sha256()
    module = family_of(teacher_spec.detector).feature_module(teacher)
    for name, tensor in sorted(module.state_dict().items()):
        digest.update(name.encode())
        digest.update(tensor.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()[:16]


# signature entries that files of earlier versions lack, at the value those versions had
SIGNATURE_DEFAULTS = {"position_scale": 1.0}


def teacher_side_signature(distiller: nn.Module, teacher_spec: Any, fingerprint: str) -> dict:
    """What a teacher side is only valid for: the teacher and the distiller's shape."""
    return {
        "num_classes": int(distiller.num_classes),
        "channels": int(distiller.channels),
        "heads": int(distiller.heads),
        "num_layers": len(distiller.decoder.layers),
        "levels": list(family_of(teacher_spec.detector).feature_layout(teacher_spec).levels),
        "teacher": fingerprint,
        "position_scale": float(getattr(distiller, "position_scale", 1.0)),
    }


def teacher_side_state(distiller: nn.Module) -> dict[str, torch.Tensor]:
    """The encoder, decoder and auxiliary head entries of ``distiller.state_dict()``."""
    return {
        k: v.detach().clone()
        for k, v in distiller.state_dict().items()
        if k.startswith(TEACHER_SIDE_PREFIXES)
    }


def check_signature(found: Mapping, expected: Mapping, path: str) -> None:
    """ValueError naming every entry where a teacher-side file does not fit this run."""
    found = {**SIGNATURE_DEFAULTS, **found}  # files written before an entry existed
    wrong = [
        f"{key} {found.get(key)!r} (this run: {expected[key]!r})"
        for key in expected
        if found.get(key) != expected[key]
    ]
    if wrong:
        what = "another teacher" if found.get("teacher") != expected["teacher"] else "another set-up"
        raise ConfigError(
            f"--icd-init {path} was pre-trained for {what}: " + "; ".join(wrong)
            + ". Pre-train for this teacher with `icd pretrain --teacher ...`"
        )


def load_teacher_side(distiller: nn.Module, path: str, expected_signature: Mapping) -> dict:
    """Load a ``teacher_side.pth`` into ``distiller`` after checking it fits; returns its metadata."""
    blob = load_checkpoint(path, "--icd-init")
    if "teacher_side" not in blob or "signature" not in blob:
        raise ConfigError(
            f"--icd-init {path} is not a teacher-side file of `icd pretrain` "
            f"(keys: {sorted(blob)[:8]}); expected {TEACHER_SIDE_FILE} of a pretrain output dir"
        )
    check_signature(blob["signature"], expected_signature, path)
    missing, unexpected = distiller.load_state_dict(blob["teacher_side"], strict=False)
    missing = [k for k in missing if k.startswith(TEACHER_SIDE_PREFIXES)]
    if missing or unexpected:
        raise ConfigError(f"--icd-init {path}: missing entries {missing}, unexpected {unexpected}")
    return {k: v for k, v in blob.items() if k != "teacher_side"}


def attention_score(stats: Mapping[str, float]) -> float:
    """lift x distinctness: high when each instance looks at its own box and not where the
    others of its image look."""
    return float(stats.get("lift", 0.0)) * float(stats.get("distinctness", 0.0))


# --- the pre-training run ----------------------------------------------------------------------


class Pretrainer:
    """Builds the frozen teacher, the data and ICD's teacher side from ``icd pretrain`` args."""

    def __init__(self, args: argparse.Namespace) -> None:
        for flag in ("iters", "eval_every", "print_freq", "batch_size", "stop_after_iters"):
            value = getattr(args, flag)
            if value is not None and value < 1:
                raise ConfigError(f"--{flag.replace('_', '-')} {value}: expected >= 1")
        if not (math.isfinite(args.lr) and args.lr > 0) or not (math.isfinite(args.clip) and args.clip > 0):
            raise ConfigError(f"--lr {args.lr} / --clip {args.clip}: expected finite positive numbers")
        self.args = args
        # another run's folder (a teacher's, another pre-training's) is refused before anything is built
        self.claim = claim_output_dir(args.output_dir, args.resume, getattr(args, "overwrite", False), "pretrain")
        try:
            self._set_up()
        except BaseException:
            self.claim.release()
            raise

    def _set_up(self) -> None:
        args = self.args
        from icd.engine.trainer import _plain_args, load_teacher, seed_everything

        self.saved_args = _plain_args(args)  # what checkpoints store (weights_only-loadable)
        self.device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
        seed_everything(args.seed)
        train_dir, train_ann = dataset_paths(
            args.data_path, args.train_split, getattr(args, "train_ann", None), getattr(args, "train_images", None)
        )
        drop_empty = getattr(args, "drop_empty_categories", False)
        self.train_set = CocoDetection(
            train_dir, train_ann, train=True, flip_prob=args.flip_prob,
            on_bad_data=args.on_bad_data, seed=args.seed, drop_empty_categories=drop_empty,
        )  # fmt: skip
        report_categories(self.train_set)
        val_dir, val_ann = dataset_paths(args.data_path, args.val_split, args.val_ann, args.val_images, "val")
        classes = self.train_set.category_ids if drop_empty else None
        self.val_set = CocoDetection(val_dir, val_ann, on_bad_data=args.on_bad_data, categories=classes)
        num_classes = self.train_set.num_classes
        self.teacher, self.teacher_spec = load_teacher(args.teacher, num_classes, args, self.device)
        self.family = family_of(self.teacher_spec.detector)
        # the students' sizes, not the teacher checkpoint's
        self.family.set_input_size(self.teacher, args.min_size, args.max_size)
        layout = self.family.feature_layout(self.teacher_spec)
        self.level_names = layout.names
        check_icd_heads(args.icd_heads, min(layout.channels), args.teacher)
        self.distiller = build_distiller(
            **distiller_kwargs(vars(args), self.teacher_spec, num_classes),
            warmup_iters=0,
            annotation_file=train_ann,
            backend=args.icd_backend,
            static_shapes=args.icd_static_shapes,
        ).to(self.device)
        check_static_slots(self.distiller, self.train_set.most_instances, train_ann)
        self.signature = teacher_side_signature(
            self.distiller, self.teacher_spec, teacher_fingerprint(self.teacher, self.teacher_spec)
        )
        if not args.resume:
            # sharper initial logits: the attention starts to single instances out sooner
            with torch.no_grad():
                for layer in self.distiller.decoder.layers:
                    layer.q_proj.weight.mul_(args.attention_gain)
        self.params = [p for p in self.distiller.teacher_side_parameters() if p.requires_grad]
        self.optimizer = optim.teacher_side_optimizer(self.params, args.lr)
        self.scheduler = optim.teacher_side_scheduler(self.optimizer, args.iters)
        self.sampler = ResumableSampler(self.train_set, 1, 0, shuffle=True, seed=args.seed)
        self.iters_per_epoch = math.ceil(len(self.sampler) / args.batch_size)
        self.iteration = 0
        self.best_score = -math.inf
        self.metrics = MetricsLog(args.output_dir)
        self.cache = TeacherFeatureCache(int(args.cache_gb * 2**30))
        if args.resume:
            self._resume(args.resume)

    def state(self) -> dict:
        return {
            "teacher_side": teacher_side_state(self.distiller),
            "optimizer": self.optimizer.state_dict(),
            "lr_scheduler": self.scheduler.state_dict(),
            "iteration": self.iteration,
            "best_score": self.best_score,
            "signature": self.signature,
            "categories": self.train_set.categories,
            "args": self.saved_args,
            "rng": capture_rng_state(),
        }

    def _resume(self, path: str) -> None:
        ckpt = load_checkpoint(path, "--resume")
        needed = ("teacher_side", "signature", "optimizer", "lr_scheduler", "iteration", "rng")
        missing = [k for k in needed if k not in ckpt]
        if missing:
            raise CheckpointError(
                f"--resume {path}", f"is not a checkpoint.pth of icd pretrain (no {', '.join(missing)})"
            )
        check_signature(ckpt["signature"], self.signature, path)
        self.distiller.load_state_dict(ckpt["teacher_side"], strict=False)
        self.optimizer.load_state_dict(ckpt["optimizer"])
        self.scheduler.load_state_dict(ckpt["lr_scheduler"])
        self.iteration = int(ckpt["iteration"])
        self.best_score = float(ckpt["best_score"])
        restore_rng_state(ckpt["rng"])
        log.info("resumed %s at iteration %d", path, self.iteration)

    def _batches(self):
        """(images, targets) from the current iteration on, epoch after epoch."""
        while True:
            epoch, done = divmod(self.iteration, self.iters_per_epoch)
            self.sampler.set_epoch(epoch, skip=done * self.args.batch_size)
            self.train_set.set_epoch(epoch)
            loader = DataLoader(
                self.train_set,
                batch_size=self.args.batch_size,
                sampler=self.sampler,
                num_workers=self.args.workers,
                collate_fn=collate,
                generator=torch.Generator().manual_seed(self.args.seed + epoch),
            )
            yield from loader

    def step(self, images: list[torch.Tensor], targets: list[dict]) -> dict[str, float]:
        images = [im.to(self.device) for im in images]
        targets = [{"boxes": t["boxes"].to(self.device), "labels": t["labels"].to(self.device)} for t in targets]
        with torch.no_grad():
            # multi-scale resizing as the students see it
            frame = self.family.frame(self.teacher, self.teacher_spec, images, targets, augment=True)
            features = self.cache.features(
                lambda batch: self.family.features(self.teacher, self.teacher_spec, batch), images, frame
            )
        losses = self.distiller.auxiliary_losses(
            features, frame.boxes, frame.labels, frame.image_sizes.to(self.device), frame.padded_size
        )
        total = sum(losses.values())
        if not torch.isfinite(total):
            raise FloatingPointError(
                f"non-finite pre-training loss at iteration {self.iteration + 1}: "
                f"{ {k: float(v) for k, v in losses.items()} }"
            )
        self.optimizer.zero_grad(set_to_none=True)
        total.backward()
        torch.nn.utils.clip_grad_norm_(self.params, self.args.clip)
        self.optimizer.step()
        self.scheduler.step()
        self.iteration += 1
        return {f"loss_{k}": float(v.detach()) for k, v in losses.items()}

    def evaluate(self) -> dict[str, float]:
        """Attention statistics on the val split; keeps the teacher side if its score is best."""
        self.distiller.eval()
        stats = attention_statistics(
            self.distiller, self.teacher, self.val_set, self.level_names,
            max_images=self.args.attention_images, feature_cache=self.cache,
            detailed=getattr(self.args, "attention_detail", False), teacher_spec=self.teacher_spec,
        )  # fmt: skip
        self.distiller.train()
        score = attention_score(stats)
        record = {"type": "attention", "iter": self.iteration, "cpu_s": round(time.process_time(), 2),
                  "score": score, **stats}  # fmt: skip
        if score > self.best_score:
            self.best_score = score
            save_atomic(
                {"teacher_side": teacher_side_state(self.distiller), "signature": self.signature,
                 "iteration": self.iteration, "attention": stats, "args": self.saved_args,
                 "categories": self.train_set.categories},
                os.path.join(self.args.output_dir, TEACHER_SIDE_FILE),
            )  # fmt: skip
        record["best_score"] = self.best_score
        self.metrics.write(record)
        return stats

    def run(self) -> dict[str, float]:
        """Pre-train to --iters; returns the last attention statistics."""
        if self.claim.overwritten:  # before the event file is opened: only the old run's files go
            log.warning("--overwrite: removing the previous run's %s", ", ".join(self.claim.overwritten))
            remove_previous_run(self.claim.overwritten)
        if not getattr(self.args, "tensorboard", False):
            return self._run()
        from icd.engine.tensorboard import TensorBoardLog

        tensorboard = TensorBoardLog(self.args.output_dir, purge_step=self.iteration + 1 if self.args.resume else None)
        self.metrics.sinks.append(tensorboard.write)
        try:
            return self._run()
        finally:
            tensorboard.close()

    def _run(self) -> dict[str, float]:
        args = self.args
        self.distiller.train()
        if self.iteration == 0:
            self.evaluate()  # where the untrained teacher side looks: the curve's start
        bar = tqdm(total=args.iters, initial=self.iteration, desc="icd pretrain",
                   disable=args.no_progress, dynamic_ncols=True)  # fmt: skip
        batches = self._batches()
        stats = {}
        stop_at = min(args.iters, args.stop_after_iters or args.iters)
        with StopRequest() as stop:
            stats = self._train(batches, bar, stop_at, stop)
        bar.close()
        if stop.requested:
            last = os.path.join(args.output_dir, LAST_CHECKPOINT)
            save_atomic(self.state(), last)
            raise InterruptedRun(
                f"interrupted (Ctrl-C) at iteration {self.iteration}: checkpoint written; continue with --resume {last}"
            )
        if self.iteration == args.iters:
            self._check_kept_attention()
        plot_attention_curve(args.output_dir)
        return stats

    def _train(self, batches, bar: tqdm, stop_at: int, stop: StopRequest) -> dict[str, float]:
        """Steps up to ``stop_at`` (or a Ctrl-C), evaluating and checkpointing every --eval-every."""
        args, stats = self.args, {}
        while self.iteration < stop_at and not stop.requested:
            images, targets = next(batches)
            if not images:
                continue
            record = self.step(images, targets)
            bar.update(1)
            if self.iteration % args.print_freq == 0 or self.iteration == args.iters:
                self.metrics.write({"type": "pretrain", "iter": self.iteration, "cpu_s": round(time.process_time(), 2),
                                    "lr": self.optimizer.param_groups[0]["lr"], **record})  # fmt: skip
                bar.set_postfix(conf=f"{record['loss_aux_conf']:.3f}", reg=f"{record['loss_aux_reg']:.3f}")
            if self.iteration % args.eval_every == 0 or self.iteration in (args.iters, stop_at):
                stats = self.evaluate()
                save_atomic(self.state(), os.path.join(args.output_dir, LAST_CHECKPOINT))
                bar.write(f"iter {self.iteration}: lift {stats.get('lift', float('nan')):.2f} "
                          f"distinctness {stats.get('distinctness', float('nan')):.3f}")  # fmt: skip
        return stats

    def _check_kept_attention(self) -> None:
        """Warn (and write a health line) when the kept teacher side's attention is shared."""
        path = os.path.join(self.args.output_dir, TEACHER_SIDE_FILE)
        if not os.path.exists(path):
            return
        kept = load_checkpoint(path)  # the evaluation evaluate() chose, with its statistics
        stats = kept["attention"]
        distinctness = float(stats.get("distinctness", 0.0))
        if distinctness >= SHARED_ATTENTION_DISTINCTNESS:
            return
        self.metrics.write({"type": "health", "iter": kept["iteration"], "loss": "attention", "problem": "shared",
                            "value": distinctness})  # fmt: skip
        log.warning(
            "the kept teacher side (iteration %d: lift %.2f, distinctness %.3f, peak %.2f) does not single "
            "instances out: the instances of an image attend to the same few locations. Another --seed, "
            "a lower --lr or --attention-gain, or more --iters may get out of it (results/README.md)",
            kept["iteration"], stats.get("lift", float("nan")), distinctness, stats.get("peak", float("nan")),
        )  # fmt: skip


def plot_attention_curve(run_dir: str, out_path: str | None = None) -> str:
    """Lift and distinctness against pre-training iterations, as a PNG beside metrics.jsonl."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    records = [r for r in read_metrics(run_dir) if r.get("type") == "attention"]
    by_iter = {r["iter"]: r for r in records}
    iters = sorted(by_iter)
    fig, axes = plt.subplots(1, 2, figsize=(9, 3.4))
    for ax, name in zip(axes, ("lift", "distinctness"), strict=True):
        ax.plot(iters, [by_iter[i].get(name, float("nan")) for i in iters], marker="o", label="all levels")
        levels = sorted({k for r in records for k in r if k.startswith(name + "_P")})
        for key in levels:
            ax.plot(iters, [by_iter[i].get(key, float("nan")) for i in iters], alpha=0.5, label=key[len(name) + 1:])
        ax.set_xlabel("pre-training iteration")
        ax.set_title(name)
        ax.grid(alpha=0.3)
    axes[0].axhline(1.0, color="grey", linestyle=":", linewidth=1)
    axes[0].legend(fontsize=7)
    fig.tight_layout()
    out_path = out_path or os.path.join(run_dir, "attention_curve.png")
    fig.savefig(out_path, dpi=90)
    plt.close(fig)
    return out_path


def pretrain(args: argparse.Namespace) -> dict[str, float]:
    """Run ``icd pretrain``; returns the last attention statistics."""
    pretrainer = Pretrainer(args)
    try:
        return pretrainer.run()
    finally:
        pretrainer.claim.release()
