"""RT-DETR from Hugging Face transformers as an icd detector, built from configs (no downloads).

``RTDetrDetector`` wraps ``transformers.RTDetrForObjectDetection`` behind the call of
torchvision's detectors, so that the trainer, the COCO evaluator and the distillers use it
unchanged::

    model.train(); losses = model(images, targets)   # dict of the detector's losses (scalars)
    model.eval();  detections = model(images)        # per image: boxes, labels, scores

``images``: float [3, H_i, W_i] in [0, 1], any sizes; ``targets``: per image ``boxes`` float
[n_i, 4] (x1, y1, x2, y2) in pixels of that image and ``labels`` int64 [n_i], 0..C-1 (RT-DETR has
no background class: label offset 0).

The input frame: every image is resized (bilinear, aspect ratio not kept) to one fixed square
``image_size`` x ``image_size`` and neither normalised nor padded, as RT-DETR's own image
processor does; so the whole input is valid (image sizes (S, S), padded size (S, S)).

The features to distil: the hybrid encoder's output (its PAN maps, after AIFI on the coarsest
map and the top-down FPN), 3 maps [N, hidden_dim, S/s, S/s] at strides s = 8, 16, 32 (levels
P3-P5). A forward in training mode exposes them through ``model.transform`` (the resized batch,
boxes in its frame) and ``model.backbone`` (the maps), the two modules ``FeatureTap`` hooks;
``model.backbone(pixel_values)`` alone gives the teacher's maps on the student's batch.

Needs the ``rtdetr`` extra (``pip install --no-deps -r requirements-rtdetr.txt``): transformers
and scipy (RT-DETR's Hungarian matcher) are imported when a model is built, not with this module.
"""

from __future__ import annotations

import os
from collections import OrderedDict
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import Any

import torch
from torch import Tensor, nn
from torch.nn import functional as F
from torchvision.models.detection.image_list import ImageList

from icd.detection.adapters.base import DetectorFamily, FeatureLayout, InputFrame
from icd.detection.feature_tap import FeatureTap
from icd.detection.models import _keys_text
from icd.errors import ConfigError, EnvironmentSettingError, WeightsMismatchError

# ResNet variants of RT-DETR's backbone config: (block, blocks per stage, stage widths at width 1)
RESNETS = {
    "resnet18": ("basic", (2, 2, 2, 2), (64, 128, 256, 512)),
    "resnet34": ("basic", (3, 4, 6, 3), (64, 128, 256, 512)),
    "resnet50": ("bottleneck", (3, 4, 6, 3), (256, 512, 1024, 2048)),
    "resnet101": ("bottleneck", (3, 4, 23, 3), (256, 512, 1024, 2048)),
}
# the detectors of the family: transformers' config and model classes (RT-DETRv2 changes only the
# decoder's deformable attention and the training recipe; the backbone and hybrid encoder are RT-DETR's)
HF_CLASSES = {
    "rtdetr": ("RTDetrConfig", "RTDetrForObjectDetection"),
    "rtdetrv2": ("RTDetrV2Config", "RTDetrV2ForObjectDetection"),
}
LEVELS = (3, 4, 5)  # the hybrid encoder's maps: C3-C5 of the ResNet, strides 8, 16, 32
NORMS = ("bn", "frozen_bn")
INSTALL_HINT = (
    "pip install --no-deps -r requirements-rtdetr.txt in the icd checkout (transformers and scipy, "
    "pinned; it never replaces torch)"
)


def _transformers():
    """The transformers module, or one line naming the extra to install."""
    try:
        import scipy.optimize  # noqa: F401  (RT-DETR's loss imports it lazily; fail before training)
        import transformers
    except ImportError as exc:
        raise EnvironmentSettingError(f"--detector rtdetr needs the rtdetr extra ({exc.name} is missing)",
                                      INSTALL_HINT) from exc  # fmt: skip
    return transformers


def available() -> bool:
    """Whether transformers and scipy can be imported (the rtdetr extra is installed)."""
    try:
        _transformers()
    except EnvironmentSettingError:
        return False
    return True


