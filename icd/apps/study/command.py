"""``icd study``: its flags (or a TOML file of them, ``--config``), the checked settings, and the command."""

from __future__ import annotations

import argparse
import json
import os
import shlex

from icd.apps.study.calibrate import MODES
from icd.apps.study.settings import (
    DEFAULT_PRETRAIN_ITERS,
    DISTILLING,
    METHODS,
    TEACHER_MARGIN,
    StudyConfig,
    known_methods,
)
from icd.apps.study.shapes import PRESETS
from icd.errors import ConfigError, InterruptedRun
from icd.flags import available_cpus, finite_float, int_at_least

# the shared data flags of icd train (icd.cli adds them), passed on to every run
DATA_DESTS = (
    "data_path",
    "train_split",
    "val_split",
    "train_ann",
    "train_images",
    "val_ann",
    "val_images",
    "on_bad_data",
)
_PATH_DESTS = ("data_path", "train_ann", "train_images", "val_ann", "val_images")


def add_study_flags(p) -> None:
    """The flags of ``icd study`` other than the data flags (``p``: a parser or an icd.config.FlagRecorder)."""
    methods = "; ".join(f"{m}: {text}" for m, text in METHODS.items())
    p.add_argument(
        "--config",
        default=None,
        metavar="STUDY.toml",
        help="a TOML file of these flags (keys without the dashes, tables only group them); flags given here win",
    )
    p.add_argument("--out", default="study", metavar="DIR", help="the study's folder (runs/, study.md, curves.png)")
    p.add_argument("--teacher", default=None, help="the teacher checkpoint (icd train's)")
    p.add_argument("--detector", default="fcos", help="the student's detector")
    p.add_argument("--backbone", default="resnet18", help="the student's backbone")
    p.add_argument("--fpn-channels", type=int_at_least(1), default=64, help="the student's FPN width")
    p.add_argument("--min-size", type=int_at_least(1), default=None, help="icd train's --min-size (default its own)")
    p.add_argument("--max-size", type=int_at_least(1), default=None, help="icd train's --max-size (default its own)")
    p.add_argument("--batch-size", type=int_at_least(1), default=8, help="images per step")
    p.add_argument("--lr", type=finite_float(above=0.0), default=0.02, help="SGD lr of every student")
    p.add_argument(
        "--methods",
        nargs="+",
        default=["baseline", "fpn-mse", "icd"],
        help=f"the methods compared: {methods}; fpn-mse+inherit, icd+inherit, icd-pre+inherit: "
        "the method with the teacher's neck and head inherited",
    )
    p.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2], help="the seeds of every method")
    p.add_argument("--epochs", nargs="+", type=int_at_least(1), default=[2], help="one or two schedules (epochs)")
    p.add_argument(
        "--weight",
        nargs="+",
        default=[],
        metavar="METHOD=W",
        help="a method's --distill-weight (default icd train's: fpn-mse 16, icd 8), e.g. fpn-mse=16",
    )
    p.add_argument("--inherit-parts", default="neck,head", help="what the +inherit methods take from the teacher")
    p.add_argument(
        "--pretrain-iters",
        type=int_at_least(1),
        default=DEFAULT_PRETRAIN_ITERS,
        help="icd-pre: iterations of icd pretrain (per seed)",
    )
    p.add_argument(
        "--teacher-margin",
        type=finite_float(minimum=1.0),
        default=TEACHER_MARGIN,
        help="the teacher check: the teacher's val AP must be at least this times the student's",
    )
    p.add_argument(
        "--student-ap",
        type=finite_float(minimum=0.0),
        default=None,
        help="what the student reaches alone, if known (val AP): the teacher check's yardstick before "
        "any student runs (without it the check is made against the baseline runs in study.md)",
    )
    p.add_argument(
        "--device",
        default=None,
        choices=["cpu", "cuda"],
        help="cpu, or cuda: one run per GPU (default: cuda when available)",
    )
    p.add_argument(
        "--jobs",
        type=int_at_least(1),
        default=None,
        help="runs side by side (default: the GPUs, or the CPUs / --threads)",
    )
    p.add_argument("--threads", type=int_at_least(1), default=1, help="intra-op threads per run (CPU)")
    p.add_argument(
        "--train-flags",
        default=None,
        metavar="'FLAGS'",
        help="more icd train flags for every student, as one quoted string (they win over the study's)",
    )
    p.add_argument(
        "--pretrain-flags",
        default=None,
        metavar="'FLAGS'",
        help="more icd pretrain flags for icd-pre's teacher sides (--lr, --attention-gain, ...), as one quoted "
        "string (they win over the study's and over the teacher-side flags it takes from --train-flags)",
    )
    p.add_argument("--resume", action="store_true", help="finish the study in --out: run only what is missing")
    p.add_argument(
        "--calibrate",
        nargs="?",
        const="sweep",
        choices=MODES,
        default=None,
        help="set each distilling method's weight from short runs on the first seed first: sweep (a small "
        "grid of weights, the best val AP) or match (one run, the weighted distillation loss set to "
        "--match-fraction times the detection loss); docs/study.md",
    )
    p.add_argument(
        "--match-fraction",
        type=finite_float(above=0.0),
        default=StudyConfig.match_fraction,
        help="--calibrate match: the weighted distillation loss over the detection loss (5.75 reproduced the "
        "swept weights on the shapes data, results/README.md)",
    )
    p.add_argument("--calibrate-epochs", type=int_at_least(1), default=1, help="--calibrate sweep: its runs' epochs")
    p.add_argument("--shapes", nargs="?", const="full", choices=PRESETS, default=None,
                   help="the preset on the demo's generated shapes data: the demo's data and teacher made in "
                   "--out first (no --data-path, --teacher), the demo's student unless flags say otherwise; "
                   "tiny: the demo's --tiny sizes")  # fmt: skip
    p.add_argument("--no-progress", action="store_true", help="no tqdm bars")


