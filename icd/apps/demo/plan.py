"""The runs of a demo: each one's ``icd train`` / ``icd pretrain`` arguments, length and the runs it waits for.

The students' and the pre-training's arguments are ``icd study``'s (:func:`student_study`: the demo
is one seed of ``icd study --shapes``'s baseline, FPN-MSE and ICD, in the demo's own folders).
"""

from __future__ import annotations

import math
import os
import subprocess
from dataclasses import dataclass
from typing import IO, TYPE_CHECKING

from icd.apps.demo.settings import DemoConfig

if TYPE_CHECKING:  # icd.apps.study imports this module: its settings are imported where used
    from icd.apps.study.settings import StudyConfig

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


# the demo's student runs -> the ``icd study`` method each one is
STUDENT_METHODS = {"baseline": "baseline", "fpn_mse": "fpn-mse", "icd": "icd"}


def student_study(cfg: DemoConfig) -> StudyConfig:
    """The ``icd study`` settings of the demo's students: its planner builds their commands (one
    pipeline), on the demo's data and teacher, seeds and folders named by the demo."""
    from icd.apps.study.settings import StudyConfig

    weights = {"icd": cfg.icd_weight, "fpn-mse": cfg.fpn_mse_weight}
    return StudyConfig(
        out_dir=cfg.out_dir,
        data_flags=["--data-path", cfg.data_dir],
        teacher=os.path.join(cfg.run_dir("teacher"), "checkpoint.pth"),
        detector=cfg.detector,
        backbone=cfg.student_backbone,
        fpn_channels=cfg.student_channels,
        min_size=cfg.image_size,
        max_size=cfg.image_size,
        batch_size=cfg.batch_size,
        lr=cfg.lr,
        methods=[student_method(cfg, name) for name in STUDENT_METHODS],
        seeds=[student_seed(cfg)],
        epochs=[cfg.student_epochs],
        weights={m: w for m, w in weights.items() if w is not None},
        pretrain_iters=max(1, cfg.pretrain_iters),
        device="cpu",
        jobs=cfg.jobs,
        threads=cfg.threads,
        label="demo",
    )


def student_method(cfg: DemoConfig, name: str) -> str:
    """The study method of the student run ``name`` (the icd run from a pre-trained side: icd-pre)."""
    method = STUDENT_METHODS[name]
    return "icd-pre" if method == "icd" and cfg.pretrain_iters else method


def student_seed(cfg: DemoConfig) -> int:
    return cfg.seed if cfg.student_seed is None else cfg.student_seed


def train_argv(cfg: DemoConfig, name: str) -> list[str]:
    """The ``icd train`` arguments of one run (``--output-dir`` included): the teacher's here, the
    students' from ``icd study``'s planner (:func:`icd.apps.study.plan.train_argv`)."""
    if name != "teacher":
        from icd.apps.study.plan import train_argv as study_train_argv

        argv = study_train_argv(student_study(cfg), student_method(cfg, name), cfg.student_epochs,
                                student_seed(cfg), output_dir=cfg.run_dir(name),
                                pretrain_dir=cfg.run_dir(PRETRAIN_RUN))  # fmt: skip
        if name == "icd" and cfg.distill_warmup_iters is not None:
            argv += ["--distill-warmup-iters", str(cfg.distill_warmup_iters)]
        return argv + list(cfg.extra_train_flags)
    epochs = cfg.teacher_epochs
    argv = [
        "train",
        "--data-path", cfg.data_dir,
        "--output-dir", cfg.run_dir(name),
        "--detector", cfg.detector,
        "--backbone", cfg.teacher_backbone,
        "--fpn-channels", str(cfg.teacher_channels),
        "--min-size", str(cfg.image_size),
        "--max-size", str(cfg.image_size),
        "--batch-size", str(cfg.batch_size),
        "--lr", str(cfg.lr),
        "--epochs", str(epochs),
        "--eval-every", str(epochs),  # once, at its end
        "--seed", str(cfg.seed),
        "--workers", "0",
        "--device", "cpu",
        "--print-freq", "5",
        "--epoch-checkpoint-every", "0",
        "--no-progress",
    ]  # fmt: skip
    if not cfg.teacher_lr_decay:
        argv += ["--lr-steps", str(epochs * iterations_per_epoch(cfg))]
    return argv + list(cfg.extra_train_flags)


def pretrain_argv(cfg: DemoConfig) -> list[str]:
    """The ``icd pretrain`` arguments of the teacher-side pre-training run (``icd study``'s planner's)."""
    from icd.apps.study.plan import pretrain_argv as study_pretrain_argv

    return study_pretrain_argv(student_study(cfg), student_seed(cfg), output_dir=cfg.run_dir(PRETRAIN_RUN))


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
