"""The runs of a study: one ``icd train`` per method, schedule and seed (and ``icd pretrain`` per seed for icd-pre).

Run folders (under ``OUT/runs``): ``METHOD_eEPOCHS_sSEED`` and ``pretrain_sSEED``. Runs are
:class:`icd.apps.demo.plan.Run` objects, scheduled by the demo's scheduler and stamped by its
stamps (one mechanism): a run's identity is the hash of its command.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import io
import math
import os
import shlex
from collections.abc import Callable

from icd.apps.demo.plan import Run
from icd.apps.study.settings import DISTILLING, StudyConfig, base_method
from icd.errors import ConfigError

TEACHER_EVAL = "teacher_eval"  # `icd eval` of the teacher on val (OUT/runs/teacher_eval)


def run_name(method: str, epochs: int, seed: int) -> str:
    return f"{method}_e{epochs}_s{seed}"


def pretrain_name(seed: int) -> str:
    return f"pretrain_s{seed}"


def _size_flags(cfg: StudyConfig) -> list[str]:
    flags = []
    if cfg.min_size is not None:
        flags += ["--min-size", str(cfg.min_size)]
    if cfg.max_size is not None:
        flags += ["--max-size", str(cfg.max_size)]
    return flags


def _device_flags(cfg: StudyConfig) -> list[str]:
    # on GPUs each run sees one (CUDA_VISIBLE_DEVICES = its slot): cuda is that one
    return ["--device", "cuda" if cfg.gpus else cfg.device, "--workers", "2" if cfg.gpus else "0"]


def val_data_flags(data_flags: list[str]) -> list[str]:
    """The data flags ``icd eval`` takes (the val split's and the shared ones) out of icd train's
    (``data_flags``: ``--flag value`` pairs, as :func:`icd.apps.study.command.data_flags` gives)."""
    pairs = zip(data_flags[::2], data_flags[1::2], strict=True)
    return [x for flag, value in pairs if not flag.startswith("--train-") for x in (flag, value)]


def train_argv(
    cfg: StudyConfig,
    method: str,
    epochs: int,
    seed: int,
    weight: float | None = None,
    output_dir: str | None = None,
) -> list[str]:
    """The ``icd train`` arguments of one student run (``weight``: instead of the study's;
    ``output_dir``: the run's folder, instead of the plan's: --calibrate's runs)."""
    base = base_method(method)
    argv = [
        "train",
        *cfg.data_flags,
        "--output-dir",
        output_dir or cfg.run_dir(cfg.named(run_name(method, epochs, seed))),
        "--detector",
        cfg.detector,
        "--backbone",
        cfg.backbone,
        "--fpn-channels",
        str(cfg.fpn_channels),
        *_size_flags(cfg),
        "--batch-size",
        str(cfg.batch_size),
        "--lr",
        str(cfg.lr),
        "--epochs",
        str(epochs),
        "--eval-every",
        "1",
        "--seed",
        str(seed),
        *_device_flags(cfg),
        "--print-freq",
        "5",
        "--epoch-checkpoint-every",
        "0",
        "--no-progress",
    ]
    if base != "baseline":
        argv += ["--teacher", str(cfg.teacher)]
    if base in DISTILLING or base == "icd-pre":
        argv += ["--distill", "icd" if base == "icd-pre" else base]
        weight = cfg.weight(method) if weight is None else weight
        if weight is not None:
            argv += ["--distill-weight", f"{weight:g}"]
    if base == "icd-pre":
        argv += ["--icd-init", os.path.join(cfg.run_dir(cfg.named(pretrain_name(seed))), "teacher_side.pth")]
    if base == "inherit":
        argv += ["--distill", "none", "--inherit-teacher", cfg.inherit_parts]
    elif method.endswith("+inherit"):
        argv += ["--inherit-teacher", cfg.inherit_parts]
    return argv + (list(cfg.train_flags) if base != "baseline" else without_teacher_flags(cfg.train_flags))


def flags_where(flags: list[str], keep: Callable[[str], bool]) -> list[str]:
    """The flags of ``flags`` (each with the values after it) whose option, ``--name`` without any
    ``=value``, ``keep`` accepts."""
    kept, keeping = [], False
    for arg in flags:
        if arg.startswith("--"):
            keeping = keep(arg.split("=", 1)[0])
        if keeping:
            kept.append(arg)
    return kept


def without_teacher_flags(flags: list[str]) -> list[str]:
    """``flags`` less the distillation flags (each with its values): what a baseline run takes of
    ``--train-flags`` (icd train refuses them without --teacher)."""
    from icd.flags import teacher_only

    return flags_where(flags, lambda name: not teacher_only(name[2:].replace("-", "_")))


def pretrain_argv(cfg: StudyConfig, seed: int) -> list[str]:
    """The ``icd pretrain`` arguments of icd-pre's teacher side for ``seed`` (into ``runs/pretrain_sSEED``,
    or the folder of the preset's name for it)."""
    return [
        "pretrain",
        *cfg.data_flags,
        "--output-dir",
        cfg.run_dir(cfg.named(pretrain_name(seed))),
        "--teacher",
        str(cfg.teacher),
        *_size_flags(cfg),
        "--batch-size",
        str(cfg.batch_size),
        "--iters",
        str(cfg.pretrain_iters),
        "--eval-every",
        str(max(1, cfg.pretrain_iters // 6)),
        "--seed",
        str(seed),
        *_device_flags(cfg),
        "--print-freq",
        "5",
        "--no-progress",
        *teacher_side_flags(cfg.train_flags),
        *cfg.pretrain_flags,
    ]


def teacher_side_flags(flags: list[str]) -> list[str]:
    """What ``icd pretrain`` takes of ``--train-flags`` (each with its values): the ``--icd-*``
    flags it knows, i.e. the teacher side's shape and sampling (``--icd-position-scale``,
    ``--icd-heads``, ...), so that its teacher_side.pth fits the icd-pre students that load it.
    The student run's own (``--icd-lr``, ``--icd-clip``, ``--icd-init``) are not pretrain's."""
    known = pretrain_options()
    return flags_where(flags, lambda name: name.startswith("--icd-") and name in known)


@functools.cache
def command_parser(command: str) -> argparse.ArgumentParser:
    """icd's parser with the flags of ``command`` only (``train``, ``pretrain``), built once."""
    from icd.cli import build_parser

    return build_parser(commands=(command,))


@functools.cache
def pretrain_options() -> frozenset[str]:
    """The option strings of ``icd pretrain``'s parser (built once: a study plans it per seed)."""
    parser = command_parser("pretrain")
    commands = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return frozenset(commands.choices["pretrain"]._option_string_actions)


def check_run_flags(cfg: StudyConfig) -> None:
    """ConfigError when the parser of ``icd train`` or ``icd pretrain`` refuses a planned run's
    command line (an unknown flag or a bad value in ``--train-flags`` / ``--pretrain-flags``): said
    before the teacher check and any run, naming the flag string and the run."""
    for run in plan_runs(cfg, 1):
        command = run.argv[0]
        refused = io.StringIO()
        try:
            with contextlib.redirect_stderr(refused), contextlib.redirect_stdout(io.StringIO()):
                command_parser(command).parse_args(run.argv)
        except SystemExit:  # an error, or --help / --version: it would exit without training
            said = " ".join(refused.getvalue().split()).removeprefix("icd: error: ")
            said = said or "it exits before it runs (--help?)"
            if command == "pretrain" and cfg.pretrain_flags:
                where = f"--pretrain-flags {shlex.join(cfg.pretrain_flags)!r}"
            else:  # a teacher-side flag of --train-flags goes to icd pretrain too
                where = f"--train-flags {shlex.join(cfg.train_flags)!r}" if cfg.train_flags else "icd study"
            raise ConfigError(where, f"icd {command} refuses the command line of run {run.name}: {said}") from None


def teacher_eval_argv(cfg: StudyConfig) -> list[str]:
    """``icd eval`` of the teacher on the val split, into ``OUT/runs/teacher_eval``."""
    return [
        "eval",
        *val_data_flags(cfg.data_flags),
        "--checkpoint",
        str(cfg.teacher),
        "--output-dir",
        cfg.run_dir(TEACHER_EVAL),
        *_size_flags(cfg),
        "--batch-size",
        str(cfg.batch_size),
        *_device_flags(cfg),
        "--no-progress",
    ]


def iterations_per_epoch(num_train: int, batch_size: int) -> int:
    return max(1, math.ceil(num_train / batch_size))


def plan_runs(cfg: StudyConfig, num_train: int, teacher: str | None = None) -> list[Run]:
    """The study's runs in the order they start: icd-pre's teacher-side pre-training per seed
    first, then per seed (so that an interrupted study has whole seeds) each schedule's methods;
    ``num_train``: the training images (for the progress bars' lengths); ``teacher``: the name of
    a teacher's training run in the same schedule (a preset's), which every run but the
    baselines waits for."""
    per_epoch = iterations_per_epoch(num_train, cfg.batch_size)
    after_teacher = (teacher,) if teacher else ()
    runs = []
    if any(base_method(m) == "icd-pre" for m in cfg.methods):
        for seed in cfg.seeds:
            name = cfg.named(pretrain_name(seed))
            runs.append(Run(name, f"teacher side s{seed}", pretrain_argv(cfg, seed), cfg.pretrain_iters, after_teacher))
    for seed in cfg.seeds:
        for epochs in cfg.epochs:
            for method in cfg.methods:
                needs = () if method == "baseline" else after_teacher
                if base_method(method) == "icd-pre":
                    needs += (cfg.named(pretrain_name(seed)),)
                runs.append(
                    Run(
                        cfg.named(run_name(method, epochs, seed)),
                        f"{method} {epochs} ep s{seed}",
                        train_argv(cfg, method, epochs, seed),
                        epochs * per_epoch,
                        needs,
                    )
                )
    return runs
