"""``icd`` command line: train, pretrain, eval, predict, plot, data shapes, demo, study (also ``python -m icd``).

    icd train --data-path DIR --detector retinanet --backbone resnet101 --output-dir runs/teacher
    icd train --data-path DIR --backbone resnet18 --teacher runs/teacher/checkpoint.pth \\
              --distill icd --output-dir runs/icd
    icd train --config configs/retinanet/r50_1x_icd.toml --data-path /data/coco
    icd eval --data-path DIR --checkpoint runs/icd/checkpoint.pth
    icd predict --checkpoint runs/icd/model_best.pth photos/ --score-threshold 0.5 --out predictions
    icd plot runs/baseline runs/icd --out curves.png
    icd data shapes --out DIR --num-train 2000 --num-val 500
    icd demo --out demo_output
    icd study --data-path DIR --teacher runs/teacher/checkpoint.pth --methods baseline fpn-mse icd --out study
    torchrun --nproc_per_node 8 -m icd train ...
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from collections.abc import Collection, Sequence

from icd.config import FlagRecorder
from icd.errors import ConfigError, IcdError
from icd.flags import DATA_WORKERS, CheckedType, check_teacher_flags, default_workers, finite_float, int_at_least

# The parser of a command imports what its flags offer (detectors, backends, ...) when it is built:
# `icd --help` and `icd --version` import none of it and work without the `detection` extra.

# errors a user causes: one line "icd: error: ..." and exit 2 (IcdError: its exit_code), no traceback
USER_ERRORS = (IcdError, FileNotFoundError, FileExistsError, IsADirectoryError, NotADirectoryError, PermissionError)
DEBUG_ENV = "ICD_DEBUG"


class _Parser(argparse.ArgumentParser):
    """argparse with one-line errors: ``icd: error: <message> (see: icd train --help)``, exit 2."""

    def error(self, message: str):
        self.exit(2, f"icd: error: {' '.join(message.split())} (see: {self.prog} --help)\n")


class _HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Every flag's default at the end of its help, ``(default: 800)``, except where there is none to
    show (None, a switch that is off) or the help already says it in words (``default ...``)."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        default = action.default
        if not action.option_strings or default is None or default is False or default is argparse.SUPPRESS:
            return text
        if "default" in text:
            return text
        shown = " ".join(map(str, default)) if isinstance(default, (list, tuple)) else str(default)
        return f"{text} (default: {shown.replace('%', '%%')})"


def _command(sub, name: str, **text: str) -> argparse.ArgumentParser:
    """The sub-parser of ``icd <name>``, with its flags' defaults in --help."""
    return sub.add_parser(name, formatter_class=_HelpFormatter, **text)


def _add_data_flags(p: argparse.ArgumentParser | FlagRecorder, splits: Sequence[str] = ("train", "val")) -> None:
    """Where a command's COCO-format data is, the same flags in every command that reads data: a
    --data-path root with its layout and --{split}-split names, or per split --{split}-ann FILE and
    --{split}-images DIR (any export, read in place). ``splits``: the splits the command reads."""
    from icd.data.coco import BAD_DATA_CHOICES

    p.add_argument(
        "--data-path",
        default=None,
        help="COCO-layout root: annotations/instances_{split}[2017].json and an image folder "
        "{split}[2017]/ (or give each split's files with "
        + " and ".join(f"--{s}-ann / --{s}-images" for s in splits) + ")",
    )
    for split in splits:
        names = [f"--{split}-split"] + (["--split"] if splits == ("val",) else [])  # icd eval's --split
        p.add_argument(*names, default=split, dest=f"{split}_split", help=f"the {split} split's name under --data-path")
        p.add_argument(
            f"--{split}-ann",
            default=None,
            metavar="FILE",
            help=f"COCO-format annotation JSON of the {split} split (any export, e.g. Roboflow's "
            f"{'valid' if split == 'val' else split}/_annotations.coco.json), instead of --data-path",
        )
        p.add_argument(
            f"--{split}-images",
            default=None,
            metavar="DIR",
            help=f"the folder that --{split}-ann's file_names are relative to",
        )
    p.add_argument(
        "--on-bad-data",
        choices=BAD_DATA_CHOICES,
        default="error",
        help="a corrupt image or malformed annotation: report it and skip it, or stop",
    )


def _add_run_flags(p: argparse.ArgumentParser | FlagRecorder) -> None:
    """Batches, workers, device, precision and the output folder of a command that runs a model."""
    p.add_argument("--batch-size", "-b", type=int_at_least(1), default=2, help="images per process")
    p.add_argument(
        "--workers",
        "-j",
        type=int_at_least(0),
        default=default_workers(),
        help=f"data loading processes (default: {DATA_WORKERS}, at most the CPUs this process may use; "
        f"{default_workers()} here)",
    )
    p.add_argument(
        "--device",
        default=None,
        help="cuda, cuda:N or cpu (default: cuda when available); under torchrun "
        "each process takes cuda:LOCAL_RANK",
    )
    p.add_argument(
        "--amp",
        action="store_true",
        help="mixed precision: float16 + GradScaler on CUDA, bfloat16 on CPU (slower there: docs/nn.md); "
        "--amp-dtype picks the type",
    )
    p.add_argument(
        "--amp-dtype",
        choices=("bfloat16", "float16"),
        default=None,
        help="the autocast type of --amp: float16 (training scales its loss with a GradScaler, on CUDA "
        "and CPU alike) or bfloat16 (no scaler); default: float16 on CUDA, bfloat16 on CPU",
    )
    p.add_argument("--output-dir", default="output", help="checkpoints, metrics.jsonl, detections")
    p.add_argument("--no-progress", action="store_true", help="no tqdm bars")
    _add_debug_flag(p)


