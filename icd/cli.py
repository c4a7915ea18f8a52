"""``icd`` command line: train, eval, plot, data shapes, demo (also ``python -m icd``).

    icd train --data-path DIR --detector retinanet --backbone resnet101 --output-dir runs/teacher
    icd train --data-path DIR --backbone resnet18 --teacher runs/teacher/checkpoint.pth \\
              --distill icd --output-dir runs/icd
    icd train --config configs/retinanet/r50_1x_icd.toml --data-path /data/coco
    icd eval --data-path DIR --checkpoint runs/icd/checkpoint.pth
    icd plot runs/baseline runs/icd --out curves.png
    icd data shapes --out DIR --num-train 2000 --num-val 500
    icd demo --out demo_output
    torchrun --nproc_per_node 8 -m icd train ...
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import os
import sys
from collections.abc import Sequence

from icd.config import FlagRecorder
from icd.data.coco import BAD_DATA_CHOICES
from icd.detection.models import BACKBONES, DETECTORS, NORMS
from icd.engine.distill import DISTILL_METHODS, FPN_MSE_NORMS
from icd.engine.health import HEALTH_ACTIONS
from icd.engine.optim import TEACHER_SIDE_CLIP, TEACHER_SIDE_LR
from icd.engine.pretrain import PRETRAIN_ATTENTION_GAIN, PRETRAIN_CLIP, PRETRAIN_LR
from icd.engine.run_spec import BARE_STATE_DICT_NORM
from icd.errors import ConfigError, IcdError
from icd.flags import CheckedType, check_teacher_flags, finite_float, int_at_least
from icd.ops.dispatch import BACKENDS

# errors a user causes: one line "icd: error: ..." and exit 2 (IcdError: its exit_code), no traceback
USER_ERRORS = (IcdError, FileNotFoundError, FileExistsError, IsADirectoryError, NotADirectoryError, PermissionError)
DEBUG_ENV = "ICD_DEBUG"


class _Parser(argparse.ArgumentParser):
    """argparse with one-line errors: ``icd: error: <message> (see: icd train --help)``, exit 2."""

    def error(self, message: str):
        self.exit(2, f"icd: error: {' '.join(message.split())} (see: {self.prog} --help)\n")


def _add_data_flags(p: argparse.ArgumentParser | FlagRecorder) -> None:
    p.add_argument(
        "--data-path",
        default=None,
        help="COCO-layout root: annotations/instances_{split}[2017].json and an "
        "image folder {split}[2017]/ (or give each split's files with --*-ann and --*-images)",
    )
    p.add_argument(
        "--val-ann",
        default=None,
        metavar="FILE",
        help="COCO-format annotation JSON of the split to evaluate (any export), instead of --data-path",
    )
    p.add_argument(
        "--val-images",
        default=None,
        metavar="DIR",
        help="the folder that --val-ann's file_names are relative to",
    )
    p.add_argument("--batch-size", "-b", type=int_at_least(1), default=2, help="images per process")
    p.add_argument("--workers", "-j", type=int_at_least(0), default=4, help="data loading processes")
    p.add_argument(
        "--on-bad-data",
        choices=BAD_DATA_CHOICES,
        default="error",
        help="a corrupt image or malformed annotation: report it and skip it, or stop",
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
        help="mixed precision: float16 + GradScaler on CUDA, bfloat16 on CPU",
    )
    p.add_argument("--output-dir", default="output", help="checkpoints, metrics.jsonl, detections")
    p.add_argument("--no-progress", action="store_true", help="no tqdm bars")
    _add_debug_flag(p)


def _add_debug_flag(p: argparse.ArgumentParser | FlagRecorder) -> None:
    p.add_argument(
        "--debug",
        action="store_true",
        help="on an error, show the traceback, not only the one-line message (also: ICD_DEBUG=1)",
    )


def _add_model_flags(p: argparse.ArgumentParser | FlagRecorder, defaults: bool = True) -> None:
    d = (lambda v: v) if defaults else (lambda v: None)
    p.add_argument("--detector", choices=DETECTORS, default=d("retinanet"))
    p.add_argument("--backbone", choices=BACKBONES, default=d("resnet50"))
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
    p.add_argument("--fpn-channels", type=int_at_least(1), default=d(256))
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


def _add_icd_flags(g) -> None:
    """ICD's distiller settings and the bare-state-dict teacher flags (train and pretrain)."""
    g.add_argument("--icd-heads", type=int_at_least(1), default=8)
    g.add_argument("--icd-layers", type=int_at_least(1), default=1)
    g.add_argument(
        "--icd-max-labels",
        type=int_at_least(1),
        default=None,
        help="real + fake instances per image (default 300, 100 for fasterrcnn and maskrcnn)",
    )
    g.add_argument("--icd-neg-ratio", type=finite_float(minimum=0.0), default=5.0)
    g.add_argument(
        "--icd-clamp-fakes",
        action="store_true",
        help="clip fake instance boxes to their image (the published code does; default: not)",
    )
    g.add_argument("--icd-backend", choices=BACKENDS, default=None, help="icd.ops backend (default per device)")
    g.add_argument(
        "--icd-static-shapes",
        action="store_true",
        help="K = --icd-max-labels instance slots in every batch, so that no shape depends on the box "
        "counts (for torch.compile and CUDA graphs); default: K = the batch's largest count, "
        "1.6x faster eager on CPU (docs/nn.md, Static shapes)",
    )
    g.add_argument("--teacher-detector", choices=DETECTORS, default=None)
    g.add_argument("--teacher-backbone", choices=BACKBONES, default=None)
    g.add_argument("--teacher-fpn-channels", type=int_at_least(1), default=256)
    g.add_argument("--teacher-norm", choices=NORMS, default=BARE_STATE_DICT_NORM)