@dataclass
class RTDetrSpec:
    """Everything that fixes an RT-DETR's architecture (stored in checkpoints as a plain dict).

    backbone: the ResNet (RT-DETR's R18/R34 use basic blocks, R50/R101 bottlenecks).
    width: scale of the ResNet's stage widths (1.0: the published ones; e.g. 0.25 for CPU tests).
    hidden_dim: channels of the hybrid encoder's maps and the decoder (RT-DETR: 256).
    image_size: side S of the square input, pixels; a multiple of 32.
    num_queries, decoder_layers (None: 3 for R18/R34, 6 for R50/R101, as in RT-DETR's configs),
    num_denoising (contrastive denoising queries while training; 0: none).
    expansion: width of the hybrid encoder's CSP blocks relative to hidden_dim (None: 0.5 for
    R18/R34, 1.0 for R50/R101, as in RT-DETR's configs; --inherit-teacher neck needs equal ones).
    norm: the ResNet's normalisation, "bn" (trains; from random init) or "frozen_bn"
    (RT-DETR's choice for ImageNet-initialised backbones).
    score_thresh, max_detections: detections kept per image at inference.
    """

    detector: str = "rtdetr"
    backbone: str = "resnet50"
    num_classes: int = 80
    width: float = 1.0
    hidden_dim: int = 256
    image_size: int = 640
    num_queries: int = 300
    decoder_layers: int | None = None
    num_denoising: int = 100
    expansion: float | None = None
    norm: str = "bn"
    score_thresh: float = 0.05
    max_detections: int = 100

    def __post_init__(self) -> None:
        if self.detector not in HF_CLASSES:
            raise ConfigError(f"--detector {self.detector}", f"the rtdetr family builds {tuple(HF_CLASSES)}")
        if self.backbone not in RESNETS:
            raise ConfigError(f"--backbone {self.backbone}", f"RT-DETR takes one of {tuple(RESNETS)}")
        if self.norm not in NORMS:
            raise ConfigError(f"--norm {self.norm}", f"RT-DETR takes one of {NORMS}")
        if self.num_classes < 1:
            raise ConfigError(f"num_classes={self.num_classes}", "expected at least 1 class")
        if not 0 < self.width <= 4:
            raise ConfigError(f"--rtdetr-width {self.width}", "expected a scale in (0, 4]")
        if self.image_size < 32 or self.image_size % 32:
            raise ConfigError(f"--min-size {self.image_size}",
                              "RT-DETR's square input side must be a multiple of 32 (its coarsest stride)")  # fmt: skip
        if self.hidden_dim < 8 or self.hidden_dim % 8:
            raise ConfigError(f"--fpn-channels {self.hidden_dim}",
                              "RT-DETR's hidden width must be a multiple of 8 (its attention heads)")  # fmt: skip
        if self.num_queries < 1:
            raise ConfigError(f"--rtdetr-queries {self.num_queries}", "expected at least 1 query")
        if self.decoder_layers is None:
            self.decoder_layers = 3 if RESNETS[self.backbone][0] == "basic" else 6
        if self.decoder_layers < 1:
            raise ConfigError(f"--rtdetr-decoder-layers {self.decoder_layers}", "expected at least 1 layer")
        if self.expansion is None:
            self.expansion = 0.5 if RESNETS[self.backbone][0] == "basic" else 1.0
        if not 0 < self.expansion <= 4:
            raise ConfigError(f"--rtdetr-expansion {self.expansion}", "expected a ratio in (0, 4]")
        if self.num_denoising < 0:
            raise ConfigError(f"--rtdetr-denoising {self.num_denoising}", "expected 0 or more queries")

    @property
    def label_offset(self) -> int:
        return 0  # no background class

    @property
    def levels(self) -> list[int]:
        return list(LEVELS)

    @property
    def strides(self) -> list[int]:
        return [2**level for level in LEVELS]

    @property
    def channels(self) -> int:
        """Channels of every distilled map (the hybrid encoder's width)."""
        return self.hidden_dim

    @property
    def fpn_channels(self) -> int:  # the name the distillers' checks read
        return self.hidden_dim

    def stage_widths(self) -> list[int]:
        return [max(8, round(w * self.width)) for w in RESNETS[self.backbone][2]]

    def to_dict(self) -> dict:
        return asdict(self)