def _add_drop_empty_categories_flag(p: argparse.ArgumentParser | FlagRecorder) -> None:
    p.add_argument(
        "--drop-empty-categories",
        action="store_true",
        help="leave out the training split's categories that no annotation uses (a Roboflow export's "
        "dataset-level category 0), in the val split too; default: keep them as classes, with a warning",
    )


def _add_tensorboard_flag(p: argparse.ArgumentParser | FlagRecorder) -> None:
    p.add_argument(
        "--tensorboard",
        action="store_true",
        help="also write every metrics.jsonl value as TensorBoard scalars to --output-dir (needs the "
        "tensorboard package, the 'tensorboard' extra); metrics.jsonl is written either way",
    )


def _add_debug_flag(p: argparse.ArgumentParser | FlagRecorder) -> None:
    p.add_argument(
        "--debug",
        action="store_true",
        help="on an error, show the traceback, not only the one-line message (also: ICD_DEBUG=1)",
    )


def _add_model_flags(p: argparse.ArgumentParser | FlagRecorder, defaults: bool = True, command: str = "train") -> None:
    from icd.detection.adapters import DETECTOR_FAMILIES, backbone_names, detector_names
    from icd.detection.models import NORMS
    from icd.engine.run_config import DEFAULT_DETECTOR

    d = (lambda v: v) if defaults else (lambda v: None)
    families = ", ".join(f"{f.name}'s {'/'.join(f.detectors)}" for f in DETECTOR_FAMILIES.values())
    p.add_argument("--detector", choices=detector_names(), default=d(DEFAULT_DETECTOR), help=f"detector ({families})")
    p.add_argument("--backbone", choices=backbone_names(), default=d("resnet50"), help="backbone of the detector")
    p.add_argument(
        "--backbone-weights",
        default=None,
        help="local file with a torchvision ResNet state dict (never downloaded)",
    )
    p.add_argument(
        "--trainable-backbone-layers",
        type=CheckedType(int, minimum=0, maximum=5),
        default=None,
        help="ResNet stages that train, 0..5 (default 3 with --backbone-weights, else 5)",
    )
    p.add_argument(
        "--norm",
        choices=NORMS,
        default=None,
        help="backbone normalisation (default frozen_bn with --backbone-weights, else gn)",
    )
    p.add_argument("--fpn-channels", type=int_at_least(1), default=d(256), help="width of the FPN maps and the head")
    p.add_argument(
        "--min-level",
        type=CheckedType(int, minimum=2, maximum=5),
        default=None,
        help="lowest FPN level P_k (default 3; 2 for fasterrcnn and maskrcnn)",
    )
    p.add_argument(
        "--max-level",
        type=CheckedType(int, minimum=2, maximum=8),
        default=None,
        help="highest FPN level (default 7; 6 for fasterrcnn and maskrcnn)",
    )
    p.add_argument(
        "--min-size",
        type=int_at_least(1),
        nargs="+",
        default=d([800]),
        help="shorter side after resizing; several values: one drawn per batch",
    )
    p.add_argument("--max-size", type=int_at_least(1), default=d(1333), help="longer side cap after resizing")
    p.add_argument(
        "--score-thresh",
        type=finite_float(minimum=0.0, maximum=1.0),
        default=d(0.05),
        help="lowest score of a kept detection at evaluation",
    )
    for family in DETECTOR_FAMILIES.values():  # each family's own flags (--<family>-*)
        family.add_flags(p, command)


def _add_icd_flags(g, command: str) -> None:
    """The distillation methods' flags (``icd pretrain``: ICD's only), ICD's run settings and the
    bare-state-dict teacher flags (train and pretrain)."""
    from icd.detection.adapters import backbone_names, detector_names
    from icd.detection.models import NORMS
    from icd.engine.run_spec import BARE_STATE_DICT_NORM
    from icd.nn.methods import METHODS, add_method_flags
    from icd.ops.dispatch import BACKENDS

    if command == "train":
        add_method_flags(g, command)
    else:
        METHODS["icd"].add_flags(g, command)

    g.add_argument("--icd-backend", choices=BACKENDS, default=None, help="icd.ops backend (default per device)")
    g.add_argument(
        "--icd-static-shapes",
        action="store_true",
        help="K = --icd-max-labels instance slots in every batch, so that no shape depends on the box "
        "counts (for torch.compile and CUDA graphs); default: K = the batch's largest count, "
        "1.6x faster eager on CPU (docs/nn.md, Static shapes)",
    )
    bare = "of a --teacher that is a bare state dict (a checkpoint of icd train says its own)"
    g.add_argument("--teacher-detector", choices=detector_names(), default=None, help=f"the detector {bare}")
    g.add_argument("--teacher-backbone", choices=backbone_names(), default=None, help=f"the backbone {bare}")
    g.add_argument("--teacher-fpn-channels", type=int_at_least(1), default=256, help=f"the FPN width {bare}")
    g.add_argument("--teacher-norm", choices=NORMS, default=BARE_STATE_DICT_NORM, help=f"the backbone norm {bare}")


