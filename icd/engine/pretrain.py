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
lift / distinctness / the auxiliary task's real/fake AUC per evaluation: a teacher side whose
``aux_auc`` is still near 0.5 does not tell its instances apart yet, docs/training.md) and
``attention_curve.png``.

``Pretrainer`` is a step strategy of the one training loop (``icd.engine.loop.Loop``, shared with
``icd train``): its ``step`` is one AdamW step of the teacher side on the auxiliary losses; its
hooks write the "pretrain" lines (``PretrainMetrics``) and evaluate the attention, keep the best
teacher side and checkpoint (``AttentionEvaluation``); resume, the non-finite guard, Ctrl-C,
TensorBoard and the progress bars are the loop's. Its settings are ``config.pretrain`` and
``config.loop`` (``icd.engine.run_config``).
"""

from __future__ import annotations

import argparse
import hashlib
import logging
import math
import os
import time
from collections.abc import Iterable, Mapping
from typing import Any

import torch
from torch import nn
from tqdm import tqdm

from icd.data.coco import CocoDetection, dataset_paths, report_categories
from icd.detection.adapters import family_of
from icd.engine import optim
from icd.engine.attention import attention_statistics
from icd.engine.batches import EpochBatches
from icd.engine.checkpoint import (
    capture_rng_state,
    load_checkpoint,
    plain_args,
    restore_rng_state,
    save_atomic,
    seed_everything,
)
from icd.engine.distill import build_distiller, check_icd_heads, check_static_slots
from icd.engine.distributed import DistInfo
from icd.engine.feature_cache import TeacherFeatureCache
from icd.engine.loop import EpochEnd, Hook, Loop
from icd.engine.metrics import MetricsLog, read_metrics
from icd.engine.output_dir import claim_output_dir
from icd.engine.run_config import RunConfig
from icd.engine.run_spec import distiller_kwargs, load_teacher
from icd.engine.sampler import ResumableSampler
from icd.errors import CheckpointError, ConfigError

log = logging.getLogger("icd.pretrain")

TEACHER_SIDE_FILE = "teacher_side.pth"
TEACHER_SIDE_PREFIXES = ("encoder.", "decoder.", "aux_task.")
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


class PretrainMetrics(Hook):
    """A "pretrain" line in metrics.jsonl (the auxiliary losses, lr, CPU seconds) every ``every``
    iterations and at iteration ``last`` (--iters); the losses on the progress bar."""

    def __init__(self, every: int, last: int) -> None:
        self.every, self.last = every, last

    def after_losses(self, loop: Loop, iteration: int, record: dict[str, float]) -> None:
        if iteration % self.every != 0 and iteration != self.last:
            return
        losses = {k: v for k, v in record.items() if k != "loss"}  # the lines hold each loss, no sum
        loop.metrics.write({"type": "pretrain", "iter": iteration, "cpu_s": round(time.process_time(), 2),
                            "lr": loop.optimizer.param_groups[0]["lr"], **losses})  # fmt: skip
        loop.batches.show(conf=f"{record['loss_aux_conf']:.3f}", reg=f"{record['loss_aux_reg']:.3f}")


class AttentionEvaluation(Hook):
    """Every ``every`` iterations, at --iters and where the run stops: the attention statistics
    (``Pretrainer.evaluate``, which keeps the best teacher side), then checkpoint.pth; a stop
    between evaluations (Ctrl-C) writes checkpoint.pth alone."""

    def __init__(self, every: int, last: int, stop_at: int) -> None:
        self.every, self.due = every, {last, stop_at}

    def after_step(self, loop: Pretrainer) -> None:
        if loop.iteration % self.every == 0 or loop.iteration in self.due:
            loop.deliver_losses()  # a non-finite step stops the run before its teacher side is kept
            stats = loop.evaluate()
            loop.save(loop.batches.epoch, loop.batches.position)
            tqdm.write(f"iter {loop.iteration}: lift {stats.get('lift', float('nan')):.2f} "
                       f"distinctness {stats.get('distinctness', float('nan')):.3f} "
                       f"real/fake AUC {stats.get('aux_auc', float('nan')):.2f}")  # fmt: skip

    def after_epoch(self, loop: Loop, end: EpochEnd) -> None:
        if not end.stopped or loop.saved_iteration == loop.iteration:
            return
        if end.finished:  # the next run goes on with the next epoch
            loop.save(end.epoch + 1, 0)
        else:
            loop.save(end.epoch, end.batches)


class Pretrainer(Loop):
    """Builds the frozen teacher, the data and ICD's teacher side from ``icd pretrain`` args; a
    step strategy of the one training loop (``icd.engine.loop``): ``run()`` pre-trains.

    ``hooks``: periodic work of your own (``icd.engine.hooks.Hook``s), run after the pre-training's
    (``PretrainMetrics``, ``AttentionEvaluation``) in the order given.
    """

    def __init__(self, args: argparse.Namespace, hooks: Iterable[Hook] = ()) -> None:
        super().__init__(hooks)
        self.config = RunConfig.from_args(args, "pretrain")  # its settings checked before anything is built
        self.args = args
        # another run's folder (a teacher's, another pre-training's) is refused before anything is built
        loop = self.config.loop
        self.claim = claim_output_dir(loop.output_dir, loop.resume, loop.overwrite, "pretrain")
        self.overwritten = self.claim.overwritten
        try:
            self._set_up()
        except BaseException:
            self.claim.release()
            raise

    def _set_up(self) -> None:
        loop, data, recipe, distill = self.config.loop, self.config.data, self.config.pretrain, self.config.distill
        self.saved_args = plain_args(self.args)  # what checkpoints store (weights_only-loadable)
        self.device = torch.device(loop.device or ("cuda" if torch.cuda.is_available() else "cpu"))
        self.info = DistInfo(device=self.device)  # one process
        seed_everything(loop.seed)
        train_dir, train_ann = dataset_paths(data.data_path, data.train_split, data.train_ann, data.train_images)
        self.train_annotations = train_ann
        drop_empty = data.drop_empty_categories
        self.train_set = CocoDetection(
            train_dir, train_ann, train=True, flip_prob=data.flip_prob,
            on_bad_data=loop.on_bad_data, seed=loop.seed, drop_empty_categories=drop_empty,
        )  # fmt: skip
        report_categories(self.train_set)
        val_dir, val_ann = dataset_paths(data.data_path, data.val_split, data.val_ann, data.val_images, "val")
        classes = self.train_set.category_ids if drop_empty else None
        self.val_set = CocoDetection(val_dir, val_ann, on_bad_data=loop.on_bad_data, categories=classes)
        num_classes = self.train_set.num_classes
        teacher_flags = {**recipe.teacher_flags(), **distill.values()}
        self.teacher, self.teacher_spec = load_teacher(distill.teacher, num_classes, teacher_flags, self.device)
        self.family = family_of(self.teacher_spec.detector)
        # the students' sizes, not the teacher checkpoint's
        self.family.set_input_size(self.teacher, recipe.min_size, recipe.max_size)
        layout = self.family.feature_layout(self.teacher_spec)
        self.level_names = layout.names
        check_icd_heads(distill.settings().heads, min(layout.channels), distill.teacher)
        self.distiller = build_distiller(
            **distiller_kwargs(teacher_flags, self.teacher_spec, num_classes),
            warmup_iters=0,
            annotation_file=train_ann,
            backend=distill.backend,
            static_shapes=distill.static_shapes,
        ).to(self.device)
        check_static_slots(self.distiller, self.train_set.most_instances, train_ann)
        self.signature = teacher_side_signature(
            self.distiller, self.teacher_spec, teacher_fingerprint(self.teacher, self.teacher_spec)
        )
        if not loop.resume:
            # sharper initial logits: the attention starts to single instances out sooner
            with torch.no_grad():
                for layer in self.distiller.decoder.layers:
                    layer.q_proj.weight.mul_(recipe.attention_gain)
        self.params = [p for p in self.distiller.teacher_side_parameters() if p.requires_grad]
        self.trained_params = self.params
        self.optimizer = optim.teacher_side_optimizer(self.params, recipe.lr)
        self.scheduler = optim.teacher_side_scheduler(self.optimizer, recipe.iters)
        sampler = ResumableSampler(self.train_set, 1, 0, shuffle=True, seed=loop.seed)
        self.batches = EpochBatches(
            self.train_set, sampler, loop.batch_size, loop.workers, loop.seed, progress=loop.progress
        )
        self.total_iters, self.num_epochs = recipe.iters, math.inf  # epochs until --iters steps
        self.best_score = -math.inf
        self.last_statistics: dict[str, float] = {}
        self.metrics = MetricsLog(loop.output_dir)
        self.cache = TeacherFeatureCache(int(recipe.cache_gb * 2**30))
        if loop.resume:
            self._resume(loop.resume)

    def state(self, epoch: int, epoch_batches: int) -> dict:
        return {
            "teacher_side": teacher_side_state(self.distiller),
            "optimizer": self.optimizer.state_dict(),
            "lr_scheduler": self.scheduler.state_dict(),
            "iteration": self.iteration,
            "epoch": epoch,
            "epoch_batches": epoch_batches,
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
        RunConfig.from_checkpoint(ckpt, f"--resume {path}", "pretrain")  # one this icd reads, of icd pretrain
        check_signature(ckpt["signature"], self.signature, path)
        self.distiller.load_state_dict(ckpt["teacher_side"], strict=False)
        self.optimizer.load_state_dict(ckpt["optimizer"])
        self.scheduler.load_state_dict(ckpt["lr_scheduler"])
        self.iteration = int(ckpt["iteration"])
        if "epoch" in ckpt:
            epoch, position = int(ckpt["epoch"]), int(ckpt["epoch_batches"])
        else:  # written before the one loop: one step per batch of a whole number of epochs
            epoch, position = divmod(self.iteration, self.batches.per_epoch)
        self.batches.seek(epoch, position)
        self.best_score = float(ckpt["best_score"])
        restore_rng_state(ckpt["rng"])
        log.info("resumed %s at iteration %d", path, self.iteration)

    def _named_checked_parameters(self) -> list[tuple[str, torch.Tensor]]:
        return [(f"distiller.{n}", p) for n, p in self.distiller.named_parameters() if p.requires_grad]

    def step(self, images: list[torch.Tensor], targets: list[dict]) -> None:
        """One AdamW step of the teacher side on its auxiliary losses (left on the device)."""
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
        self.optimizer.zero_grad(set_to_none=True)
        total.backward()
        torch.nn.utils.clip_grad_norm_(self.params, self.config.pretrain.clip)
        self.optimizer.step()
        self.scheduler.step()
        self.record_step(losses, total)

    def evaluate(self) -> dict[str, float]:
        """Attention statistics on the val split; keeps the teacher side if its score is best."""
        self.distiller.eval()
        stats = attention_statistics(
            self.distiller, self.teacher, self.val_set, self.level_names,
            max_images=self.config.pretrain.attention_images, feature_cache=self.cache,
            detailed=self.config.pretrain.attention_detail, teacher_spec=self.teacher_spec, auxiliary=True,
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
                 "config": self.config.to_dict(), "categories": self.train_set.categories},
                os.path.join(self.config.loop.output_dir, TEACHER_SIDE_FILE),
            )  # fmt: skip
        record["best_score"] = self.best_score
        self.metrics.write(record)
        self.last_statistics = stats
        return stats

    # -- the run on the one loop ---------------------------------------------------------------
    def default_hooks(self, stop_at: int) -> list[Hook]:
        recipe = self.config.pretrain
        return [PretrainMetrics(self.config.loop.print_freq, last=recipe.iters),
                AttentionEvaluation(recipe.eval_every, last=recipe.iters, stop_at=stop_at)]  # fmt: skip

    def train_mode(self) -> None:
        self.distiller.train()

    def before_train(self) -> bool:
        """Where the untrained teacher side looks: the attention curve's start (a fresh run)."""
        if self.iteration != 0:
            return False
        self.distiller.train()
        self.evaluate()
        return True

    def after_train(self, start_iter: int, evaluated: bool) -> dict[str, float]:
        """The last attention statistics; the kept teacher side checked at --iters; the curve drawn."""
        if self.iteration == self.config.pretrain.iters:
            self._check_kept_attention()
        plot_attention_curve(self.config.loop.output_dir)
        return self.last_statistics

    def close(self) -> None:
        """Close the run's files and loader and give the output folder back."""
        super().close()
        self.claim.release()

    def _check_kept_attention(self) -> None:
        """Warn (and write a health line) when the kept teacher side's attention is shared."""
        path = os.path.join(self.config.loop.output_dir, TEACHER_SIDE_FILE)
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


def pretrain(args: argparse.Namespace, hooks: Iterable[Hook] = ()) -> dict[str, float]:
    """Run ``icd pretrain`` (with ``hooks`` of your own after its own); returns the last attention
    statistics."""
    pretrainer = Pretrainer(args, hooks)
    try:
        return pretrainer.run()
    finally:
        pretrainer.close()
