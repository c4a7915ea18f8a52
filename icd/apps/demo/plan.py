"""The runs of a demo: each one's ``icd train`` / ``icd pretrain`` arguments, length and the runs it waits for."""

from __future__ import annotations

import math
import os
import subprocess
from dataclasses import dataclass
from typing import IO

from icd.apps.demo.settings import DemoConfig

RUN_NAMES = ("teacher", "baseline", "fpn_mse", "icd")  # the runs of the results table
PRETRAIN_RUN = "icd_pretrain"  # ICD's teacher side on the finished teacher, before the icd run
PRETRAIN_ITERS = 600  # --pretrain-iters without a value


@dataclass
class Run:
    """One ``python -m icd`` process of the demo (its state is filled in by the scheduler)."""

    name: str
    title: str
    argv: list[str]
    total_iters: int
    needs: tuple[str, ...] = ()
    all_threads: bool = False  # one job slot, with every slot's threads (the teacher: all wait for it)
    process: subprocess.Popen | None = None
    log_file: IO[str] | None = None
    started: float = 0.0
    seconds: float = 0.0
    reused: bool = False
    slot: int = -1  # the job slot it runs in (the scheduler's)

    def stamp(self, cfg: DemoConfig) -> dict:
        """What a reused run must match: its arguments (paths relative to ``cfg.out_dir``) and the
        data settings (``cfg`` a DemoConfig or a StudyConfig); :func:`icd.apps.demo.stamps.run_id`
        is its hash."""
        argv = [a.replace(cfg.out_dir, "{out}", 1) if a.startswith(cfg.out_dir) else a
                for a in self.argv]  # fmt: skip
        return {"argv": argv, "data": cfg.data_settings()}


def train_argv(cfg: DemoConfig, name: str) -> list[str]:
    """The ``icd train`` arguments of one run (``--output-dir`` included)."""
    teacher = name == "teacher"
    epochs = cfg.teacher_epochs if teacher else cfg.student_epochs
    argv = [
        "train",
        "--data-path", cfg.data_dir,
        "--output-dir", cfg.run_dir(name),
        "--detector", cfg.detector,
        "--backbone", cfg.teacher_backbone if teacher else cfg.student_backbone,
        "--fpn-channels", str(cfg.teacher_channels if teacher else cfg.student_channels),
        "--min-size", str(cfg.image_size),
        "--max-size", str(cfg.image_size),
        "--batch-size", str(cfg.batch_size),
        "--lr", str(cfg.lr),
        "--epochs", str(epochs),
        "--eval-every", str(epochs if teacher else 1),  # the teacher: once, at its end
        "--seed", str(cfg.seed if teacher or cfg.student_seed is None else cfg.student_seed),
        "--workers", "0",
        "--device", "cpu",
        "--print-freq", "5",
        "--epoch-checkpoint-every", "0",
        "--no-progress",
    ]  # fmt: skip
    if teacher and not cfg.teacher_lr_decay:
        argv += ["--lr-steps", str(epochs * iterations_per_epoch(cfg))]
    if name in ("icd", "fpn_mse"):
        argv += ["--teacher", os.path.join(cfg.run_dir("teacher"), "checkpoint.pth")]
        argv += ["--distill", "icd" if name == "icd" else "fpn-mse"]
        weight = cfg.icd_weight if name == "icd" else cfg.fpn_mse_weight
        if weight is not None:
            argv += ["--distill-weight", str(weight)]
        if name == "icd" and cfg.distill_warmup_iters is not None:
            argv += ["--distill-warmup-iters", str(cfg.distill_warmup_iters)]
        if name == "icd" and cfg.pretrain_iters:
            argv += ["--icd-init", os.path.join(cfg.run_dir(PRETRAIN_RUN), "teacher_side.pth")]
    return argv + list(cfg.extra_train_flags)


def pretrain_argv(cfg: DemoConfig) -> list[str]:
    """The ``icd pretrain`` arguments of the teacher-side pre-training run."""
    return [
        "pretrain",
        "--data-path", cfg.data_dir,
        "--output-dir", cfg.run_dir(PRETRAIN_RUN),
        "--teacher", os.path.join(cfg.run_dir("teacher"), "checkpoint.pth"),
        "--min-size", str(cfg.image_size),
        "--max-size", str(cfg.image_size),
        "--batch-size", str(cfg.batch_size),
        "--iters", str(cfg.pretrain_iters),
        "--eval-every", str(max(1, cfg.pretrain_iters // 6)),
        "--seed", str(cfg.seed if cfg.student_seed is None else cfg.student_seed),
        "--workers", "0",
        "--device", "cpu",
        "--print-freq", "5",
        "--no-progress",
    ]  # fmt: skip


def iterations_per_epoch(cfg: DemoConfig) -> int:
    return math.ceil(cfg.num_train / cfg.batch_size)


def plan_runs(cfg: DemoConfig) -> list[Run]:
    """The demo's runs in the order they start (the teacher first)."""
    iters_per_epoch = iterations_per_epoch(cfg)
    titles = {
        "teacher": f"teacher {cfg.teacher_backbone} FPN {cfg.teacher_channels}",
        "baseline": f"student {cfg.student_backbone} FPN {cfg.student_channels}",
        "fpn_mse": f"{cfg.student_backbone} + FPN-MSE",
        "icd": f"{cfg.student_backbone} + ICD",
    }
    runs = {}
    for name in RUN_NAMES:
        epochs = cfg.teacher_epochs if name == "teacher" else cfg.student_epochs
        needs = ("teacher",) if name in ("icd", "fpn_mse") else ()
        if name == "icd" and cfg.pretrain_iters:
            needs += (PRETRAIN_RUN,)
        runs[name] = Run(name, titles[name], train_argv(cfg, name), epochs * iters_per_epoch, needs,
                         all_threads=name == "teacher")  # fmt: skip
    if cfg.pretrain_iters:
        runs[PRETRAIN_RUN] = Run(PRETRAIN_RUN, "ICD teacher side", pretrain_argv(cfg), cfg.pretrain_iters,
                                 ("teacher",))  # fmt: skip
    # the order runs start in: the teacher, with every slot's threads, and beside it the baseline,
    # which needs no teacher (the cores the teacher's threads leave idle are the baseline's: 558 s
    # against 658 s for the whole demo with the baseline after the teacher, results/README.md);
    # then the pre-training beside FPN-MSE, and ICD once the pre-training is done
    order = ["teacher", "baseline", PRETRAIN_RUN, "fpn_mse", "icd"]
    return [runs[name] for name in order if name in runs]