def data_flags(args: argparse.Namespace) -> list[str]:
    """The data flags given (``--flag value`` pairs, paths made absolute) to pass on to every run."""
    defaults = {"train_split": "train", "val_split": "val", "on_bad_data": "error"}
    flags = []
    for dest in DATA_DESTS:
        value = getattr(args, dest)
        if value is None or value == defaults.get(dest):
            continue
        flags += [f"--{dest.replace('_', '-')}", os.path.abspath(value) if dest in _PATH_DESTS else str(value)]
    return flags


def _weights(items: list[str]) -> dict[str, float]:
    weights = {}
    for item in items:
        method, _, text = item.partition("=")
        if method not in DISTILLING:
            expected = " or ".join(f"{m}=W" for m in DISTILLING)
            raise ConfigError(f"--weight {item}", f"expected {expected} (icd-pre takes icd's weight)")
        try:
            value = float(text)
        except ValueError:
            raise ConfigError(f"--weight {item}", f"{text!r} is not a number") from None
        if not value >= 0 or value == float("inf"):
            raise ConfigError(f"--weight {item}", "expected a finite weight >= 0")
        weights[method] = value
    return weights


def _unique(flag: str, values: list) -> None:
    seen = [v for i, v in enumerate(values) if v in values[:i]]
    if seen:
        raise ConfigError(flag, f"{seen[0]} is given twice")


