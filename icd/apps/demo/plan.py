"""The runs of a demo: the teacher's ``icd train``, then ``icd study``'s plan of the students.

The demo is a preset of ``icd study`` (:func:`student_study`): one seed of its baseline, FPN-MSE
and ICD (icd-pre with ``--pretrain-iters``) on the demo's data and teacher, the study's runs
named and placed as the demo's folders (``baseline``, ``fpn_mse``, ``icd``, ``icd_pretrain``).
"""

from __future__ import annotations

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
    """One ``python -m icd`` process of a demo or study (its state is filled in by the scheduler)."""

    name: str
    title: str
    argv: list[str]
    total_iters: int
    needs: tuple[str, ...] = ()
    all_threads: bool = False  # one job slot, with every slot's threads (the teacher: all wait for it)
    data: dict | None = None  # what its identity holds beside its command, instead of cfg.data_settings()
    process: subprocess.Popen | None = None
    log_file: IO[str] | None = None
    started: float = 0.0
    seconds: float = 0.0
    reused: bool = False
    slot: int = -1  # the job slot it runs in (the scheduler's)

    def stamp(self, cfg: DemoConfig) -> dict:
        """What a reused run must match: its arguments (paths relative to ``cfg.out_dir``) and the
        data settings (its own ``data``, else ``cfg``'s: a DemoConfig's or a StudyConfig's);
        :func:`icd.apps.demo.stamps.run_id` is its hash."""
        argv = [a.replace(cfg.out_dir, "{out}", 1) if a.startswith(cfg.out_dir) else a
                for a in self.argv]  # fmt: skip
        return {"argv": argv, "data": cfg.data_settings() if self.data is None else self.data}


# the demo's student runs -> the ``icd study`` method each one is
STUDENT_METHODS = {"baseline": "baseline", "fpn_mse": "fpn-mse", "icd": "icd"}


def student_study(cfg: DemoConfig) -> StudyConfig:
    """The ``icd study`` of the demo: its students on the demo's data and teacher, one seed, the
    study's runs named as the demo's folders (``OUT/baseline``, ...; the teacher ``OUT/teacher``)."""
    from icd.apps.study.plan import pretrain_name, run_name
    from icd.apps.study.settings import StudyConfig

    seed = student_seed(cfg)
    weights = {"icd": cfg.icd_weight, "fpn-mse": cfg.fpn_mse_weight}
    names = {run_name(student_method(cfg, n), cfg.student_epochs, seed): n for n in STUDENT_METHODS}
    names[pretrain_name(seed)] = PRETRAIN_RUN
    flags = list(cfg.extra_train_flags)
    if cfg.distill_warmup_iters is not None:  # the distilled students' (a baseline drops it)
        flags += ["--distill-warmup-iters", str(cfg.distill_warmup_iters)]
    return StudyConfig(
        out_dir=cfg.out_dir,
        data_flags=["--data-path", cfg.data_dir],
        teacher=cfg.teacher_checkpoint,
        detector=cfg.detector,
        backbone=cfg.student_backbone,
        fpn_channels=cfg.student_channels,
        min_size=cfg.image_size,
        max_size=cfg.image_size,
        batch_size=cfg.batch_size,
        lr=cfg.lr,
        methods=[student_method(cfg, name) for name in STUDENT_METHODS],
        seeds=[seed],
        epochs=[cfg.student_epochs],
        weights={m: w for m, w in weights.items() if w is not None},
        pretrain_iters=max(1, cfg.pretrain_iters),
        device="cpu",
        jobs=cfg.jobs,
        threads=cfg.threads,
        train_flags=flags,
        label="demo",
        names=names,
        folders={name: name for name in (*RUN_NAMES, PRETRAIN_RUN)},
    )


def student_method(cfg: DemoConfig, name: str) -> str:
    """The study method of the student run ``name`` (the icd run from a pre-trained side: icd-pre)."""
    method = STUDENT_METHODS[name]
    return "icd-pre" if method == "icd" and cfg.pretrain_iters else method


def student_seed(cfg: DemoConfig) -> int:
    return cfg.seed if cfg.student_seed is None else cfg.student_seed


def teacher_argv(cfg: DemoConfig) -> list[str]:
    """The teacher's ``icd train`` arguments (``--output-dir`` included)."""
    from icd.apps.study.plan import iterations_per_epoch

    epochs = cfg.teacher_epochs
    argv = [
        "train",
        "--data-path", cfg.data_dir,
        "--output-dir", cfg.run_dir("teacher"),
        "--detector", cfg.detector,
        "--backbone", cfg.teacher_backbone,
        "--fpn-channels", str(cfg.teacher_channels),
        "--min-size", str(cfg.image_size),
        "--max-size", str(cfg.image_size),
        "--batch-size", str(cfg.batch_size),
        "--lr", str(cfg.lr),
        "--epochs", str(epochs),
        "--eval-every", str(epochs),  # once, at its end: the study's teacher check reads it
        "--seed", str(cfg.seed),
        "--workers", "0",
        "--device", "cpu",
        "--print-freq", "5",
        "--epoch-checkpoint-every", "0",
        "--no-progress",
    ]  # fmt: skip
    if not cfg.teacher_lr_decay:
        argv += ["--lr-steps", str(epochs * iterations_per_epoch(cfg.num_train, cfg.batch_size))]
    return argv + list(cfg.extra_train_flags)


def teacher_run(cfg: DemoConfig) -> Run:
    """The teacher's training run: every slot's threads (everything but the baseline waits for
    it); its identity holds the data settings (a demo's and ``icd study --shapes``' stamps agree)."""
    from icd.apps.study.plan import iterations_per_epoch

    total = cfg.teacher_epochs * iterations_per_epoch(cfg.num_train, cfg.batch_size)
    title = f"teacher {cfg.teacher_backbone} FPN {cfg.teacher_channels}"
    return Run("teacher", title, teacher_argv(cfg), total, all_threads=True, data=cfg.data_settings())


def plan_runs(cfg: DemoConfig) -> list[Run]:
    """The demo's runs in the order they start: the teacher, then the study's plan of the students
    (its icd-pre pre-training first), each but the baseline waiting for the teacher. The
    baseline so runs beside the teacher, on the cores its threads leave idle (558 s against
    658 s for the whole demo with the baseline after the teacher, results/README.md)."""
    from icd.apps.study.plan import plan_runs as study_plan

    return [teacher_run(cfg), *study_plan(student_study(cfg), cfg.num_train, teacher="teacher")]