def hf_config(spec: RTDetrSpec):
    """The ``transformers.RTDetrConfig`` of ``spec``: a ResNet backbone config of transformers'
    own (no timm, nothing pretrained), C3-C5 into the hybrid encoder."""
    tf = _transformers()
    block, depths, _ = RESNETS[spec.backbone]
    widths = spec.stage_widths()
    backbone = tf.RTDetrResNetConfig(
        embedding_size=max(8, round(64 * spec.width)),
        hidden_sizes=widths,
        depths=list(depths),
        layer_type=block,
        out_indices=[2, 3, 4],  # stage2..stage4: strides 8, 16, 32
    )
    heads = max(1, spec.hidden_dim // 32)
    config_class = getattr(tf, HF_CLASSES[spec.detector][0])
    return config_class(
        backbone_config=backbone,
        num_labels=spec.num_classes,
        encoder_in_channels=widths[1:],
        feat_strides=[2**level for level in LEVELS],
        encoder_hidden_dim=spec.hidden_dim,
        d_model=spec.hidden_dim,
        decoder_in_channels=[spec.hidden_dim] * len(LEVELS),
        encoder_ffn_dim=4 * spec.hidden_dim,
        decoder_ffn_dim=4 * spec.hidden_dim,
        encoder_attention_heads=heads,
        decoder_attention_heads=heads,
        decoder_layers=spec.decoder_layers,
        num_queries=spec.num_queries,
        num_denoising=spec.num_denoising,
        hidden_expansion=spec.expansion,
        freeze_backbone_batch_norms=spec.norm == "frozen_bn",
    )


class SquareResize(nn.Module):
    """RT-DETR's input frame: each image resized to ``size`` x ``size`` (bilinear), stacked.

    forward(images, targets) -> (ImageList [N, 3, S, S] with image sizes (S, S), targets with
    ``boxes`` rescaled to that frame (x1, y1, x2, y2 pixels) and ``orig_size`` (h, w) added);
    targets None stays None.
    """

    def __init__(self, size: int) -> None:
        super().__init__()
        self.size = size

    def forward(self, images: list[Tensor], targets: list[dict[str, Tensor]] | None = None):
        s = self.size
        batch = torch.cat([
            F.interpolate(im[None], size=(s, s), mode="bilinear", align_corners=False, antialias=False)
            for im in images
        ])
        out_targets = None
        if targets is not None:
            out_targets = []
            for im, t in zip(images, targets, strict=True):
                h, w = im.shape[-2:]
                scale = torch.tensor([s / w, s / h, s / w, s / h], dtype=t["boxes"].dtype, device=t["boxes"].device)
                out_targets.append({**t, "boxes": t["boxes"] * scale, "orig_size": (int(h), int(w))})
        return ImageList(batch, [(s, s)] * len(images)), out_targets


class EncoderMaps(nn.Module):
    """The hybrid encoder's maps of a batch: ResNet C3-C5 -> input projections -> AIFI + FPN + PAN.

    forward(pixel_values float [N, 3, S, S]) -> OrderedDict "0", "1", "2" of [N, hidden_dim,
    S/8 | S/16 | S/32, ...]. Holds no parameters of its own: it runs the parts of the wrapped
    ``RTDetrModel`` (kept out of its state dict, which the detector owns).
    """

    def __init__(self, hf_model: nn.Module) -> None:
        super().__init__()
        self._parts = (hf_model,)  # a tuple: not a submodule, so its tensors are saved once

    def forward(self, pixel_values: Tensor) -> OrderedDict[str, Tensor]:
        model = self._parts[0]
        mask = torch.ones(pixel_values.shape[0], *pixel_values.shape[-2:], device=pixel_values.device)
        features = model.backbone(pixel_values, mask)
        projected = [proj(source) for proj, (source, _) in zip(model.encoder_input_proj, features, strict=True)]
        maps = model.encoder(projected).last_hidden_state
        return OrderedDict((str(i), m) for i, m in enumerate(maps))


# the detector's losses reported by their kind (each sums the final, auxiliary, encoder and
# denoising terms of transformers' RTDetrLoss, already weighted by it)
LOSS_KINDS = ("loss_vfl", "loss_bbox", "loss_giou")


class RTDetrDetector(nn.Module):
    """``transformers.RTDetrForObjectDetection`` with torchvision's detector call (module docstring).

    Attributes: ``spec``; ``hf`` (the transformers model; its state dict is this one's under
    "hf."); ``transform`` (``SquareResize``); ``backbone`` (``EncoderMaps``).
    """

    def __init__(self, spec: RTDetrSpec) -> None:
        super().__init__()
        tf = _transformers()
        self.spec = spec
        self.hf = getattr(tf, HF_CLASSES[spec.detector][1])(hf_config(spec))
        self.transform = SquareResize(spec.image_size)
        # not a submodule (see EncoderMaps): set past nn.Module's registration
        object.__setattr__(self, "backbone", EncoderMaps(self.hf.model))

    @staticmethod
    def _hf_labels(targets: list[dict[str, Tensor]], size: int) -> list[dict[str, Tensor]]:
        """transformers' targets: ``class_labels`` and ``boxes`` (cx, cy, w, h) / S, in [0, 1]."""
        out = []
        for t in targets:
            x1, y1, x2, y2 = (t["boxes"] / size).clamp(0.0, 1.0).unbind(-1)
            boxes = torch.stack([(x1 + x2) / 2, (y1 + y2) / 2, x2 - x1, y2 - y1], dim=-1)
            out.append({"class_labels": t["labels"].long(), "boxes": boxes})
        return out

    def forward(self, images: list[Tensor], targets: list[dict[str, Tensor]] | None = None):
        if self.training and targets is None:
            raise ValueError("RTDetrDetector: targets are needed in training mode")
        image_list, resized = self.transform(images, targets if self.training else None)
        pixels = image_list.tensors
        maps = list(self.backbone(pixels).values())
        from transformers.modeling_outputs import BaseModelOutput

        # the backbone and encoder ran above (where the tap sees them): transformers takes their
        # maps as encoder_outputs and, given inputs_embeds, skips both
        out = self.hf(
            pixel_values=None,
            inputs_embeds=maps[0],
            encoder_outputs=BaseModelOutput(last_hidden_state=maps),
            labels=self._hf_labels(resized, self.spec.image_size) if self.training else None,
        )
        if self.training:
            losses = {kind: pixels.new_zeros(()) for kind in LOSS_KINDS}
            for name, value in out.loss_dict.items():
                kind = next(k for k in LOSS_KINDS if name == k or name.startswith(k + "_"))
                losses[kind] = losses[kind] + value
            return losses
        sizes = [tuple(im.shape[-2:]) for im in images]
        return self.postprocess(out.logits, out.pred_boxes, sizes)

    def postprocess(self, logits: Tensor, boxes: Tensor, sizes: list[tuple[int, int]]) -> list[dict[str, Tensor]]:
        """Detections in each original image's frame.

        logits [N, Q, C], boxes [N, Q, 4] (cx, cy, w, h) / S -> per image ``boxes`` [k, 4] (x1, y1,
        x2, y2 pixels, clamped to the image), ``labels`` int64 [k] (0..C-1), ``scores`` [k]
        (sigmoid, the focal-loss classifier): the ``max_detections`` best (query, class) pairs
        above ``score_thresh``.
        """
        spec = self.spec
        n, q, c = logits.shape
        scores = logits.float().sigmoid().flatten(1)
        k = min(spec.max_detections, q * c)
        top, index = scores.topk(k, dim=1)
        labels, query = index % c, index // c
        cx, cy, w, h = boxes.float().unbind(-1)
        xyxy = torch.stack([cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2], dim=-1)
        out = []
        for i, (ih, iw) in enumerate(sizes):
            frame = torch.tensor([iw, ih, iw, ih], dtype=xyxy.dtype, device=xyxy.device)
            b = torch.minimum((xyxy[i, query[i]] * frame).clamp(min=0), frame)
            keep = top[i] > spec.score_thresh
            out.append({"boxes": b[keep], "labels": labels[i][keep], "scores": top[i][keep]})
        return out


def build_rtdetr(
    spec: RTDetrSpec, weights: Mapping[str, Tensor] | None = None, source: str = "weights"
) -> RTDetrDetector:
    """The RT-DETR of ``spec``, random init (transformers' initialisation), or with ``weights``: a
    state dict of ``RTDetrForObjectDetection`` (its own keys, "model." ...; e.g. read from a local
    ``model.safetensors`` by ``read_local_weights``), loaded strictly (``source`` names it in errors)."""
    model = RTDetrDetector(spec)
    if weights is not None:
        load_hf_weights(model, weights, source)
    return model


def load_hf_weights(model: RTDetrDetector, state: Mapping[str, Tensor], source: str = "weights") -> None:
    """Load an ``RTDetrForObjectDetection`` state dict into ``model.hf``, strictly: a missing,
    unexpected or reshaped tensor is a ``WeightsMismatchError`` naming ``source``."""
    own = model.hf.state_dict()
    missing, unexpected = sorted(set(own) - set(state)), sorted(set(state) - set(own))
    if missing or unexpected:
        raise WeightsMismatchError(
            f"{source}: not the weights of this RT-DETR: missing keys {_keys_text(missing)}; "
            f"unexpected keys {_keys_text(unexpected)}"
        )
    reshaped = [f"{k}: file {list(v.shape)}, model {list(own[k].shape)}" for k, v in state.items()
                if tuple(v.shape) != tuple(own[k].shape)]  # fmt: skip
    if reshaped:
        raise WeightsMismatchError(
            f"{source}: {len(reshaped)} tensors have other shapes than this RT-DETR's (match --backbone, "
            "--fpn-channels and the --rtdetr-* flags to the file): " + "; ".join(reshaped[:3])
        )
    model.hf.load_state_dict(dict(state), strict=True)


def read_local_weights(path: str) -> dict[str, Tensor]:
    """An ``RTDetrForObjectDetection`` state dict from a local ``model.safetensors`` (or a folder
    holding one, as ``save_pretrained`` writes it). Never downloads; safetensors hold tensors only."""
    if os.path.isdir(path):
        path = os.path.join(path, "model.safetensors")
    if not path.endswith(".safetensors") or not os.path.isfile(path):
        raise ConfigError(path, "no such weights file (expected model.safetensors, or a folder holding one)")
    from safetensors.torch import load_file

    return load_file(path)


# --inherit-teacher's parts: the hybrid encoder (AIFI, FPN, PAN; hidden_dim wide whatever the
# ResNet, unlike the input projections, whose inputs are the ResNet's widths) and everything after it
INPUT_SIDE = "input side (square resize, no normalisation, no padding)"  # its one frame setting
PART_PREFIXES = {
    "neck": ("hf.model.encoder.",),
    "head": ("hf.model.decoder_input_proj.", "hf.model.enc_output.", "hf.model.enc_score_head.",
             "hf.model.enc_bbox_head.", "hf.model.decoder.", "hf.model.denoising_class_embed."),
}  # fmt: skip
# ICD on RT-DETR (no published setting): lambda and instance slots per image. The detector's own
# losses sum the final, 2-5 auxiliary, the encoder's and the denoising terms (tens at the start),
# so ICD's weight is that of the one-stage detectors; 100 slots, as many as RT-DETR R18's queries
# would need on COCO's busiest images, at a third of the one-stage detectors' cost
ICD_LOSS_WEIGHT = 8.0
ICD_MAX_LABELS = 100
# AdamW as in RT-DETR's recipes (lr 1e-4 for 16 images, weight decay 1e-4): on the shapes data a
# tiny RT-DETR R18 with SGD (lr 0.01, momentum 0.9) kept its box losses about 1.5x AdamW's after 300
# iterations (results/rtdetr/README.md)
BASE_LR_PER_16_IMAGES = 1e-4


class RTDetrFamily(DetectorFamily):
    """RT-DETR (transformers' ``RTDetrForObjectDetection``) on transformers' own ResNet, as a family."""

    name = "rtdetr"
    detectors = tuple(HF_CLASSES)
    backbones = tuple(RESNETS)
    spec_type = RTDetrSpec
    inheritable_parts = tuple(PART_PREFIXES)
    scale_settings = (INPUT_SIDE,)

    # -- the spec -------------------------------------------------------------------------------
    def spec_from_args(self, values: Mapping[str, Any], num_classes: int) -> RTDetrSpec:
        """``--backbone``, ``--fpn-channels`` (the hidden width), ``--min-size`` (one square side),
        ``--norm`` (unset: ``frozen_bn`` with ``--backbone-weights``, else ``bn``), ``--score-thresh``
        and the ``--rtdetr-*`` flags; levels are P3-P5 (``--min-level/--max-level`` may only say so)."""
        levels = (values.get("min_level"), values.get("max_level"))
        for flag, given, fixed in zip(("--min-level", "--max-level"), levels, (LEVELS[0], LEVELS[-1]), strict=True):
            if given is not None and int(given) != fixed:
                raise ConfigError(f"{flag} {given}", f"RT-DETR's maps are P{LEVELS[0]}-P{LEVELS[-1]} (strides 8-32)")
        sizes = values.get("min_size")
        if isinstance(sizes, (list, tuple)):
            if len(sizes) != 1:
                raise ConfigError(f"--min-size {' '.join(map(str, sizes))}",
                                  "RT-DETR takes one square input side (no multi-scale training here)")  # fmt: skip
            sizes = sizes[0]
        defaults = RTDetrSpec()

        def get(flag: str, field: str) -> Any:
            value = values.get(flag)
            return getattr(defaults, field) if value is None else value

        return RTDetrSpec(
            detector=get("detector", "detector"),
            backbone=get("backbone", "backbone"),
            num_classes=num_classes,
            width=float(get("rtdetr_width", "width")),
            hidden_dim=int(get("fpn_channels", "hidden_dim")),
            image_size=int(defaults.image_size if sizes is None else sizes),
            num_queries=int(get("rtdetr_queries", "num_queries")),
            decoder_layers=values.get("rtdetr_decoder_layers"),
            num_denoising=int(get("rtdetr_denoising", "num_denoising")),
            expansion=values.get("rtdetr_expansion"),
            norm=values.get("norm") or ("frozen_bn" if values.get("backbone_weights") else "bn"),
            score_thresh=float(get("score_thresh", "score_thresh")),
        )

    # -- building -------------------------------------------------------------------------------
    def build(
        self, spec: RTDetrSpec, backbone_weights: Mapping[str, Tensor] | None = None,
        source: str = "backbone weights",
    ) -> nn.Module:
        """``backbone_weights``: a state dict of transformers' ``RTDetrResNetBackbone`` (its keys,
        "embedder." ...), or of a whole ``RTDetrForObjectDetection`` ("model." ...: local RT-DETR
        weights, loaded whole)."""
        model = RTDetrDetector(spec)
        if backbone_weights is not None:
            if isinstance(backbone_weights.get("model"), Mapping):
                backbone_weights = backbone_weights["model"]
            if any(k.startswith("model.") for k in backbone_weights):
                load_hf_weights(model, backbone_weights, source)
            else:
                _load_strictly(model.hf.model.backbone.model, backbone_weights, source, "RT-DETR ResNet")
        return model

    # -- features and frame ---------------------------------------------------------------------
    def feature_layout(self, spec: RTDetrSpec) -> FeatureLayout:
        return FeatureLayout(LEVELS, tuple(float(s) for s in spec.strides), (spec.hidden_dim,) * len(LEVELS))

    def tap(self, model: nn.Module, spec: RTDetrSpec) -> FeatureTap:
        return FeatureTap(model, label_offset=0)

    def features(self, model: nn.Module, spec: RTDetrSpec, images: Tensor) -> list[Tensor]:
        return list(model.backbone(images).values())

    def frame(
        self, model: nn.Module, spec: RTDetrSpec, images: list[Tensor], targets: list[dict] | None = None, *,
        augment: bool = False,
    ) -> InputFrame:
        image_list, resized = model.transform(images, targets)
        n = image_list.tensors.shape[0]
        sizes = torch.tensor([list(image_list.image_sizes[0])] * n, dtype=torch.long, device=image_list.tensors.device)
        boxes = labels = None
        if resized is not None:
            boxes = [t["boxes"] for t in resized]
            labels = [t["labels"] for t in resized]
        return InputFrame(image_list.tensors, sizes, boxes, labels)

    def set_input_size(self, model: nn.Module, min_size: Sequence[int] | None, max_size: int | None) -> None:
        """The square side from ``min_size`` (one value, a multiple of 32); ``max_size`` is moot."""
        if min_size is None:
            return
        sizes = list(min_size)
        if len(sizes) != 1 or sizes[0] < 32 or sizes[0] % 32:
            raise ConfigError(f"--min-size {' '.join(map(str, sizes))}",
                              "RT-DETR takes one square input side, a multiple of 32")  # fmt: skip
        model.transform.size = int(sizes[0])

    def frame_settings(self, model: nn.Module) -> dict[str, Any]:
        return {INPUT_SIDE: int(model.transform.size)}

    # -- training -------------------------------------------------------------------------------
    def compiled_parts(self, model: nn.Module) -> list[nn.Module]:
        """The ResNet (fixed-rank work; the matcher and denoising groups depend on box counts)."""
        return [model.hf.model.backbone]

    def feature_module(self, model: nn.Module) -> nn.Module:
        return model.hf.model

    def part_prefixes(self, spec: RTDetrSpec, parts: Iterable[str]) -> tuple[str, ...]:
        prefixes: list[str] = []
        for part in parts:
            if part not in PART_PREFIXES:
                raise ConfigError(f"--inherit-teacher {part}", f"RT-DETR's parts are {tuple(PART_PREFIXES)}")
            prefixes += PART_PREFIXES[part]
        return tuple(prefixes)

    # -- defaults -------------------------------------------------------------------------------
    def default_levels(self, detector: str) -> tuple[int, int]:
        return LEVELS[0], LEVELS[-1]

    def method_defaults(self, detector: str, method: str) -> dict[str, Any]:
        if method == "icd":
            return {"loss_weight": ICD_LOSS_WEIGHT, "max_labels": ICD_MAX_LABELS}
        return {}

    def base_lr(self, detector: str) -> float:
        return BASE_LR_PER_16_IMAGES

    def student_optimizer(self, detector: str) -> str:
        return "adamw"

    # -- command line ---------------------------------------------------------------------------
    def add_flags(self, group: Any, command: str) -> None:
        from icd.flags import finite_float, int_at_least

        d = RTDetrSpec()
        group.add_argument("--rtdetr-width", type=finite_float(above=0.0), default=None,
                           help=f"RT-DETR: scale of the ResNet's stage widths (default {d.width})")
        group.add_argument("--rtdetr-queries", type=int_at_least(1), default=None,
                           help=f"RT-DETR: object queries (default {d.num_queries})")
        group.add_argument("--rtdetr-decoder-layers", type=int_at_least(1), default=None,
                           help="RT-DETR: decoder layers (default 3 for resnet18/34, 6 for resnet50/101)")
        group.add_argument("--rtdetr-expansion", type=finite_float(above=0.0), default=None,
                           help="RT-DETR: hybrid encoder's block width / hidden width (default 0.5 for "
                           "resnet18/34, 1.0 for resnet50/101; a student inheriting the neck needs its teacher's)")
        group.add_argument("--rtdetr-denoising", type=int_at_least(0), default=None,
                           help=f"RT-DETR: denoising queries while training (default {d.num_denoising})")


def _load_strictly(module: nn.Module, state: Mapping[str, Tensor], source: str, what: str) -> None:
    own = module.state_dict()
    missing, unexpected = sorted(set(own) - set(state)), sorted(set(state) - set(own))
    reshaped = [k for k, v in state.items() if k in own and tuple(v.shape) != tuple(own[k].shape)]
    if missing or unexpected or reshaped:
        raise WeightsMismatchError(
            f"{source}: not the weights of this {what}: missing keys {_keys_text(missing)}; unexpected keys "
            f"{_keys_text(unexpected)}; other shapes {_keys_text(reshaped)}"
        )
    module.load_state_dict(dict(state), strict=True)