def config_from_args(args: argparse.Namespace, given_flags: set[str] | None = None) -> StudyConfig:
    """The checked settings of ``icd study ARGS`` (flags only: files are checked by :func:`check_inputs`)."""
    known = known_methods()
    for method in args.methods:
        if method not in known:
            raise ConfigError("--methods", f"unknown method {method!r}; known: {', '.join(known)}")
    _unique("--methods", args.methods)
    _unique("--seeds", args.seeds)
    _unique("--epochs", args.epochs)
    if len(args.epochs) > 2:
        raise ConfigError("--epochs", f"one or two schedules, got {len(args.epochs)}")
    if args.shapes:
        given = [f"--{d.replace('_', '-')}" for d in (*_PATH_DESTS, "teacher") if getattr(args, d) is not None]
        if given:
            raise ConfigError(f"--shapes with {given[0]}", "the preset makes its own data and teacher; drop one")
    elif not args.teacher:
        raise ConfigError("--teacher", "a study needs the teacher checkpoint (it is checked on val first)")
    gpus = 0
    device = args.device
    if device != "cpu":
        import torch

        gpus = torch.cuda.device_count()
        if device == "cuda" and gpus == 0:
            raise ConfigError("--device cuda", "no CUDA device here")
        device = "cuda" if gpus else "cpu"
    jobs = args.jobs or (gpus or max(1, available_cpus() // args.threads))
    if gpus and jobs > gpus:
        raise ConfigError(f"--jobs {jobs}", f"one run per GPU: at most {gpus} here")
    cfg = StudyConfig(
        out_dir=args.out,
        data_flags=data_flags(args),
        teacher=os.path.abspath(args.teacher or ""),
        detector=args.detector,
        backbone=args.backbone,
        fpn_channels=args.fpn_channels,
        min_size=args.min_size,
        max_size=args.max_size,
        batch_size=args.batch_size,
        lr=args.lr,
        methods=list(args.methods),
        seeds=list(args.seeds),
        epochs=list(args.epochs),
        weights=_weights(args.weight),
        inherit_parts=args.inherit_parts,
        pretrain_iters=args.pretrain_iters,
        teacher_margin=args.teacher_margin,
        student_ap=args.student_ap,
        match_fraction=args.match_fraction,
        device=device,
        jobs=jobs,
        threads=args.threads,
        gpus=gpus,
        train_flags=shlex.split(args.train_flags or ""),
        pretrain_flags=shlex.split(args.pretrain_flags or ""),
    )
    if args.shapes:
        from icd.apps.study.shapes import shapes_study

        cfg = shapes_study(cfg, args.shapes, given_flags or set())
    return cfg


def check_inputs(cfg: StudyConfig, args: argparse.Namespace) -> int:
    """The data and the teacher are there and fit the methods (one-line errors, before any run);
    returns the number of training images."""
    from icd.data.coco import dataset_paths
    from icd.engine.checkpoint import load_checkpoint

    anns = {}
    for split in ("train", "val"):
        try:
            _, anns[split] = dataset_paths(
                args.data_path,
                getattr(args, f"{split}_split"),
                getattr(args, f"{split}_ann"),
                getattr(args, f"{split}_images"),
                split,
            )
        except ValueError as err:
            raise ConfigError("data flags", str(err)) from None
        if not os.path.isfile(anns[split]):
            raise FileNotFoundError(f"--data-path {args.data_path}: no {split} annotations ({anns[split]})")
    ckpt = load_checkpoint(cfg.teacher, "--teacher")
    # the teacher's architecture as its checkpoint records it (a bare state dict records none)
    teacher_spec = ckpt.get("detector_spec") if isinstance(ckpt.get("detector_spec"), dict) else {}
    inheriting = [m for m in cfg.methods if m == "inherit" or m.endswith("+inherit")]
    width = teacher_spec.get("fpn_channels")
    if inheriting and width is not None and "neck" in cfg.inherit_parts and width != cfg.fpn_channels:
        raise ConfigError(
            f"--methods {inheriting[0]}",
            f"inherits the teacher's neck: its FPN has {width} channels, "
            f"the student's {cfg.fpn_channels} (--fpn-channels); the shapes must match",
        )
    try:
        with open(anns["train"], encoding="utf-8") as f:
            return max(1, len(json.load(f).get("images", [])))
    except (OSError, ValueError, AttributeError):
        return 1  # the runs report a broken file themselves, naming it; only the progress bars need this


_STUDENT_DESTS = ("detector", "backbone", "fpn_channels", "min_size", "max_size", "batch_size", "lr", "epochs")


def given_student_flags(argv: list[str], preset: str | None) -> set[str]:
    """The student settings (dests) the command line or the --config file gives."""
    from icd.config import load_preset

    given = set(load_preset(preset)) if preset else set()
    for dest in _STUDENT_DESTS:
        flag = f"--{dest.replace('_', '-')}"
        if any(a == flag or a.startswith(f"{flag}=") for a in argv):
            given.add(dest)
    return given & set(_STUDENT_DESTS)


def run_command(args: argparse.Namespace, argv: list[str] | None = None) -> int:
    """``icd study``: the whole study; 0 when done (``argv``: the command line, for --shapes).
    Ctrl-C or SIGTERM stops the runs it started and exits 130 (InterruptedRun)."""
    from icd.apps.study.pipeline import run_study
    from icd.apps.study.plan import check_run_flags

    cfg = config_from_args(args, given_student_flags(argv or [], args.config) if args.shapes else None)
    check_run_flags(cfg)
    preset = None
    if args.shapes:
        from icd.apps.study.shapes import preset as shapes_preset

        num_train = 0
        preset = shapes_preset(cfg, args.shapes)
    else:
        num_train = check_inputs(cfg, args)
    try:
        run_study(
            cfg,
            num_train,
            resume=args.resume,
            calibrate=args.calibrate,
            calibrate_epochs=args.calibrate_epochs,
            progress=not args.no_progress,
            preset=preset,
        )
    except KeyboardInterrupt:
        raise InterruptedRun(
            "icd study: stopped, and the runs it had started with it; the same command with --resume "
            f"finishes what is missing in {cfg.out_dir}"
        ) from None
    return 0
