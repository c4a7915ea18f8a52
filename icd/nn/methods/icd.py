"""ICD (``--distill icd``): instance-conditional distillation, ``icd.nn.ICDDistiller``.

The module of one registry entry (``icd/nn/methods/registry.py``): its settings (``IcdConfig``,
defaults stated once), its builder (with the class prior of the training annotations) and its
``--icd-*`` flags of the distiller.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from icd.errors import ConfigError
from icd.nn.methods.registry import DistillMethod, DistillTarget, config_from_flags

# The defaults of a detector whose family states none (DetectorFamily.method_defaults, which the
# engine's build_distiller applies first): docs/method.md 4.4's lambda = 8 of the one-stage
# detectors (torchvision's family says 3 for Faster / Mask R-CNN) and 300 instance slots per image
# (100 for those two).
DEFAULT_LOSS_WEIGHT = 8.0
ONE_STAGE_MAX_LABELS = 300
TWO_STAGE_MAX_LABELS = 100  # what torchvision's family gives fasterrcnn and maskrcnn (--icd-max-labels' help)
# ICD's mask temperature with a pre-trained teacher side (--icd-init): its heads put a third of
# their weight on one location, and its students fell below the baseline (3.15 against 4.53 AP,
# 3 seeds); softened at T = 4 the weights cover ~180 of ~190 locations and the students are level
# with the paper's recipe (results/README.md). Without --icd-init: 1, the paper's.
PRETRAINED_MASK_TEMPERATURE = 4.0


@dataclass(frozen=True)
class IcdConfig:
    """ICD's settings (``ICDDistiller``'s arguments of the same names), each from its flag:

    heads (``--icd-heads``), num_layers (``--icd-layers``), max_labels (``--icd-max-labels``;
    None: the detector family's default, 100 for fasterrcnn and maskrcnn, else 300), neg_ratio (``--icd-neg-ratio``),
    clamp_fakes (``--icd-clamp-fakes``), mask_temperature (``--icd-mask-temperature``; None: 1,
    or PRETRAINED_MASK_TEMPERATURE with ``--icd-init``), position_scale
    (``--icd-position-scale``), loss_weight (``--distill-weight``; None: the detector family's
    default, 8, 3 for fasterrcnn and maskrcnn).
    """

    heads: int = 8
    num_layers: int = 1
    max_labels: int | None = None
    neg_ratio: float = 5.0
    clamp_fakes: bool = False
    mask_temperature: float | None = None
    position_scale: float = 1.0
    loss_weight: float | None = None


_FLAGS = {
    "icd_heads": "heads",
    "icd_layers": "num_layers",
    "icd_max_labels": "max_labels",
    "icd_neg_ratio": "neg_ratio",
    "icd_clamp_fakes": "clamp_fakes",
    "icd_mask_temperature": "mask_temperature",
    "icd_position_scale": "position_scale",
}


def config_from_args(args: Mapping[str, Any]) -> IcdConfig:
    """IcdConfig from a run's flags; an unset mask temperature follows ``--icd-init``."""
    config = config_from_flags(IcdConfig, args, _FLAGS)
    if config.mask_temperature is None:
        temperature = PRETRAINED_MASK_TEMPERATURE if args.get("icd_init") else 1.0
        config = IcdConfig(**{**config.__dict__, "mask_temperature": temperature})
    return config


def check_icd_heads(heads: int, teacher_channels: int, teacher: str) -> None:
    """ConfigError naming --icd-heads when the teacher's FPN width does not split into ``heads``
    attention heads of a width the position embedding takes (a multiple of 4 channels in all)."""
    if teacher_channels % heads == 0 and teacher_channels % 4 == 0:
        return
    divisors = [h for h in range(1, teacher_channels + 1) if teacher_channels % h == 0]
    raise ConfigError(
        f"--icd-heads {heads}",
        f"ICD's attention works at the teacher's width, {teacher_channels} FPN channels (--teacher {teacher}), "
        f"which must split into the heads (and be a multiple of 4); heads that fit: {divisors}",
    )


def build(config: IcdConfig, target: DistillTarget):
    """An ICDDistiller for ``target`` with the class prior of its annotations (uniform without)."""
    from icd.nn import ClassPrior, ICDDistiller

    prior = (
        ClassPrior.from_coco(target.annotation_file, num_classes=target.num_classes)
        if target.annotation_file
        else ClassPrior.uniform(target.num_classes)
    )
    max_labels = ONE_STAGE_MAX_LABELS if config.max_labels is None else config.max_labels
    return ICDDistiller(
        target.num_classes,
        teacher_channels=target.teacher_channels,
        student_channels=target.student_channels,
        heads=config.heads,
        loss_weight=DEFAULT_LOSS_WEIGHT if config.loss_weight is None else config.loss_weight,
        warmup_iters=target.warmup_iters,
        neg_ratio=config.neg_ratio,
        max_labels=max_labels,
        prior=prior,
        num_layers=config.num_layers,
        clamp_fakes=config.clamp_fakes,
        backend=target.backend,
        static_shapes=target.static_shapes,
        mask_temperature=1.0 if config.mask_temperature is None else config.mask_temperature,
        strides=target.strides,
        position_scale=config.position_scale,
    )


def add_flags(group, command: str) -> None:
    """ICD's distiller flags: of ``icd train`` and ``icd pretrain`` (``--icd-mask-temperature``:
    ``icd train`` only)."""
    from icd.flags import finite_float, int_at_least

    g, d = group, IcdConfig
    g.add_argument("--icd-heads", type=int_at_least(1), default=d.heads, help="attention heads of ICD's decoder")
    g.add_argument("--icd-layers", type=int_at_least(1), default=d.num_layers, help="layers of ICD's decoder")
    g.add_argument(
        "--icd-max-labels",
        type=int_at_least(1),
        default=d.max_labels,
        help=f"real + fake instances per image (default {ONE_STAGE_MAX_LABELS}, {TWO_STAGE_MAX_LABELS} for "
        "fasterrcnn and maskrcnn)",
    )
    g.add_argument(
        "--icd-neg-ratio", type=finite_float(minimum=0.0), default=d.neg_ratio, help="fake instances per real one"
    )
    g.add_argument(
        "--icd-clamp-fakes",
        action="store_true",
        help="clip fake instance boxes to their image (the published code does; default: not)",
    )
    g.add_argument(
        "--icd-position-scale",
        type=finite_float(above=0.0),
        default=d.position_scale,
        help="periods per image of the finest frequency of ICD's position embeddings (the queries' centre "
        "and the keys' positions): 1 is the paper's; dense scenes of small objects need finer ones "
        "(docs/training.md, Dense scenes)",
    )
    if command == "train":
        g.add_argument(
            "--icd-mask-temperature",
            type=finite_float(above=0.0),
            default=d.mask_temperature,
            help="temperature of the softmax that weights ICD's distillation loss over locations "
            "(default 1, the attention's own as in the paper; 4 with --icd-init, whose pre-trained "
            "heads put a third of their weight on one location)",
        )


METHOD = DistillMethod(
    name="icd",
    summary="icd",
    weight_default="icd: 8, 3 for fasterrcnn and maskrcnn",
    config=IcdConfig,
    config_from_args=config_from_args,
    build=build,
    add_flags=add_flags,
)
