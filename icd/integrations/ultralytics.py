"""ICD for ultralytics YOLO detectors (v8, 11 and 26 detection heads).

    from ultralytics import YOLO
    from icd.integrations.ultralytics import ICDTrainer

    YOLO("yolo11n.yaml").train(trainer=ICDTrainer.configure(teacher="teacher.pt"), data="data.yaml")

The student is wrapped in ``ICDDetectionModel``, a subclass of ultralytics'
``DistillationModel``: the teacher is loaded from ``teacher``, frozen and kept out of the EMA
and of the final weights (``best.pt`` / ``last.pt`` hold the student alone, loadable without
icd). The ICDDistiller reads the necks' maps that feed the Detect head (strides 8, 16, 32),
with one projection per level since YOLO necks change width per level: ``YoloAdapter`` says
them (levels, strides, channels) and the input frame of a YOLO batch through icd's detector
interface (``icd.detection.adapters``). Its student-side
projections join the YOLO optimiser (extra parameter groups, same schedule, same clip); its
teacher side has its own AdamW, stepped inside the YOLO optimiser step through the same
GradScaler. The distiller and that AdamW are saved in every resumable checkpoint and restored
on ``resume=True``.

Licence: ultralytics is AGPL-3.0. This module only imports it (no code of it is copied), but
a program that uses this integration combines icd with AGPL-3.0 code; its terms then apply
to that program.
"""

from __future__ import annotations

import copy
import logging
import math
import os
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

try:
    from ultralytics.models.yolo.detect import DetectionTrainer
    from ultralytics.nn.distill_model import DistillationModel
    from ultralytics.nn.tasks import load_checkpoint
    from ultralytics.utils import DEFAULT_CFG, LOGGER
except ImportError as exc:  # pragma: no cover - depends on the installation
    raise ImportError(
        'icd.integrations.ultralytics needs ultralytics: run pip install --no-build-isolation ".[ultralytics]" '
        "in the icd checkout (or pip install --no-deps -r requirements-ultralytics.txt, see docs/ultralytics.md)"
    ) from exc

from icd.detection.adapters import DetectorFamily, FeatureLayout, InputFrame
from icd.engine.optim import TEACHER_SIDE_LR, teacher_side_optimizer, teacher_side_scheduler
from icd.errors import ConfigError
from icd.nn import ClassPrior, ICDDistiller, unpack_boxes
from icd.nn.methods.icd import IcdConfig

STUDENT_CLIP = 10.0  # ultralytics' gradient-norm clip of the detector, kept for the student side
ICD_LOSS_ITEMS = ("icd", "aux")  # the loss items ICD adds; in validation they are always 0
TEACHER_FREEZE_LINE = "Freezing layer 'teacher_model."  # ultralytics logs one per teacher tensor