def _pretrain_parser(sub) -> argparse.ArgumentParser:
    from icd.engine.run_config import LoopConfig, PretrainConfig

    recipe = PretrainConfig()  # each default stated once, on its field

    p = _command(sub, "pretrain", **COMMAND_TEXT["pretrain"])
    _add_data_flags(p)
    _add_run_flags(p)
    _add_tensorboard_flag(p)
    p.add_argument("--teacher", required=True, help="teacher checkpoint (icd train's)")
    p.add_argument("--iters", type=int_at_least(1), default=recipe.iters, help="pre-training iterations")
    p.add_argument(
        "--lr", type=finite_float(above=0.0), default=recipe.lr, help="AdamW lr (cosine decay over --iters)"
    )
    p.add_argument("--clip", type=finite_float(above=0.0), default=recipe.clip, help="gradient-norm clip")
    p.add_argument(
        "--attention-gain",
        type=finite_float(above=0.0),
        default=recipe.attention_gain,
        help="multiply the decoder's query projection weights by this at the start (sharper logits)",
    )

    p.add_argument(
        "--eval-every", type=int_at_least(1), default=recipe.eval_every, help="iterations between attention statistics"
    )
    p.add_argument(
        "--cache-gb",
        type=finite_float(minimum=0.0),
        default=recipe.cache_gb,
        help="memory for the teacher's FPN maps of the training and val images, reused across epochs "
        "and evaluations (0: recompute)",
    )
    p.add_argument(
        "--attention-images", type=int_at_least(1), default=None, help="val images for the statistics (default all)"
    )
    p.add_argument(
        "--attention-detail",
        action="store_true",
        help="also measure the statistics per instance size, where the attention goes (own box, other "
        "instances, background, image border, padding; per level) and the auxiliary task's losses and "
        "real/fake AUC per instance size, into metrics.jsonl",
    )
    p.add_argument(
        "--print-freq", type=int_at_least(1), default=LoopConfig.print_freq, help="iterations per metrics line"
    )
    p.add_argument(
        "--flip-prob", type=finite_float(minimum=0.0, maximum=1.0), default=0.5, help="horizontal flip probability"
    )
    _add_drop_empty_categories_flag(p)
    p.add_argument(
        "--min-size",
        type=int_at_least(1),
        nargs="+",
        default=None,
        help="shorter side of the teacher's input after resizing, one value drawn per batch: give the "
        "students' --min-size (default: the teacher checkpoint's own; 800 for a bare state dict)",
    )
    p.add_argument(
        "--max-size",
        type=int_at_least(1),
        default=None,
        help="longer side cap after resizing (default: the teacher checkpoint's own; 1333 for a bare state dict)",
    )
    p.add_argument(
        "--min-level",
        type=CheckedType(int, minimum=2, maximum=5),
        default=None,
        help="lowest FPN level of a bare state dict teacher (default 3; 2 for fasterrcnn and maskrcnn)",
    )
    p.add_argument(
        "--max-level",
        type=CheckedType(int, minimum=2, maximum=8),
        default=None,
        help="highest FPN level of a bare state dict teacher (default 7; 6 for fasterrcnn and maskrcnn)",
    )
    p.add_argument("--seed", type=int, default=0, help="seed of the data order, flips and fake instances")
    p.add_argument("--resume", default=None, help="checkpoint.pth of an interrupted pre-training")
    p.add_argument(
        "--overwrite",
        action="store_true",
        help="start a new pre-training in an --output-dir that holds another one's files (they are "
        "deleted when it starts); without it such a directory is refused",
    )
    p.add_argument(
        "--stop-after-iters",
        type=int_at_least(1),
        default=None,
        help="stop after this many iterations with a checkpoint (continue with --resume)",
    )
    _add_icd_flags(p.add_argument_group("ICD teacher side"), "pretrain")
    return p


def _flag_recorder(parser: argparse.ArgumentParser, preset: str | None) -> FlagRecorder:
    """Records the flags added to ``parser``; a --config ``preset`` that does not load is a usage error."""
    try:
        return FlagRecorder(parser, preset)
    except (OSError, ValueError) as err:
        parser.error(str(err))


def _apply_preset(p: FlagRecorder, ignore: set[str] | None = None) -> None:
    """The preset's values become defaults of ``p``'s flags; a bad key or value is a usage error."""
    try:
        p.apply_preset(ignore or set())
    except ValueError as err:
        p.parser.error(str(err))


