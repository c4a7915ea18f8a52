"""torchvision detectors (RetinaNet, FCOS, Faster / Mask R-CNN) on ResNet + FPN, built without downloads.

Levels P_min..P_max: P2..P5 come from ResNet's layer1..layer4 through the FPN; P6 and above
from ``ExtraLevels`` (stride-2 3x3 convs on P5 for the one-stage detectors, as in RetinaNet;
max-pooling for the two-stage ones, as torchvision's LastLevelMaxPool). Anchor sizes follow the
level's stride: 4 * stride (x 2^0, 2^(1/3), 2^(2/3)) for RetinaNet, 8 * stride for Faster and
Mask R-CNN, the stride for FCOS, which reproduces torchvision's defaults for P3-P7 / P2-P6.
The two-stage detectors pool their RoIs (boxes 7x7; Mask R-CNN's masks 14x14) from the levels
that come from ResNet (P2-P5), never from the max-pooled extras. Mask R-CNN is Faster R-CNN
with torchvision's mask head; it needs targets with ``masks`` uint8 [n, H, W] when training
and gives ``masks`` float [n, 1, H, W] (probabilities) at inference.

Labels: the dataset's are 0..C-1; the two-stage detectors reserve 0 for the background, so
their model labels are dataset labels + ``DetectorSpec.label_offset``.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import asdict, dataclass

import torch
from torch import Tensor, nn
from torchvision.models import resnet
from torchvision.models.detection import FCOS, FasterRCNN, MaskRCNN, RetinaNet
from torchvision.models.detection.anchor_utils import AnchorGenerator
from torchvision.models.detection.backbone_utils import BackboneWithFPN
from torchvision.ops import FrozenBatchNorm2d, MultiScaleRoIAlign
from torchvision.ops.feature_pyramid_network import ExtraFPNBlock

from icd.errors import ConfigError, WeightsMismatchError

DETECTORS = ("retinanet", "fcos", "fasterrcnn", "maskrcnn")
MASK_DETECTORS = ("maskrcnn",)
TWO_STAGE_DETECTORS = ("fasterrcnn", "maskrcnn")  # RPN + RoI heads, background label 0
BACKBONES = ("resnet18", "resnet34", "resnet50", "resnet101")
NORMS = ("frozen_bn", "bn", "gn")
DEFAULT_LEVELS = {"retinanet": (3, 7), "fcos": (3, 7), "fasterrcnn": (2, 6), "maskrcnn": (2, 6)}
FCOS_HEAD_GROUPS = 32  # torchvision's FCOSHead: GroupNorm(32, C) after each conv


@dataclass
class DetectorSpec:
    """Everything that fixes a torchvision detector's architecture (stored in checkpoints as a plain
    dict: ``to_dict``, with ``family`` "torchvision"; dicts without it are read alike)."""

    detector: str = "retinanet"
    backbone: str = "resnet50"
    num_classes: int = 80
    fpn_channels: int = 256
    min_level: int | None = None
    max_level: int | None = None
    norm: str = "frozen_bn"
    trainable_layers: int = 5
    min_size: tuple[int, ...] = (800,)
    max_size: int = 1333
    score_thresh: float = 0.05  # detections kept at inference (torchvision's default)
    # the detector family (icd.detection.adapters) whose spec this is: saved in checkpoints beside
    # the fields above, so that DetectorSpec(**ckpt["detector_spec"]) reads old and new ones alike
    family: str = "torchvision"

    def __post_init__(self) -> None:
        if self.family != "torchvision":
            raise ConfigError(f"family={self.family!r}; a DetectorSpec is a spec of torchvision's detectors")
        if self.detector not in DETECTORS:
            raise ConfigError(f"detector={self.detector!r}; expected one of {DETECTORS}")
        if self.backbone not in BACKBONES:
            raise ConfigError(f"backbone={self.backbone!r}; expected one of {BACKBONES}")
        if self.norm not in NORMS:
            raise ConfigError(f"norm={self.norm!r}; expected one of {NORMS}")
        lo, hi = DEFAULT_LEVELS[self.detector]
        self.min_level = lo if self.min_level is None else int(self.min_level)
        self.max_level = hi if self.max_level is None else int(self.max_level)
        if not 2 <= self.min_level <= 5:
            raise ConfigError(f"min_level={self.min_level}; expected 2..5 (P2..P5 come from ResNet)")
        if self.max_level < self.min_level or self.max_level > 8:
            raise ConfigError(f"max_level={self.max_level}; expected {self.min_level}..8")
        if not 0 <= self.trainable_layers <= 5:
            raise ConfigError(f"trainable_layers={self.trainable_layers}; expected 0..5")
        if self.detector == "fcos" and self.fpn_channels % FCOS_HEAD_GROUPS:
            raise ConfigError(
                f"--fpn-channels {self.fpn_channels}",
                f"fcos's head normalises with GroupNorm({FCOS_HEAD_GROUPS}): expected a multiple of {FCOS_HEAD_GROUPS}",
            )
        self.min_size = tuple(
            int(s)
            for s in (
                self.min_size if isinstance(self.min_size, (list, tuple)) else (self.min_size,)
            )
        )

    @property
    def label_offset(self) -> int:
        return 1 if self.detector in TWO_STAGE_DETECTORS else 0

    @property
    def levels(self) -> list[int]:
        return list(range(self.min_level, self.max_level + 1))

    def to_dict(self) -> dict:
        d = asdict(self)
        d["min_size"] = list(self.min_size)
        return d


class ExtraLevels(ExtraFPNBlock):
    """Levels above P5 from P5: stride-2 3x3 convs (ReLU between) or 1x1 max-pooling with stride 2.

    Then keeps the first ``keep`` levels (fewer than P_min..P5 when max_level < 5).
    """

    def __init__(self, channels: int, num_extra: int, mode: str, keep: int) -> None:
        super().__init__()
        self.mode = mode
        self.num_extra = num_extra
        self.keep = keep
        if mode == "conv":
            self.convs = nn.ModuleList(
                nn.Conv2d(channels, channels, 3, stride=2, padding=1) for _ in range(num_extra)
            )
            for conv in self.convs:
                nn.init.kaiming_uniform_(conv.weight, a=1)
                nn.init.constant_(conv.bias, 0)

    def forward(self, results: list[Tensor], x: list[Tensor], names: list[str]):
        results, names = list(results), list(names)
        top = results[-1]
        for i in range(self.num_extra):
            if self.mode == "conv":
                top = self.convs[i](top if i == 0 else torch.relu(top))
            else:
                top = nn.functional.max_pool2d(top, 1, 2, 0)
            results.append(top)
            names.append(f"p{6 + i}")
        return results[: self.keep], names[: self.keep]


class PerImageGroupNorm(nn.GroupNorm):
    """nn.GroupNorm that also takes a batch of one image whose groups hold one value each.

    GroupNorm's statistics are per image, but ``F.group_norm`` refuses a batch whose
    N x (C / groups) x H x W is 1, a check made for BatchNorm: FCOS's head with 32 channels
    (one per group) on a 1x1 level (P7 of a small image) died on the lone image of a last val
    batch, while two images passed and gave each the same result as alone. This computes what
    GroupNorm computes for every image, also alone.
    """

    def forward(self, input: Tensor) -> Tensor:
        return torch.group_norm(input, self.num_groups, self.weight, self.bias, self.eps, torch.backends.cudnn.enabled)


def _norm_layer(norm: str):
    if norm == "frozen_bn":
        return FrozenBatchNorm2d
    if norm == "bn":
        return nn.BatchNorm2d
    return lambda channels: nn.GroupNorm(32, channels)


def build_backbone(
    spec: DetectorSpec, backbone_weights: Mapping[str, Tensor] | None = None, source: str = "backbone weights"
) -> BackboneWithFPN:
    """ResNet body + FPN giving P_min..P_max (keys '0', '1', ... then 'p6', ...); ``backbone_weights``:
    a torchvision ResNet state dict (read from a file by the caller; ``source`` names it in errors)."""
    body = getattr(resnet, spec.backbone)(weights=None, norm_layer=_norm_layer(spec.norm))
    if backbone_weights is not None:
        load_backbone_weights(body, backbone_weights, source)
    layers = ["layer4", "layer3", "layer2", "layer1", "conv1"][: spec.trainable_layers]
    if spec.trainable_layers == 5:
        layers.append("bn1")
    for name, param in body.named_parameters():
        if all(not name.startswith(layer) for layer in layers):
            param.requires_grad_(False)
    # The FPN needs ResNet levels from C_{min(min_level, 5)} up to C5 as inputs.
    first = min(spec.min_level, 5)
    returned = list(range(first - 1, 5))  # layer index k gives C_{k+1}
    return_layers = {f"layer{k}": str(i) for i, k in enumerate(returned)}
    stage2 = body.inplanes // 8  # 64 for ResNet-18/34, 256 for ResNet-50/101
    in_channels = [stage2 * 2 ** (k - 1) for k in returned]
    num_extra = max(0, spec.max_level - 5)
    mode = "pool" if spec.detector in TWO_STAGE_DETECTORS else "conv"
    extra = ExtraLevels(spec.fpn_channels, num_extra, mode, keep=len(spec.levels))
    return BackboneWithFPN(body, return_layers, in_channels, spec.fpn_channels, extra_blocks=extra)


def load_backbone_weights(body: nn.Module, state: Mapping[str, Tensor], source: str = "backbone weights") -> None:
    """Load a torchvision ResNet state dict strictly, ``fc.*`` aside (``state``: the dict, or a
    checkpoint with it under "model"; ``source`` names it in errors)."""
    if isinstance(state.get("model"), Mapping):
        state = state["model"]
    # fc belongs to classification; num_batches_tracked is not kept by FrozenBatchNorm2d
    skip = ("fc.", "num_batches_tracked")
    state = {k: v for k, v in state.items() if not any(s in k for s in skip)}
    own = {k for k in body.state_dict() if not any(s in k for s in skip)}
    missing, unexpected = sorted(own - set(state)), sorted(set(state) - own)
    if missing or unexpected:
        raise WeightsMismatchError(
            f"{source}: not a {type(body).__name__} of torchvision: missing keys {_keys_text(missing)}; "
            f"unexpected keys {_keys_text(unexpected)}"
        )
    body.load_state_dict(state, strict=False)


def build_detector(
    spec: DetectorSpec, backbone_weights: Mapping[str, Tensor] | None = None, source: str = "backbone weights"
) -> nn.Module:
    """The torchvision detector of ``spec`` (weights=None, weights_backbone=None: no download);
    ``backbone_weights``: an ImageNet ResNet state dict for its body (see ``build_backbone``)."""
    backbone = build_backbone(spec, backbone_weights, source)
    strides = [2**level for level in spec.levels]
    common = {"min_size": spec.min_size, "max_size": spec.max_size}
    thresh = spec.score_thresh
    if spec.detector == "retinanet":
        sizes = tuple(
            (4 * s, int(4 * s * 2 ** (1 / 3)), int(4 * s * 2 ** (2 / 3))) for s in strides
        )
        anchors = AnchorGenerator(sizes, ((0.5, 1.0, 2.0),) * len(strides))
        return RetinaNet(
            backbone, spec.num_classes, anchor_generator=anchors, score_thresh=thresh, **common
        )
    if spec.detector == "fcos":
        anchors = AnchorGenerator(tuple((s,) for s in strides), ((1.0,),) * len(strides))
        model = FCOS(backbone, spec.num_classes, anchor_generator=anchors, score_thresh=thresh, **common)
        for module in model.head.modules():
            if type(module) is nn.GroupNorm:
                module.__class__ = PerImageGroupNorm  # same parameters and state dict
        return model
    anchors = AnchorGenerator(tuple((8 * s,) for s in strides), ((0.5, 1.0, 2.0),) * len(strides))
    # RoIs pool from the FPN levels that come from ResNet (not the max-pooled extras).
    names = [str(i) for i in range(min(spec.max_level, 5) - spec.min_level + 1)]
    two_stage = {
        "rpn_anchor_generator": anchors,
        "box_roi_pool": MultiScaleRoIAlign(featmap_names=names, output_size=7, sampling_ratio=2),
        "box_score_thresh": thresh,
        **common,
    }
    if spec.detector == "maskrcnn":
        mask_pool = MultiScaleRoIAlign(featmap_names=names, output_size=14, sampling_ratio=2)
        return MaskRCNN(backbone, spec.num_classes + 1, mask_roi_pool=mask_pool, **two_stage)
    return FasterRCNN(backbone, spec.num_classes + 1, **two_stage)


def load_detector_weights(
    model: nn.Module, state: Mapping[str, Tensor], what: str = "teacher", source: str = "the given state dict"
) -> None:
    """Load a detector state dict strictly; a missing or unexpected key is an error listing them.

    ``state``: a loaded ``icd train`` checkpoint (its "model" entry is used) or a bare state dict;
    ``source`` names it in errors (``"--teacher runs/t/checkpoint.pth"``).
    """
    if isinstance(state.get("model"), Mapping):
        state = state["model"]
    own = model.state_dict()
    missing, unexpected = sorted(set(own) - set(state)), sorted(set(state) - set(own))
    if missing or unexpected:
        raise WeightsMismatchError(
            f"{source}: its weights do not match the {what} detector: "
            f"missing keys {_keys_text(missing)}; unexpected keys {_keys_text(unexpected)}"
        )
    reshaped = [
        f"{k}: checkpoint {list(v.shape)}, model {list(own[k].shape)}"
        for k, v in state.items()
        if hasattr(v, "shape") and tuple(v.shape) != tuple(own[k].shape)
    ]
    if reshaped:
        raise WeightsMismatchError(
            f"{source}: its weights do not match the {what} detector's shapes ({len(reshaped)} "
            f"tensors; match the flags to the checkpoint): " + "; ".join(reshaped[:3])
        )
    model.load_state_dict(state, strict=True)


def _keys_text(keys: list[str], shown: int = 4) -> str:
    """The first ``shown`` keys as a list, then how many there are."""
    if len(keys) <= shown:
        return str(keys)
    return f"{keys[:shown]} and {len(keys) - shown} more"