def _pretrain_parser(sub) -> argparse.ArgumentParser:
    p = sub.add_parser(
        "pretrain",
        help="pre-train ICD's teacher side on a frozen teacher (once per teacher)",
        description="Train ICD's instance encoder, decoder and auxiliary head on the frozen "
        "teacher's FPN maps alone (no student), with lift and distinctness of the attention "
        "measured on the val split every --eval-every iterations. Writes teacher_side.pth (the "
        "best-scoring evaluation) for `icd train --icd-init`, checkpoint.pth for --resume, "
        "metrics.jsonl and attention_curve.png.",
    )
    _add_data_flags(p)
    p.add_argument("--teacher", required=True, help="teacher checkpoint (icd train's)")
    p.add_argument("--iters", type=int_at_least(1), default=600, help="pre-training iterations")
    p.add_argument(
        "--lr", type=finite_float(above=0.0), default=PRETRAIN_LR, help="AdamW lr (cosine decay over --iters)"
    )
    p.add_argument("--clip", type=finite_float(above=0.0), default=PRETRAIN_CLIP, help="gradient-norm clip")
    p.add_argument(
        "--attention-gain",
        type=finite_float(above=0.0),
        default=PRETRAIN_ATTENTION_GAIN,
        help="multiply the decoder's query projection weights by this at the start (sharper logits)",
    )

    p.add_argument("--eval-every", type=int_at_least(1), default=100, help="iterations between attention statistics")
    p.add_argument(
        "--cache-gb",
        type=finite_float(minimum=0.0),
        default=2.0,
        help="memory for the teacher's FPN maps of the training and val images, reused across epochs "
        "and evaluations (0: recompute)",
    )
    p.add_argument(
        "--attention-images", type=int_at_least(1), default=None, help="val images for the statistics (default all)"
    )
    p.add_argument("--print-freq", type=int_at_least(1), default=20, help="iterations per metrics line")
    p.add_argument("--train-split", default="train")
    p.add_argument("--val-split", default="val")
    p.add_argument(
        "--flip-prob", type=finite_float(minimum=0.0, maximum=1.0), default=0.5, help="horizontal flip probability"
    )
    p.add_argument("--min-level", type=int, default=None, help=argparse.SUPPRESS)
    p.add_argument("--max-level", type=int, default=None, help=argparse.SUPPRESS)
    p.add_argument("--min-size", type=int, nargs="+", default=[800], help=argparse.SUPPRESS)
    p.add_argument("--max-size", type=int, default=1333, help=argparse.SUPPRESS)
    p.add_argument("--seed", type=int, default=0)
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
    _add_icd_flags(p.add_argument_group("ICD teacher side"))
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
    parser = sub.add_parser(
        "train",
        help="train a detector, plain or distilled from a teacher",
        description="Train a torchvision detector on a COCO-format dataset. "
        "Without --teacher: plain training (teachers, baselines). With "
        "--teacher CKPT: distillation (--distill icd or fpn-mse) and/or --inherit-teacher.",
    )
    p = _flag_recorder(parser, preset)
    _add_data_flags(p)
    _add_model_flags(p)
    p.add_argument(
        "--train-ann",
        default=None,
        metavar="FILE",
        help="COCO-format annotation JSON of the training images (any export, e.g. Roboflow's "
        "train/_annotations.coco.json), instead of --data-path",
    )
    p.add_argument(
        "--train-images", default=None, metavar="DIR", help="the folder that --train-ann's file_names are relative to"
    )
    p.add_argument("--train-split", default="train")
    p.add_argument("--val-split", default="val")
    p.add_argument(
        "--flip-prob", type=finite_float(minimum=0.0, maximum=1.0), default=0.5, help="horizontal flip probability"
    )
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
        help="SGD lr (default: 0.01 per 16 images, 0.02 for fasterrcnn and maskrcnn, scaled to "
        "batch-size x processes)",
    )
    p.add_argument("--momentum", type=finite_float(minimum=0.0, below=1.0), default=0.9)
    p.add_argument("--weight-decay", "--wd", type=finite_float(minimum=0.0), default=1e-4)
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
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--print-freq", type=int_at_least(1), default=20, help="iterations per metrics line")
    p.add_argument(
        "--checkpoint-every",
        type=int_at_least(0),
        default=0,
        help="also write checkpoint.pth every N iterations (0: each epoch only)",
    )
    p.add_argument(
        "--epoch-checkpoint-every",
        type=int_at_least(0),
        default=1,
        help="keep model_{epoch}.pth every N epochs, as torchvision does each epoch (0: never)",
    )
    p.add_argument("--eval-every", type=int_at_least(0), default=1, help="evaluate every N epochs (and last)")
    p.add_argument("--no-eval", action="store_true", help="no evaluation (no val split needed)")
    p.add_argument(
        "--on-unhealthy",
        choices=HEALTH_ACTIONS,
        default="warn",
        help="a loss term stuck at one value for --health-window iterations, or growing 1000x "
        "over its recent median: warn once per loss, or stop the run (exit status 1)",
    )
    p.add_argument(
        "--health-window",
        type=int_at_least(2),
        default=50,
        help="iterations a loss must stay constant to count as stuck (and the history of the "
        "blow-up check)",
    )
    g = p.add_argument_group("distillation")
    g.add_argument(
        "--teacher",
        default=None,
        help="teacher checkpoint (icd train's checkpoint.pth or model_best.pth, or a state "
        "dict with --teacher-detector/--teacher-backbone)",
    )
    g.add_argument(
        "--distill",
        choices=DISTILL_METHODS,
        default="icd",
        help="icd, fpn-mse (normalised FPN feature imitation, see --fpn-mse-norm) or none (no "
        "distillation loss: with --inherit-teacher, the inheritance-only control)",
    )
    g.add_argument(
        "--fpn-mse-norm",
        choices=FPN_MSE_NORMS,
        default="channel",
        help="fpn-mse: normalise both maps per channel over each image's locations (channel, as "
        "PKD), per location over channels (layer), or not at all (none: the raw MSE)",
    )
    g.add_argument(
        "--inherit-teacher",
        default="",
        metavar="PARTS",
        help="initialise the student's parts from the teacher: 'neck' (FPN), 'head' or "
        "'neck,head' (the published ICD configs); shapes must match",
    )
    g.add_argument(
        "--distill-weight",
        type=finite_float(minimum=0.0),
        default=None,
        help="loss weight (default icd: 8, 3 for fasterrcnn and maskrcnn; fpn-mse: 16 per channel, 2 layer, 1 raw)",
    )
    g.add_argument(
        "--distill-warmup-iters",
        type=int_at_least(0),
        default=None,
        help="ICD: iterations with the student's features detached "
        "(default min(1000, 10%% of the run))",
    )
    _add_icd_flags(g)
    g.add_argument(
        "--icd-lr",
        type=finite_float(minimum=0.0),
        default=TEACHER_SIDE_LR,
        help="AdamW lr of ICD's teacher side (encoder, decoder, aux head); cosine decay over the run",
    )
    g.add_argument(
        "--icd-clip",
        type=finite_float(above=0.0),
        default=TEACHER_SIDE_CLIP,
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
        "--icd-mask-temperature",
        type=finite_float(above=0.0),
        default=None,
        help="temperature of the softmax that weights ICD's distillation loss over locations "
        "(default 1, the attention's own as in the paper; 4 with --icd-init, whose pre-trained "
        "heads put a third of their weight on one location)",
    )
    g.add_argument(
        "--icd-projection-optimizer",
        choices=("student", "teacher-side"),
        default="student",
        help="who trains the student's ICD value projection: the student's SGD (default) or, as "
        "the published code does, the teacher side's AdamW under its joint norm clip",
    )
    if preset is not None:
        _apply_preset(p)
    return p


