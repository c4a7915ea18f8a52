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
from collections.abc import Mapping
from dataclasses import asdict, dataclass

import torch
from torch import Tensor, nn
from torch.nn import functional as F
from torchvision.models.detection.image_list import ImageList

from icd.detection.models import _keys_text
from icd.errors import ConfigError, EnvironmentSettingError, WeightsMismatchError

# ResNet variants of RT-DETR's backbone config: (block, blocks per stage, stage widths at width 1)
RESNETS = {
    "resnet18": ("basic", (2, 2, 2, 2), (64, 128, 256, 512)),
    "resnet34": ("basic", (3, 4, 6, 3), (64, 128, 256, 512)),
    "resnet50": ("bottleneck", (3, 4, 6, 3), (256, 512, 1024, 2048)),
    "resnet101": ("bottleneck", (3, 4, 23, 3), (256, 512, 1024, 2048)),
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
    norm: str = "bn"
    score_thresh: float = 0.05
    max_detections: int = 100

    def __post_init__(self) -> None:
        if self.detector != "rtdetr":
            raise ConfigError(f"detector={self.detector!r}", "an RTDetrSpec is for detector 'rtdetr'")
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
    return tf.RTDetrConfig(
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
        hidden_expansion=0.5 if block == "basic" else 1.0,  # RT-DETR R18's encoder is half as wide
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
        self.hf = tf.RTDetrForObjectDetection(hf_config(spec))
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