def _train_parser(sub, preset: str | None = None) -> FlagRecorder:
    """The ``icd train`` parser (``.parser``) and the record of its flags (``.flags``)."""
    from icd.engine.health import HEALTH_ACTIONS
    from icd.engine.run_config import PROJECTION_OPTIMIZERS, DistillConfig, LoopConfig, OptimConfig, TrainHooksConfig
    from icd.engine.speed import COMPILE_BACKENDS

    # the defaults of the loop, the hooks, the optimisers and the distillation, stated once (on their fields)
    loop, hooks, optimisers, distill = LoopConfig(), TrainHooksConfig(), OptimConfig(), DistillConfig()
    p = _flag_recorder(_command(sub, "train", **COMMAND_TEXT["train"]), preset)
    _add_data_flags(p)
    _add_run_flags(p)
    _add_tensorboard_flag(p)
    _add_model_flags(p)
    p.add_argument(
        "--flip-prob", type=finite_float(minimum=0.0, maximum=1.0), default=0.5, help="horizontal flip probability"
    )
    _add_drop_empty_categories_flag(p)
    p.add_argument(
        "--config",
        default=None,
        metavar="PRESET.toml",
        help="a preset (configs/): its keys are defaults of these flags; flags given here win",
    )
    p.add_argument("--epochs", type=int_at_least(1), default=12, help="length of the run (unless --iters)")
    p.add_argument(
        "--iters",
        type=int_at_least(1),
        default=None,
        help="length of the run in iterations (the 1x schedule: 90000 at 16 images per "
        "iteration); overrides --epochs",
    )
    p.add_argument(
        "--lr-steps",
        type=int_at_least(1),
        nargs="+",
        default=None,
        help="iterations where the lr drops x0.1 (default 2/3 and 8/9 of the run)",
    )
    p.add_argument(
        "--stop-after-iters",
        type=int_at_least(1),
        default=None,
        help="stop after this many iterations of the schedule with a checkpoint written "
        "(continue with --resume); the schedule stays that of the whole run",
    )
    p.add_argument(
        "--lr",
        type=finite_float(above=0.0),
        default=None,
        help="student lr (default: SGD 0.01 per 16 images, 0.02 for fasterrcnn and maskrcnn; AdamW 1e-4 for "
        "rtdetr; scaled to batch-size x processes)",
    )
    p.add_argument(
        "--momentum", type=finite_float(minimum=0.0, below=1.0), default=optimisers.momentum,
        help="SGD momentum (AdamW: unused)",
    )  # fmt: skip
    p.add_argument(
        "--weight-decay", "--wd", type=finite_float(minimum=0.0), default=optimisers.weight_decay,
        help="student weight decay",
    )  # fmt: skip
    p.add_argument(
        "--warmup-iters",
        type=int_at_least(0),
        default=None,
        help="linear lr warm-up (default min(1000, 10%% of the run))",
    )
    p.add_argument("--resume", default=None, help="checkpoint to continue from exactly")
    p.add_argument(
        "--allow-resume-changes",
        action="store_true",
        help="with --resume: accept flags that change the lr schedule (--lr, --epochs, --iters, "
        "--lr-steps, ...) or the data order (--batch-size, --seed, processes); the run goes on with "
        "the new lr schedule from the checkpoint's iteration, and the interrupted epoch after the "
        "images it had read (restarted with another seed or other images)",
    )
    p.add_argument(
        "--overwrite",
        action="store_true",
        help="start a new run in an --output-dir that holds another run's checkpoint or metrics "
        "(they are deleted when training starts); without it such a directory is refused",
    )
    p.add_argument("--seed", type=int, default=0, help="seed of the initialisation, data order and flips")
    p.add_argument(
        "--print-freq",
        type=int_at_least(1),
        default=loop.print_freq,
        help="iterations per metrics line; the losses of the steps between stay on the device and are "
        "read (and checked for NaN/inf) together at each line, so a step does not wait for the GPU",
    )
    p.add_argument(
        "--compile",
        action="store_true",
        help="torch.compile the student's and the teacher's ResNet and FPN and the distiller (the first "
        "steps take minutes to compile; docs/training.md, On a GPU)",
    )
    p.add_argument(
        "--compile-backend",
        choices=COMPILE_BACKENDS,
        default=None,
        help="torch.compile backend of --compile (default inductor; aot_eager: no code generation, for "
        "checking on a CPU)",
    )
    p.add_argument(
        "--checkpoint-every",
        type=int_at_least(0),
        default=hooks.checkpoint_every,
        help="also write checkpoint.pth every N iterations (0: each epoch only)",
    )
    p.add_argument(
        "--epoch-checkpoint-every",
        type=int_at_least(0),
        default=hooks.epoch_checkpoint_every,
        help="also keep model_{epoch}.pth every N epochs (0: never). Each is a whole checkpoint like "
        "checkpoint.pth, weights and optimiser state: about twice the model's weights, ~260 MB for "
        "RetinaNet R50 and ~160 MB for R18 at 80 classes, per file (torchvision writes one every epoch)",
    )
    p.add_argument(
        "--eval-every", type=int_at_least(0), default=hooks.eval_every, help="evaluate every N epochs (and last)"
    )
    p.add_argument("--no-eval", action="store_true", help="no evaluation (no val split needed)")
    p.add_argument(
        "--on-unhealthy",
        choices=HEALTH_ACTIONS,
        default=hooks.on_unhealthy,
        help="a loss term stuck at one value for --health-window iterations, or growing 1000x "
        "over its recent median: warn once per loss, or stop the run (exit status 1)",
    )
    p.add_argument(
        "--health-window",
        type=int_at_least(2),
        default=hooks.health_window,
        help="iterations a loss must stay constant to count as stuck (and the history of the "
        "blow-up check)",
    )
    p.add_argument(
        "--attention-detail",
        action="store_true",
        help="ICD runs: besides lift and distinctness (overall, per level) at each evaluation, measure "
        "them per instance size, where the attention goes (own box, other instances, background, "
        "image border, padding; per level) and the auxiliary task's losses and real/fake AUC per instance "
        "size, into metrics.jsonl",
    )
    g = p.add_argument_group("distillation")
    g.add_argument(
        "--teacher",
        default=None,
        help="teacher checkpoint (icd train's checkpoint.pth or model_best.pth, or a state "
        "dict with --teacher-detector/--teacher-backbone)",
    )
    from icd.nn.methods import METHODS

    g.add_argument(
        "--distill",
        choices=list(METHODS),
        default=distill.method,
        help=", ".join(m.summary for m in METHODS.values()),
    )
    g.add_argument(
        "--inherit-teacher",
        default=distill.inherit_teacher,
        metavar="PARTS",
        help="initialise the student's parts from the teacher: 'neck' (FPN), 'head' or "
        "'neck,head' (the published ICD configs); shapes must match",
    )
    g.add_argument(
        "--distill-weight",
        type=finite_float(minimum=0.0),
        default=None,
        help=f"loss weight (default {'; '.join(m.weight_default for m in METHODS.values() if m.build is not None)})",
    )
    g.add_argument(
        "--distill-warmup-iters",
        type=int_at_least(0),
        default=None,
        help="ICD: iterations with the student's features detached "
        "(default min(1000, 10%% of the run))",
    )
    _add_icd_flags(g, "train")
    g.add_argument(
        "--icd-cuda-graphs",
        action="store_true",
        help="replay ICD's distiller forward and backward as CUDA graphs (torch.compile mode "
        "reduce-overhead); needs --icd-static-shapes and a CUDA --device",
    )
    g.add_argument(
        "--icd-lr",
        type=finite_float(minimum=0.0),
        default=optimisers.teacher_lr,
        help="AdamW lr of ICD's teacher side (encoder, decoder, aux head); cosine decay over the run",
    )
    g.add_argument(
        "--icd-clip",
        type=finite_float(above=0.0),
        default=optimisers.teacher_clip,
        help="gradient-norm clip of ICD's teacher side",
    )
    g.add_argument(
        "--icd-init",
        default=None,
        metavar="TEACHER_SIDE.pth",
        help="start ICD's teacher side from `icd pretrain`'s teacher_side.pth (checked against "
        "this teacher: classes, channels, heads, layers, levels, weights)",
    )
    g.add_argument(
        "--icd-projection-optimizer",
        choices=PROJECTION_OPTIMIZERS,
        default=optimisers.projection_optimizer,
        help="who trains the student's ICD value projection: the student's SGD (default) or, as "
        "the published code does, the teacher side's AdamW under its joint norm clip",
    )
    if preset is not None:
        _apply_preset(p)
    return p