@dataclass(frozen=True)
class ICDConfig:
    """What ``ICDTrainer.configure`` takes (every field but ``teacher`` has a default).

    teacher: path of the trained teacher checkpoint (same dataset, levels and strides).
    loss_weight: lambda of the distill loss (added as lambda * batch size, like the YOLO losses).
    warmup_iters: optimiser steps during which the student's maps are detached.
    heads, num_layers, neg_ratio, max_labels: of the ICDDistiller.
    decoder_channels: decoder width C; None: the teacher's narrowest level width.
    icd_lr, icd_clip: AdamW learning rate and gradient-norm clip of the teacher side.
    prior: "labels" (class prior from the train split's YOLO label folder), "uniform", or a
        ClassPrior.
    backend: icd.ops backend (None: the device's default).
    """

    teacher: str
    loss_weight: float = 1.0
    warmup_iters: int = 100
    heads: int = IcdConfig.heads  # ICD's defaults are the registry entry's (icd/nn/methods/icd.py)
    num_layers: int = IcdConfig.num_layers
    neg_ratio: float = IcdConfig.neg_ratio
    max_labels: int = 300
    decoder_channels: int | None = None
    icd_lr: float = TEACHER_SIDE_LR
    icd_clip: float = 0.01
    prior: Any = "labels"
    backend: str | None = None
    distiller_kwargs: Mapping[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not str(self.teacher).lower().endswith(".pt"):
            raise ValueError(f"ICDTrainer: teacher = {self.teacher!r}; expected a trained checkpoint (*.pt)")
        if not os.path.isfile(self.teacher):
            raise FileNotFoundError(f"ICDTrainer: teacher = {self.teacher!r} does not exist")
        if self.loss_weight < 0 or self.warmup_iters < 0 or self.icd_lr <= 0 or self.icd_clip <= 0:
            raise ValueError(
                "ICDTrainer: expected loss_weight >= 0, warmup_iters >= 0, icd_lr > 0 and icd_clip > 0; got "
                f"{self.loss_weight}, {self.warmup_iters}, {self.icd_lr}, {self.icd_clip}"
            )
        if not (isinstance(self.prior, ClassPrior) or self.prior in ("labels", "uniform")):
            raise ValueError(f"ICDTrainer: prior = {self.prior!r}; expected 'labels', 'uniform' or a ClassPrior")


def full_image_regions(batch_size: int, padded_size: tuple[int, int], device: torch.device) -> Tensor:
    """[N, 4] valid boxes covering the whole input (mosaic and affine augmentations fill it)."""
    hp, wp = padded_size
    return torch.tensor([[0.0, 0.0, float(wp), float(hp)]], device=device).expand(batch_size, 4)


@dataclass(frozen=True)
class YoloSpec:
    """What ICD needs of one YOLO detector of a ``DistillationModel`` pair (read from the model).

    num_classes: C (``model.nc``); strides: input pixels per cell of each level the Detect head
    reads (``model.stride``, e.g. 8, 16, 32); channels: each level's width (they differ per level in
    YOLO necks).
    """

    num_classes: int
    strides: tuple[float, ...]
    channels: tuple[int, ...]
    detector: str = "yolo"


class YoloAdapter(DetectorFamily):
    """ultralytics' YOLO detectors through icd's detector interface (``icd.detection.adapters``), as
    ``ICDDetectionModel`` uses them: the neck maps that feed the Detect head, read by the forward
    hooks ultralytics' ``DistillationModel`` sets on both models (its ``_teacher_feats`` /
    ``_student_feats``); the input frame of a YOLO batch (already letterboxed: the images are the
    frame, valid everywhere, as mosaic and affine augmentations fill it); labels 0..C-1 as YOLO's.

    Not a registered family: ultralytics' trainer builds and trains YOLO models, ``icd train`` does
    not (``build`` and ``spec_from_args`` refuse). One adapter per pair; it is not pickled.
    """

    name = "ultralytics"
    detectors = ("yolo",)
    spec_type = YoloSpec

    def __init__(self, pair: DistillationModel) -> None:
        self.pair = pair
        self.num_levels = len(pair.feats_idx) - 1  # the last hooked layer is the Detect head itself
        self.teacher_spec: YoloSpec | None = None  # set by ICDDetectionModel (spec_of after a forward)
        self.student_spec: YoloSpec | None = None

    def _maps(self, model: nn.Module) -> dict[int, Tensor]:
        return self.pair._teacher_feats if model is self.pair.teacher_model else self.pair._student_feats

    def hooked_maps(self, model: nn.Module) -> list[Tensor]:
        """The L maps [N, C_l, H_l, W_l] of ``model``'s last forward (then dropped from the hooks' dict)."""
        maps = self._maps(model)
        out = [maps[i] for i in range(self.num_levels)]
        maps.clear()
        return out

    def spec_of(self, model: nn.Module) -> YoloSpec:
        """The spec of ``model`` (the pair's teacher or student) after one forward of it."""
        maps = self._maps(model)
        widths = tuple(int(maps[i].shape[1]) for i in range(self.num_levels))
        nc = int(getattr(model, "nc", None) or model.yaml.get("nc"))
        return YoloSpec(nc, tuple(float(s) for s in model.stride.tolist()), widths)

    def spec_from_args(self, values: Mapping[str, Any], num_classes: int) -> YoloSpec:
        raise ConfigError("--detector yolo", "train YOLO students with ICDTrainer (docs/ultralytics.md)")

    def build(self, spec: YoloSpec, backbone_weights=None, source: str = "backbone weights") -> nn.Module:
        raise ConfigError("--detector yolo", "ultralytics builds YOLO models: use ICDTrainer (docs/ultralytics.md)")

    def feature_layout(self, spec: YoloSpec) -> FeatureLayout:
        levels = tuple(round(math.log2(s)) for s in spec.strides)
        return FeatureLayout(levels, spec.strides, spec.channels)

    def tap(self, model: nn.Module, spec: YoloSpec) -> Any:
        """Not a tap: YOLO's forward sees no targets and ultralytics already hooks the maps; read the
        student's with ``hooked_maps`` after its forward and its frame with ``frame_of_batch``."""
        raise ConfigError("--detector yolo", "read the student's maps with YoloAdapter.hooked_maps")

    def features(self, model: nn.Module, spec: YoloSpec, images: Tensor) -> list[Tensor]:
        model(images)
        return self.hooked_maps(model)

    def frame(self, model, spec, images, targets=None, *, augment=False) -> InputFrame:
        """YOLO's loaders letterbox the images: ``images`` [N, 3, H, W] (or N of [3, H, W]) are the frame."""
        batch = images if isinstance(images, Tensor) else torch.stack(list(images))
        sizes = torch.tensor([list(batch.shape[-2:])] * batch.shape[0], dtype=torch.long, device=batch.device)
        boxes = labels = None
        if targets is not None:
            boxes, labels = [t["boxes"] for t in targets], [t["labels"] for t in targets]
        return InputFrame(batch, sizes, boxes, labels)

    def frame_of_batch(self, batch: Mapping[str, Any]) -> InputFrame:
        """The frame of an ultralytics training batch (``img``, ``bboxes`` normalised cx cy w h,
        ``cls``, ``batch_idx``): boxes x1y1x2y2 in its pixels, labels 0..C-1."""
        img = batch["img"]
        n, padded = img.shape[0], (int(img.shape[-2]), int(img.shape[-1]))
        boxes, labels = unpack_boxes(batch["bboxes"], batch["cls"], batch["batch_idx"], n, padded)
        return self.frame(None, None, img, [{"boxes": b, "labels": c} for b, c in zip(boxes, labels, strict=True)])

    def losses(self, model: nn.Module, spec: YoloSpec, images: Any, targets: Any) -> dict[str, Tensor]:
        raise ConfigError("--detector yolo", "YOLO's losses are ultralytics' (model.loss(batch, preds))")


class ICDDetectionModel(DistillationModel):
    """The student, the frozen teacher and the ICDDistiller, as ultralytics' trainer expects.

    ``forward(batch)`` in training returns the student's YOLO losses with one more entry,
    lambda * N * distill + aux_conf + aux_reg; the loss items gain ``icd`` (the distill loss)
    and ``aux``. In evaluation the ICD entries are 0. The distiller is not a registered
    submodule: it stays out of the EMA, the YOLO checkpoints' weights and ``parameters()``.
    """

    def __init__(
        self, teacher_model: str | nn.Module, student_model: nn.Module, config: ICDConfig, prior: ClassPrior
    ) -> None:
        try:
            super().__init__(teacher_model=teacher_model, student_model=student_model)
        except ValueError as exc:
            raise ValueError(f"ICDTrainer: teacher = {config.teacher!r}: {exc}") from exc
        self.projector = nn.ModuleList()  # ultralytics' own distillation projector is not used
        adapter = YoloAdapter(self)  # the maps of the dummy forward of DistillationModel.__init__
        teacher_spec, student_spec = adapter.spec_of(self.teacher_model), adapter.spec_of(self.student_model)
        self._teacher_feats.clear()
        self._student_feats.clear()
        if teacher_spec.num_classes != student_spec.num_classes:
            raise ValueError(
                f"ICDTrainer: teacher = {config.teacher!r} predicts {teacher_spec.num_classes} classes; expected "
                f"the dataset's {student_spec.num_classes} (a teacher trained on the same data)"
            )
        if teacher_spec.strides != student_spec.strides:
            raise ValueError(
                f"ICDTrainer: teacher = {config.teacher!r} has strides {list(teacher_spec.strides)}; expected the "
                f"student's {list(student_spec.strides)} (ICD pairs the levels one to one)"
            )
        teacher_widths, student_widths = list(teacher_spec.channels), list(student_spec.channels)
        channels = config.decoder_channels or _round_to(min(teacher_widths), 4 * config.heads)
        distiller = ICDDistiller(
            student_spec.num_classes,
            teacher_widths,
            student_widths,
            heads=config.heads,
            loss_weight=config.loss_weight,
            warmup_iters=config.warmup_iters,
            neg_ratio=config.neg_ratio,
            max_labels=config.max_labels,
            prior=prior,
            num_layers=config.num_layers,
            backend=config.backend,
            decoder_channels=channels,
            **dict(config.distiller_kwargs),
        )
        device = next(self.student_model.parameters()).device
        object.__setattr__(self, "icd", distiller.to(device))  # deliberately not a submodule
        adapter.teacher_spec, adapter.student_spec = teacher_spec, student_spec
        object.__setattr__(self, "adapter", adapter)  # neither (it refers back to this model)
        self.icd_state: dict[str, Any] | None = None  # filled only while a checkpoint is written

    def __getstate__(self) -> dict[str, Any]:
        state = super().__getstate__()
        state.pop("icd", None)  # copies (the EMA, checkpoints) carry the student only
        state.pop("adapter", None)
        return state

    def train(self, mode: bool = True) -> ICDDetectionModel:
        super().train(mode)
        distiller = self.__dict__.get("icd")
        if distiller is not None:
            distiller.train(mode)
        return self

    def loss(self, batch: dict[str, Any], preds: Any = None) -> tuple[Tensor, dict[str, Tensor]]:
        img = batch["img"]
        distiller = self.__dict__.get("icd")
        if not self.training or distiller is None:
            if preds is None:
                preds = self.student_model(img)
            regular, items = self.student_model.loss(batch, preds)
            zero = torch.zeros(1, device=img.device)
            return torch.cat([regular, zero]), {**items, "icd": zero, "aux": zero}

        adapter = self.__dict__["adapter"]
        self._teacher_feats.clear()
        self._student_feats.clear()
        with torch.no_grad():
            teacher = adapter.features(self.teacher_model, adapter.teacher_spec, img)
        preds = self.student_model(img)
        regular, items = self.student_model.loss(batch, preds)
        student = adapter.hooked_maps(self.student_model)
        frame = adapter.frame_of_batch(batch)  # boxes in pixels, labels 0..C-1, valid everywhere
        n = img.shape[0]
        losses = distiller(teacher, student, frame.boxes, frame.labels, frame.valid_regions(), frame.padded_size)
        aux = losses["aux_conf"] + losses["aux_reg"]
        extra = (losses["distill"] * n + aux).reshape(1).to(regular.dtype)
        items = {**items, "icd": losses["distill"].detach().reshape(1), "aux": aux.detach().reshape(1)}
        return torch.cat([regular, extra]), items


class _TeacherFreezeLines(logging.Filter):
    """Drops ultralytics' "Freezing layer 'teacher_model...'" lines (one per teacher tensor, hundreds)
    and counts them, so that one line can say it instead."""

    def __init__(self) -> None:
        super().__init__()
        self.count = 0

    def filter(self, record: logging.LogRecord) -> bool:
        if str(record.msg).startswith(TEACHER_FREEZE_LINE):
            self.count += 1
            return False
        return True


def _round_to(value: int, multiple: int) -> int:
    return max(multiple, (value // multiple) * multiple)


class ICDTrainer(DetectionTrainer):
    """ultralytics' DetectionTrainer with ICD; make one with ``ICDTrainer.configure(teacher=...)``.

    It sets ultralytics' ``distill_model`` to the teacher (so compile is off, the teacher is
    frozen and stripped from the EMA, and resume rebuilds the teacher) and then replaces
    ultralytics' distillation by ICD. Single process only (no DDP).
    """

    icd_config: ICDConfig | None = None

    @classmethod
    def configure(cls, teacher: str | os.PathLike[str], **options: Any) -> type[ICDTrainer]:
        """A trainer class bound to an ICDConfig (``teacher`` plus any of its fields)."""
        config = ICDConfig(teacher=os.fspath(teacher), **options)
        return type(cls.__name__, (cls,), {"icd_config": config, "__module__": cls.__module__})

    def __init__(self, cfg: Any = DEFAULT_CFG, overrides: dict[str, Any] | None = None, _callbacks: Any = None):
        config = self.icd_config
        if config is None:
            raise TypeError("ICDTrainer: use ICDTrainer.configure(teacher='teacher.pt', ...) as the trainer")
        overrides = dict(overrides or {})
        other = overrides.get("distill_model")
        if other not in (None, config.teacher):
            raise ValueError(
                f"ICDTrainer: distill_model = {other!r} differs from teacher = {config.teacher!r}; pass the "
                "teacher to ICDTrainer.configure only"
            )
        overrides["distill_model"] = config.teacher
        self.icd_optimizer: torch.optim.Optimizer | None = None
        self.icd_scheduler: torch.optim.lr_scheduler.LRScheduler | None = None
        super().__init__(cfg, overrides, _callbacks)
        if int(os.environ.get("WORLD_SIZE", "1")) > 1 or self.world_size > 1:
            raise ValueError(f"ICDTrainer: device = {self.args.device!r}; expected one device (no DDP)")

    # --- the model -----------------------------------------------------------------------------

    @property
    def distiller(self) -> ICDDistiller:
        return self.model.icd

    def setup_model(self) -> dict[str, Any] | None:
        """The student (wrapped with the teacher in ``set_model_attributes``); on resume, the
        student of an ICDTrainer checkpoint and the checkpoint itself."""
        if isinstance(self.model, nn.Module) or not self.resume:
            return super().setup_model()
        weights, ckpt = load_checkpoint(self.model)
        if not isinstance(weights, ICDDetectionModel):
            raise ValueError(
                f"ICDTrainer: resume = {self.args.resume!r} is not a checkpoint written by ICDTrainer "
                "(expected its weights/last.pt)"
            )
        self.model = self.get_model(cfg=weights.yaml, weights=weights.student_model, verbose=False)
        return ckpt

    def set_model_attributes(self) -> None:
        super().set_model_attributes()
        if not isinstance(self.model, ICDDetectionModel):
            prior = self._class_prior()
            self.model = ICDDetectionModel(self.icd_config.teacher, self.model, self.icd_config, prior)

    def _class_prior(self) -> ClassPrior:
        prior, nc = self.icd_config.prior, int(self.data["nc"])
        if isinstance(prior, ClassPrior):
            if prior.num_classes != nc:
                raise ValueError(f"ICDTrainer: prior has {prior.num_classes} classes; expected the dataset's {nc}")
            return prior
        if prior == "uniform":
            return ClassPrior.uniform(nc)
        folders = [_label_folder(p) for p in _as_list(self.data.get("train"))]
        folders = [f for f in folders if f is not None]
        if not folders:
            LOGGER.warning("ICDTrainer: no YOLO label folder found for the train split; uniform class prior")
            return ClassPrior.uniform(nc)
        if len(folders) > 1:
            LOGGER.warning(f"ICDTrainer: class prior from the first train label folder {folders[0]}")
        return ClassPrior.from_yolo_labels(folders[0], nc)

    # --- logs ----------------------------------------------------------------------------------

    def _setup_train(self) -> None:
        """ultralytics' set-up, with its line per frozen teacher tensor said once."""
        quiet = _TeacherFreezeLines()
        LOGGER.addFilter(quiet)
        try:
            super()._setup_train()
        finally:
            LOGGER.removeFilter(quiet)
        if quiet.count:
            LOGGER.info(f"ICDTrainer: the teacher is frozen ({quiet.count} tensors of teacher_model, no gradients)")

    def label_loss_items(self, loss_items: Any = None, prefix: str = "train") -> Any:
        """ultralytics' labelled loss items, without the validation columns of ICD's losses: the
        validator runs the model in evaluation mode, where they are always 0 (no teacher pass)."""
        labelled = super().label_loss_items(loss_items, prefix)
        if prefix != "val":
            return labelled
        hidden = {f"{prefix}/{name}" for name in ICD_LOSS_ITEMS}
        if isinstance(labelled, dict):
            return {k: v for k, v in labelled.items() if k not in hidden}
        return [k for k in labelled if k not in hidden]

    # --- optimisers ----------------------------------------------------------------------------

    def build_optimizer(self, model, name="auto", lr=0.001, momentum=0.9, decay=1e-5, iterations=1e5):
        optimizer = super().build_optimizer(model, name, lr, momentum, decay, iterations)
        groups = {g.get("param_group"): g for g in optimizer.param_groups}
        student_side = list(self.distiller.student_side_parameters())
        for key, params in (
            ("weight", [p for p in student_side if p.ndim > 1]),
            ("bias", [p for p in student_side if p.ndim <= 1]),
        ):
            template = groups.get(key) or optimizer.param_groups[0]
            optimizer.add_param_group({**{k: v for k, v in template.items() if k != "params"}, "params": params})
        self.icd_optimizer = teacher_side_optimizer(self.distiller.teacher_side_parameters(), self.icd_config.icd_lr)
        self.icd_scheduler = teacher_side_scheduler(self.icd_optimizer, max(1, int(iterations)))
        return optimizer

    def optimizer_step(self) -> None:
        """One step of both optimisers: unscale, clip (student 10, teacher side icd_clip), step, EMA."""
        self.scaler.unscale_(self.optimizer)
        self.scaler.unscale_(self.icd_optimizer)
        student = [*self.model.parameters(), *self.distiller.student_side_parameters()]
        torch.nn.utils.clip_grad_norm_(student, max_norm=STUDENT_CLIP)
        torch.nn.utils.clip_grad_norm_(list(self.distiller.teacher_side_parameters()), self.icd_config.icd_clip)
        self.scaler.step(self.optimizer)
        self.scaler.step(self.icd_optimizer)
        self.scaler.update()
        self.optimizer.zero_grad()
        self.icd_optimizer.zero_grad()
        self.icd_scheduler.step()
        self.distiller.step()
        if self.ema:
            self.ema.update(self.model)

    # --- checkpoints ---------------------------------------------------------------------------

    def icd_state_dict(self) -> dict[str, Any]:
        """The distiller, its AdamW and schedule, copied (saved inside every resumable checkpoint)."""
        return {
            "distiller": {k: v.detach().clone() for k, v in self.distiller.state_dict().items()},
            "optimizer": copy.deepcopy(self.icd_optimizer.state_dict()),
            "scheduler": self.icd_scheduler.state_dict(),
            "config": {k: v for k, v in asdict(self.icd_config).items() if k != "prior"},
        }

    def save_model(self) -> bool:
        ema_model = self.ema.ema
        ema_model.icd_state = self.icd_state_dict()
        try:
            return super().save_model()
        finally:
            ema_model.icd_state = None

    def _load_checkpoint_state(self, ckpt: dict[str, Any]) -> None:
        super()._load_checkpoint_state(ckpt)
        state = getattr(ckpt.get("ema"), "icd_state", None)
        if state is None:
            raise ValueError(
                f"ICDTrainer: resume checkpoint {self.args.model!r} holds no ICD state; expected a last.pt "
                "written by ICDTrainer"
            )
        self.distiller.load_state_dict(state["distiller"])
        self.icd_optimizer.load_state_dict(state["optimizer"])
        self.icd_scheduler.load_state_dict(state["scheduler"])


def _as_list(value: Any) -> list[Any]:
    if value is None:
        return []
    return list(value) if isinstance(value, (list, tuple)) else [value]


def _label_folder(images: Any) -> str | None:
    """The YOLO label folder of an image folder (``.../images/...`` -> ``.../labels/...``)."""
    path = Path(str(images))
    if not path.is_dir():
        return None
    parts = list(path.parts)
    if "images" not in parts:
        return None
    index = len(parts) - 1 - parts[::-1].index("images")
    parts[index] = "labels"
    labels = Path(*parts)
    return str(labels) if labels.is_dir() else None