def _eval_parser(sub, preset: str | None = None) -> FlagRecorder:
    parser = sub.add_parser(
        "eval",
        help="COCO bbox (and segm) AP of a checkpoint; writes the detections JSON",
        description="Evaluate a checkpoint (COCOeval bbox: AP, AP50, AP75, APs, "
        "APm, APl; for maskrcnn also segm: segm_AP, ...) and write detections_{split}.json to --output-dir. The "
        "architecture comes from the checkpoint; the model flags are only needed "
        "for a bare state dict.",
    )
    p = _flag_recorder(parser, preset)
    p.add_argument("--checkpoint", "--weights", required=True, dest="checkpoint")
    p.add_argument("--split", default="val")
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
    _add_data_flags(p)
    _add_model_flags(p, defaults=False)
    if preset is not None:
        train_flags = _train_parser(argparse.ArgumentParser().add_subparsers()).flags
        _apply_preset(p, ignore=set(train_flags))
    return p


def _picture_path(text: str) -> str:
    """``icd plot --out``: a file name with a picture suffix (never a checkpoint's .pth)."""
    from icd.engine.metrics import PLOT_SUFFIXES

    if os.path.splitext(text)[1].lower() not in PLOT_SUFFIXES:
        raise argparse.ArgumentTypeError(f"{text}: expected a picture file ({', '.join(PLOT_SUFFIXES)})")
    return text