def _eval_parser(sub, preset: str | None = None) -> FlagRecorder:
    p = _flag_recorder(_command(sub, "eval", **COMMAND_TEXT["eval"]), preset)
    p.add_argument(
        "--checkpoint", "--weights", required=True, dest="checkpoint", help="icd train's checkpoint, or a state dict"
    )
    p.add_argument(
        "--config",
        default=None,
        metavar="PRESET.toml",
        help="an icd train preset (configs/): its data, model and size keys are defaults of these flags "
        "(its training-only keys are ignored); flags given here win",
    )
    p.add_argument(
        "--attention-stats",
        action="store_true",
        help="also measure how instance-specific ICD's attention is (lift, distinctness, per level) "
        "and how concentrated its distillation weights are (peak) for an ICD student checkpoint; a "
        "file of `icd pretrain` gives these statistics only",
    )
    p.add_argument("--teacher", default=None, help="teacher checkpoint (default: the run's own)")
    _add_data_flags(p, splits=("val",))
    _add_run_flags(p)
    _add_model_flags(p, defaults=False, command="eval")
    if preset is not None:
        train_flags = _train_parser(argparse.ArgumentParser().add_subparsers()).flags
        _apply_preset(p, ignore=set(train_flags))
    return p


def _predict_parser(sub) -> argparse.ArgumentParser:
    from icd.data.coco import BAD_DATA_CHOICES

    p = _command(sub, "predict", **COMMAND_TEXT["predict"])
    p.add_argument(
        "--checkpoint",
        "--weights",
        required=True,
        dest="checkpoint",
        help="a checkpoint of icd train (checkpoint.pth, model_best.pth)",
    )
    p.add_argument("images", nargs="+", metavar="IMAGES", help="image files and folders of images (not recursive)")
    p.add_argument(
        "--score-threshold",
        "--score-thresh",
        dest="score_thresh",
        type=finite_float(minimum=0.0, maximum=1.0),
        default=0.5,
        help="lowest score of a detection written and drawn",
    )
    p.add_argument("--out", default="predictions", metavar="DIR", help="folder of detections.json and the PNGs")
    p.add_argument(
        "--categories",
        default=None,
        metavar="FILE",
        help="COCO annotation JSON whose categories name the classes (default: the names the checkpoint "
        "keeps; a checkpoint without them shows labels 0..C-1)",
    )
    p.add_argument(
        "--overwrite",
        action="store_true",
        help="replace the earlier prediction in --out (its detections.json and PNGs); files that are no "
        "prediction's are never written over",
    )
    p.add_argument("--batch-size", "-b", type=int_at_least(1), default=2, help="images per forward pass")
    p.add_argument("--device", default=None, help="cuda, cuda:N or cpu (default: cuda when available)")
    p.add_argument("--amp", action="store_true", help="mixed precision: float16 on CUDA, bfloat16 on CPU")
    p.add_argument(
        "--on-bad-data",
        choices=BAD_DATA_CHOICES,
        default="error",
        help="an image that cannot be read: report it and skip it, or stop",
    )
    p.add_argument("--no-progress", action="store_true", help="no tqdm bar")
    _add_debug_flag(p)
    return p


def _picture_path(text: str) -> str:
    """``icd plot --out``: a file name with a picture suffix (never a checkpoint's .pth)."""
    from icd.engine.metrics import PLOT_SUFFIXES

    if os.path.splitext(text)[1].lower() not in PLOT_SUFFIXES:
        raise argparse.ArgumentTypeError(f"{text}: expected a picture file ({', '.join(PLOT_SUFFIXES)})")
    return text


def _plot_parser(sub) -> argparse.ArgumentParser:
    p = _command(sub, "plot", **COMMAND_TEXT["plot"])
    p.add_argument("runs", nargs="+", metavar="RUN_DIR", help="output dirs with metrics.jsonl")
    p.add_argument(
        "--out", type=_picture_path, default=None, help="PNG path (default RUN_DIR/curves.png of the first)"
    )
    _add_debug_flag(p)
    return p


def _data_parser(sub) -> argparse.ArgumentParser:
    p = _command(sub, "data", **COMMAND_TEXT["data"])
    dsub = p.add_subparsers(dest="data_command", required=True)
    s = _command(
        dsub,
        "shapes",
        help="generate the seeded COCO-format shapes dataset",
        description="Write DIR/train, DIR/val PNGs and DIR/annotations/instances_{train,val}.json.",
    )
    s.add_argument("--out", required=True, metavar="DIR", help="the dataset root to write")
    s.add_argument("--num-train", type=int_at_least(1), default=2000, help="training images")
    s.add_argument("--num-val", type=int_at_least(1), default=500, help="validation images")
    # smaller than 48 px: the backgrounds fail
    s.add_argument("--image-size", type=int_at_least(48), default=256, help="side of the square images (pixels)")
    s.add_argument("--seed", type=int, default=0, help="seed of the generator (the same seed, the same files)")
    s.add_argument(
        "--scene",
        choices=("sparse", "dense"),
        default="sparse",
        help="sparse: 2-8 shapes of 12-200 px at COCO's three scales; dense: 20-40 shapes of 3-20 px in "
        "touching, overlapping clusters on a textured background (use e.g. --image-size 160)",
    )
    s.add_argument(
        "--format",
        choices=("coco", "yolo"),
        default="coco",
        help="yolo: also write DIR/yolo/{images,labels}/{train,val} (txt labels) and DIR/yolo/data.yaml "
        "for ultralytics",
    )
    s.add_argument(
        "--overwrite", action="store_true", help="replace a dataset already in DIR (without it: refused)"
    )
    _add_debug_flag(s)
    return p


def _demo_parser(sub) -> argparse.ArgumentParser:
    from icd.apps.demo.command import add_demo_flags

    p = _command(sub, "demo", **COMMAND_TEXT["demo"])
    add_demo_flags(p)
    _add_debug_flag(p)
    return p


def _study_parser(sub, preset: str | None = None) -> FlagRecorder:
    from icd.apps.study.command import add_study_flags

    p = _flag_recorder(_command(sub, "study", **COMMAND_TEXT["study"]), preset)
    _add_data_flags(p)
    add_study_flags(p)
    _add_debug_flag(p)
    try:
        p.apply_preset()
    except ValueError as err:
        p.parser.error(str(err).replace("not an icd train flag", "not an icd study flag"))
    return p


# what `icd --help` lists: each command's one-line help and the description of `icd <command> --help`
COMMAND_TEXT = {
    "train": {
        "help": "train a detector, plain or distilled from a teacher",
        "description": "Train a torchvision detector on a COCO-format dataset. Without --teacher: plain "
        "training (teachers, baselines). With --teacher CKPT: distillation (--distill icd or fpn-mse) "
        "and/or --inherit-teacher.",
    },
    "pretrain": {
        "help": "pre-train ICD's teacher side on a frozen teacher (once per teacher)",
        "description": "Train ICD's instance encoder, decoder and auxiliary head on the frozen teacher's FPN "
        "maps alone (no student), with lift and distinctness of the attention measured on the val split "
        "every --eval-every iterations. Writes teacher_side.pth (the best-scoring evaluation) for `icd "
        "train --icd-init`, checkpoint.pth for --resume, metrics.jsonl and attention_curve.png.",
    },
    "eval": {
        "help": "COCO bbox (and segm) AP of a checkpoint; writes the detections JSON",
        "description": "Evaluate a checkpoint (COCOeval bbox: AP, AP50, AP75, APs, APm, APl; for maskrcnn also "
        "segm: segm_AP, ...) and write detections_{split}.json to --output-dir. The architecture comes "
        "from the checkpoint; the model flags are only needed for a bare state dict.",
    },
    "predict": {
        "help": "detect objects in images with a checkpoint: COCO-format JSON and PNGs with the boxes drawn",
        "description": "Run a trained detector on image files and folders; write OUT/detections.json (COCO "
        "format: images, categories, one annotation per detection with its score) and OUT/<image>.png "
        "with each box, class name and score drawn.",
    },
    "plot": {"help": "loss and AP curves of runs as a PNG"},
    "data": {"help": "dataset tools"},
    "demo": {
        "help": "teacher -> student with ICD on the shapes data, end to end (CPU, ~10 min)",
        "description": "Generate the shapes data, train a teacher and a student baseline, distil the student "
        "with ICD and with FPN-MSE, evaluate the four; write the table, the curves and the attention maps "
        "under --out. A finished teacher there is reused.",
    },
    "study": {
        "help": "does distillation pay on my data, and which method? runs and compares them over seeds",
        "description": "Check the teacher on val, then train the student with each method (baseline, fpn-mse, "
        "icd, icd-pre, inherit, +inherit) for each seed and schedule, one icd train process per run in "
        "parallel slots; write study.md (per-run AP, mean ± std, paired per-seed differences, verdicts, "
        "loss-health warnings, the commands) and curves.png under --out. --resume finishes an interrupted "
        "study. Flags or a TOML file of them (--config); docs/study.md.",
    },
}