def _plot_parser(sub) -> argparse.ArgumentParser:
    p = sub.add_parser("plot", help="loss and AP curves of runs as a PNG")
    p.add_argument("runs", nargs="+", metavar="RUN_DIR", help="output dirs with metrics.jsonl")
    p.add_argument(
        "--out", type=_picture_path, default=None, help="PNG path (default RUN_DIR/curves.png of the first)"
    )
    _add_debug_flag(p)
    return p


def _data_parser(sub) -> argparse.ArgumentParser:
    p = sub.add_parser("data", help="dataset tools")
    dsub = p.add_subparsers(dest="data_command", required=True)
    s = dsub.add_parser(
        "shapes",
        help="generate the seeded COCO-format shapes dataset",
        description="Write DIR/train, DIR/val PNGs and DIR/annotations/instances_{train,val}.json.",
    )
    s.add_argument("--out", required=True, metavar="DIR")
    s.add_argument("--num-train", type=int_at_least(1), default=2000)
    s.add_argument("--num-val", type=int_at_least(1), default=500)
    s.add_argument("--image-size", type=int_at_least(48), default=256)  # smaller: the backgrounds fail
    s.add_argument("--seed", type=int, default=0)
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

    p = sub.add_parser(
        "demo",
        help="teacher -> student with ICD on the shapes data, end to end (CPU, ~10 min)",
        description="Generate the shapes data, train a teacher and a student baseline, distil the "
        "student with ICD and with FPN-MSE, evaluate the four; write the table, the curves and "
        "the attention maps under --out. A finished teacher there is reused.",
    )
    add_demo_flags(p)
    _add_debug_flag(p)
    return p