def icd_version() -> str:
    """The installed distribution's version (package metadata), else ``icd.__version__``."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("icd")
    except PackageNotFoundError:
        import icd

        return icd.__version__


def build_parser(
    train_preset: str | None = None,
    eval_preset: str | None = None,
    commands: Collection[str] | None = None,
    study_preset: str | None = None,
) -> argparse.ArgumentParser:
    """The ``icd`` parser; ``train_preset`` / ``eval_preset``: a --config file whose keys become
    defaults of ``icd train`` / ``icd eval``; ``commands``: the commands whose flags are added (each
    imports what its flags offer; None: all), the others are listed by ``icd --help`` only."""
    parser = _Parser(
        prog="icd",
        description="Instance-Conditional Knowledge "
        "Distillation for object detection: training and evaluation",
    )
    parser.add_argument("--version", action="version", version=f"icd {icd_version()}")
    sub = parser.add_subparsers(dest="command", required=True)
    flags = {
        "train": lambda: _train_parser(sub, train_preset),
        "pretrain": lambda: _pretrain_parser(sub),
        "eval": lambda: _eval_parser(sub, eval_preset),
        "predict": lambda: _predict_parser(sub),
        "plot": lambda: _plot_parser(sub),
        "data": lambda: _data_parser(sub),
        "demo": lambda: _demo_parser(sub),
        "study": lambda: _study_parser(sub, study_preset),
    }
    for name, add in flags.items():
        if commands is None or name in commands:
            add()
        else:
            _command(sub, name, **COMMAND_TEXT[name])
    return parser


def _run_eval(args: argparse.Namespace) -> dict[str, float]:
    from icd.data.coco import CocoDetection, dataset_paths
    from icd.detection.adapters import family_of
    from icd.engine.checkpoint import load_checkpoint
    from icd.engine.distributed import cleanup, init_distributed
    from icd.engine.evaluator import eval_loader, evaluate
    from icd.engine.metrics import MetricsLog
    from icd.engine.output_dir import probe_writable
    from icd.engine.run_spec import (
        BARE_STATE_DICT_NORM,
        build_loaded_detector,
        checkpoint_categories,
        checkpoint_detector_spec,
    )

    info = init_distributed(args.device)
    try:
        if info.is_main:  # the detections and metrics are written at the end: fail now, not then
            probe_writable(args.output_dir)
        image_dir, ann = dataset_paths(args.data_path, args.val_split, args.val_ann, args.val_images, "val")
        ckpt = load_checkpoint(args.checkpoint, "--checkpoint")
        trained = checkpoint_categories(ckpt)  # the classes, when the checkpoint says them
        classes = None if trained is None else [c["id"] for c in trained]
        dataset = CocoDetection(image_dir, ann, on_bad_data=args.on_bad_data, categories=classes)
        if trained is not None and info.is_main:
            _warn_renamed_classes(trained, dataset, args.checkpoint)
        elif info.is_main and "model" in ckpt:  # an icd train checkpoint written before names were kept
            logging.getLogger("icd.eval").info(
                "%s keeps no class names; the per-category table names the classes after the data", args.checkpoint
            )
        if "teacher_side" in ckpt:  # icd pretrain's output: attention statistics only
            return _attention_stats(args, ckpt, dataset, info)
        flags = None  # a bare state dict's architecture: the model flags, frozen_bn unless --norm
        if args.detector is not None and args.backbone is not None:
            values = {"detector": args.detector, "backbone": args.backbone, "fpn_channels": args.fpn_channels,
                      "min_level": args.min_level, "max_level": args.max_level,
                      "norm": args.norm or BARE_STATE_DICT_NORM}  # fmt: skip
            flags = family_of(args.detector).spec_from_args(values, dataset.num_classes)
        spec = checkpoint_detector_spec(
            ckpt,
            f"--checkpoint {args.checkpoint}",
            dataset.num_classes,
            flags=flags,
            flags_hint="give --detector and --backbone (and --fpn-channels, --norm if not the defaults)",
        )
        family = family_of(spec.detector)
        sizes = {"min_size": args.min_size, "max_size": args.max_size, "score_thresh": args.score_thresh}
        spec = family.with_overrides(spec, sizes)
        model = build_loaded_detector(spec, ckpt, what="evaluated", source=f"--checkpoint {args.checkpoint}")
        model.to(info.device)
        loader = eval_loader(dataset, info, args.batch_size, args.workers)
        metrics = evaluate(
            model,
            loader,
            dataset,
            info,
            family=family,
            spec=spec,
            amp=args.amp,
            amp_dtype=args.amp_dtype,
            output_dir=args.output_dir,
            split=args.val_split,
            progress=not args.no_progress,
        )
        if args.attention_stats and info.is_main:
            from icd.engine.attention import checkpoint_attention_statistics

            metrics.update(checkpoint_attention_statistics(ckpt, args.teacher, dataset, info.device))
        if info.is_main:
            MetricsLog(args.output_dir).write(
                {
                    "type": "eval",
                    "iter": int(ckpt.get("iteration", 0)),
                    "epoch": int(ckpt.get("epoch", 0)) - 1,
                    "checkpoint": args.checkpoint,
                    **metrics,
                }
            )
            print(" ".join(f"{k} {v:.2f}" for k, v in metrics.items()))
            _print_class_table(args.output_dir, args.val_split)
        return metrics
    finally:
        cleanup(info)


def _warn_renamed_classes(trained: list[dict], dataset, checkpoint: str) -> None:
    """A warning when the data names a class otherwise than the checkpoint (same id, another name)."""
    renamed = [
        f"{c['id']}: {c['name']!r} there, {name!r} here"
        for c, name in zip(trained, dataset.category_names, strict=True)
        if c["name"] != name
    ]
    if renamed:
        logging.getLogger("icd.eval").warning(
            "%s was trained on categories named otherwise (%s); the table uses the data's names",
            checkpoint, "; ".join(renamed),
        )  # fmt: skip


def _print_class_table(output_dir: str, split: str) -> None:
    """The per-category AP table that the evaluation wrote, and where it is."""
    from icd.detection.class_table import TABLE_FILE

    base = os.path.join(output_dir, TABLE_FILE.format(split=split))
    with open(f"{base}.md") as f:
        print(f"\nAP per category ({base}.json / .csv / .md):\n{f.read()}", end="")


def _attention_stats(args: argparse.Namespace, ckpt: dict, dataset, info) -> dict[str, float]:
    from icd.engine.attention import checkpoint_attention_statistics

    stats = checkpoint_attention_statistics(ckpt, args.teacher, dataset, info.device)
    if info.is_main:
        print(" ".join(f"{k} {v:.3f}" if isinstance(v, float) else f"{k} {v}" for k, v in stats.items()))
    return stats


def _train_preset_of(argv: Sequence[str], command: str = "train") -> str | None:
    """The --config of an ``icd train`` (or ``command``) command line (None for other commands)."""
    if not argv or argv[0] != command:
        return None
    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument("--config", default=None)
    return pre.parse_known_args(argv[1:])[0].config


def _check_data_flags(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """Each split's files exist: --data-path's layout, or the --*-ann / --*-images pair."""
    from icd.data.coco import dataset_paths

    if args.command in ("train", "pretrain"):
        splits = ["train"] if getattr(args, "no_eval", False) else ["train", "val"]
    elif args.command == "eval":
        splits = ["val"]
    else:
        return
    for split in splits:
        try:
            ann, images = getattr(args, f"{split}_ann"), getattr(args, f"{split}_images")
            dataset_paths(args.data_path, getattr(args, f"{split}_split"), ann, images, split)
        except ValueError as err:  # flags that do not go together: a usage error
            parser.error(str(err))
        # a missing file propagates: main() prints it as one line, or raises it under --debug


def _train_flags_set(argv: Sequence[str], preset: str | None) -> set[str]:
    """The train flags (dests) given on the command line or by the --config preset, whatever
    their value (also a value equal to the default)."""
    p = _train_parser(argparse.ArgumentParser(prog="icd", add_help=False).add_subparsers(), preset)
    unset = object()  # every flag starts as this; argparse fills in defaults only for missing attributes
    parsed = p.parser.parse_known_args(list(argv[1:]), argparse.Namespace(**dict.fromkeys(p.flags, unset)))[0]
    return {dest for dest, value in vars(parsed).items() if value is not unset} | set(p.preset)


def _check_backend(args: argparse.Namespace) -> None:
    """ICD_BACKEND and ICD_CHECKS are known values, and the ops backend (--icd-backend, else
    ICD_BACKEND) runs here and on --device: a one-line error now, not a traceback at the first step."""
    from icd.ops.dispatch import backend_of, env_backend
    from icd.ops.validation import check_mode

    check_mode()
    from_env = env_backend()
    name = getattr(args, "icd_backend", None) or from_env
    if name is None or args.command not in ("train", "pretrain", "eval"):
        return
    from icd.engine.distributed import resolve_device

    where = f"--icd-backend {name}" if getattr(args, "icd_backend", None) else f"ICD_BACKEND={name}"
    backend, device = backend_of(name), resolve_device(args.device)
    if not backend.available:
        raise ConfigError(where, f"is not available here: {backend.why_not}. {backend.how_to_get}")
    if not backend.runs_on(device):
        raise ConfigError(where, f"runs on {backend.where}; this run's device is {device} (--device)")


def _debugging(argv: Sequence[str]) -> bool:
    return "--debug" in argv or os.environ.get(DEBUG_ENV, "") not in ("", "0")


def _one_line(err: BaseException) -> str:
    text = err.args[0] if isinstance(err, KeyError) and err.args else str(err)
    return " ".join(str(text).split()) or type(err).__name__


def main(argv: Sequence[str] | None = None) -> int:
    """``icd``: 0 when done; a user's error prints one line ``icd: error: ...`` and gives 2 (1 for
    a run that failed, e.g. went non-finite); --debug or ICD_DEBUG=1 raises it instead."""
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        return _main(argv)
    except USER_ERRORS as err:
        if _debugging(argv):
            raise
        print(f"icd: error: {_one_line(err)}", file=sys.stderr, flush=True)
        return getattr(err, "exit_code", 2)


def _command_of(argv: Sequence[str]) -> str | None:
    """The command an ``icd`` command line runs (None for ``icd --help``, ``icd --version``)."""
    return argv[0] if argv and not argv[0].startswith("-") else None


# options whose value is itself a string of flags ("--train-flags '--icd-clamp-fakes'")
FLAG_STRING_OPTIONS = ("--train-flags", "--pretrain-flags")


def _glue_flag_strings(argv: list[str]) -> list[str]:
    """``argv`` with ``--train-flags VALUE`` as ``--train-flags=VALUE``: argparse takes a lone value
    that starts with ``-`` (one quoted flag, ``'--icd-clamp-fakes'``) for an option, not a value."""
    glued: list[str] = []
    values = iter(argv)
    for arg in values:
        if arg in FLAG_STRING_OPTIONS:
            value = next(values, None)
            glued.append(arg if value is None else f"{arg}={value}")
        else:
            glued.append(arg)
    return glued


def _main(argv: list[str]) -> int:
    command = _command_of(argv)
    commands = () if command is None else (command,)
    parser = build_parser(_train_preset_of(argv), _train_preset_of(argv, "eval"), commands=commands,
                          study_preset=_train_preset_of(argv, "study"))  # fmt: skip
    args = parser.parse_args(_glue_flag_strings(argv))
    if args.command == "train":  # flags and another run's files first: before any data is looked at
        from icd.engine.run_spec import detector_spec_from_args

        check_teacher_flags(args, _train_flags_set(argv, args.config), args.config)
        detector_spec_from_args(args, num_classes=1)  # the model flags fit together (levels, widths)
    if args.command in ("train", "pretrain") and int(os.environ.get("RANK", "0")) == 0:
        from icd.engine.output_dir import check_output_dir

        check_output_dir(args.output_dir, args.resume, args.overwrite, args.command)
    _check_backend(args)
    if getattr(args, "amp_dtype", None) is not None and not args.amp:
        raise ConfigError(f"--amp-dtype {args.amp_dtype}: needs --amp (without it the run is in float32)")
    _check_data_flags(parser, args)
    if getattr(args, "tensorboard", False):
        from icd.engine.tensorboard import tensorboard_missing

        if tensorboard_missing():
            parser.error(tensorboard_missing())
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    if args.command == "train":
        from icd.engine.trainer import train

        train(args)
    elif args.command == "pretrain":
        from icd.engine.pretrain import pretrain

        pretrain(args)
    elif args.command == "eval":
        _run_eval(args)
    elif args.command == "predict":
        from icd.engine.predict import predict

        print(predict(args))
    elif args.command == "plot":
        from icd.engine.metrics import plot_runs

        out = args.out or os.path.join(args.runs[0], "curves.png")
        print(plot_runs(args.runs, out))
    elif args.command == "data":
        from icd.data.shapes import generate

        paths = generate(
            args.out, args.num_train, args.num_val, args.image_size, args.seed, args.overwrite, args.scene
        )
        for split, path in paths.items():
            print(f"{split}: {path}")
        if args.format == "yolo":
            from icd.data.yolo import export_yolo

            image_dirs = {split: os.path.join(args.out, split) for split in paths}
            print(f"yolo: {export_yolo(paths, image_dirs, os.path.join(args.out, 'yolo'))}")
    elif args.command == "demo":
        from icd.apps.demo.command import run_command

        return run_command(args)
    elif args.command == "study":
        from icd.apps.study.command import run_command as run_study_command

        return run_study_command(args, argv)
    return 0


if __name__ == "__main__":
    sys.exit(main())