def icd_version() -> str:
    """The installed distribution's version (package metadata), else ``icd.__version__``."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("icd")
    except PackageNotFoundError:
        import icd

        return icd.__version__


def build_parser(train_preset: str | None = None, eval_preset: str | None = None) -> argparse.ArgumentParser:
    """The ``icd`` parser; ``train_preset`` / ``eval_preset``: a --config file whose keys become
    defaults of ``icd train`` / ``icd eval``."""
    parser = _Parser(
        prog="icd",
        description="Instance-Conditional Knowledge "
        "Distillation for object detection: training and evaluation",
    )
    parser.add_argument("--version", action="version", version=f"icd {icd_version()}")
    sub = parser.add_subparsers(dest="command", required=True)
    _train_parser(sub, train_preset)
    _pretrain_parser(sub)
    _eval_parser(sub, eval_preset)
    _plot_parser(sub)
    _data_parser(sub)
    _demo_parser(sub)
    return parser


def _run_eval(args: argparse.Namespace) -> dict[str, float]:
    from icd.data.coco import CocoDetection, dataset_paths
    from icd.detection.models import DetectorSpec
    from icd.engine.checkpoint import load_checkpoint
    from icd.engine.distributed import cleanup, init_distributed
    from icd.engine.evaluator import eval_loader, evaluate
    from icd.engine.metrics import MetricsLog
    from icd.engine.output_dir import probe_writable
    from icd.engine.run_spec import build_loaded_detector, checkpoint_detector_spec

    info = init_distributed(args.device)
    try:
        if info.is_main:  # the detections and metrics are written at the end: fail now, not then
            probe_writable(args.output_dir)
        image_dir, ann = dataset_paths(args.data_path, args.split, args.val_ann, args.val_images, "val")
        dataset = CocoDetection(image_dir, ann, on_bad_data=args.on_bad_data)
        ckpt = load_checkpoint(args.checkpoint, "--checkpoint")
        if "teacher_side" in ckpt:  # icd pretrain's output: attention statistics only
            return _attention_stats(args, ckpt, dataset, info)
        flags = None  # a bare state dict's architecture: the model flags, frozen_bn unless --norm
        if args.detector is not None and args.backbone is not None:
            flags = DetectorSpec(
                detector=args.detector,
                backbone=args.backbone,
                num_classes=dataset.num_classes,
                fpn_channels=args.fpn_channels or 256,
                min_level=args.min_level,
                max_level=args.max_level,
                norm=args.norm or BARE_STATE_DICT_NORM,
            )
        spec = checkpoint_detector_spec(
            ckpt,
            f"--checkpoint {args.checkpoint}",
            dataset.num_classes,
            flags=flags,
            flags_hint="give --detector and --backbone (and --fpn-channels, --norm if not the defaults)",
        )
        sizes = {"min_size": args.min_size, "max_size": args.max_size, "score_thresh": args.score_thresh}
        spec = dataclasses.replace(spec, **{k: v for k, v in sizes.items() if v is not None})
        model = build_loaded_detector(spec, ckpt, what="evaluated", source=f"--checkpoint {args.checkpoint}")
        model.to(info.device)
        loader = eval_loader(dataset, info, args.batch_size, args.workers)
        metrics = evaluate(
            model,
            loader,
            dataset,
            info,
            spec.label_offset,
            amp=args.amp,
            output_dir=args.output_dir,
            split=args.split,
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
        return metrics
    finally:
        cleanup(info)


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
        splits = [(args.train_split, getattr(args, "train_ann", None), getattr(args, "train_images", None), "train")]
        if not getattr(args, "no_eval", False):
            splits.append((args.val_split, args.val_ann, args.val_images, "val"))
    elif args.command == "eval":
        splits = [(args.split, args.val_ann, args.val_images, "val")]
    else:
        return
    for split, ann, images, flag in splits:
        try:
            dataset_paths(args.data_path, split, ann, images, flag)
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


def _main(argv: list[str]) -> int:
    parser = build_parser(_train_preset_of(argv), _train_preset_of(argv, "eval"))
    args = parser.parse_args(argv)
    if args.command == "train":  # flags and another run's files first: before any data is looked at
        from icd.engine.run_spec import detector_spec_from_args

        check_teacher_flags(args, _train_flags_set(argv, args.config), args.config)
        detector_spec_from_args(args, num_classes=1)  # the model flags fit together (levels, widths)
    if args.command in ("train", "pretrain") and int(os.environ.get("RANK", "0")) == 0:
        from icd.engine.output_dir import check_output_dir

        check_output_dir(args.output_dir, args.resume, args.overwrite, args.command)
    _check_backend(args)
    _check_data_flags(parser, args)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    if args.command == "train":
        from icd.engine.trainer import train

        train(args)
    elif args.command == "pretrain":
        from icd.engine.pretrain import pretrain

        pretrain(args)
    elif args.command == "eval":
        _run_eval(args)
    elif args.command == "plot":
        from icd.engine.metrics import plot_runs

        out = args.out or os.path.join(args.runs[0], "curves.png")
        print(plot_runs(args.runs, out))
    elif args.command == "data":
        from icd.data.shapes import generate

        paths = generate(args.out, args.num_train, args.num_val, args.image_size, args.seed, args.overwrite)
        for split, path in paths.items():
            print(f"{split}: {path}")
        if args.format == "yolo":
            from icd.data.yolo import export_yolo

            image_dirs = {split: os.path.join(args.out, split) for split in paths}
            print(f"yolo: {export_yolo(paths, image_dirs, os.path.join(args.out, 'yolo'))}")
    elif args.command == "demo":
        from icd.apps.demo.command import run_command

        return run_command(args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
