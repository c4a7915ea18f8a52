"""The detector adapter seam: what icd needs of a detector family, in one interface.

A *family* is a set of detectors built the same way (torchvision's RetinaNet / FCOS / Faster and
Mask R-CNN on ResNet + FPN; RT-DETR; ...). The engine (``icd train``, ``icd eval``, ``icd
predict``, ``icd pretrain``, the checkpoints' readers) reaches a detector only through its family's
``DetectorFamily``, found by ``icd.detection.adapters.family_of(detector)``; a new family is one
module with its subclass and one ``register_family`` entry.

A family works on a *spec*: a dataclass of the family (``spec_type``) that fixes one detector's
architecture, with at least ``detector: str`` (one of the family's ``detectors``) and
``num_classes: int`` (C, dataset labels 0..C-1). Checkpoints store it as the plain dict
``spec_to_dict(spec)`` under ``detector_spec``, with the family's name under its ``"family"`` key
(a dict without one is a torchvision spec: checkpoints written before the seam).

Frames and units. Every detector resizes, normalises and pads its input images into a batch
[N, 3, Hp, Wp], its *input frame*; distillation compares teacher and student maps of that one
frame. In the frame: ``image_sizes`` int64 [N, 2] are each image's (h_i, w_i) in pixels after
resizing, before padding (the valid region of image i is x in [0, w_i), y in [0, h_i)); boxes are
float [n_i, 4] (x1, y1, x2, y2) in frame pixels; labels int64 [n_i] are the dataset's 0..C-1
whatever the detector uses inside (a background class 0, ...: the family converts). The features
distilled are L maps [N, C_l, H_l, W_l], level l covering ``strides[l]`` frame pixels per cell.

Outside the frame (what ``predict`` returns, what COCO evaluation reads): boxes in the original
image's pixels, labels 0..C-1.
"""

from __future__ import annotations

import dataclasses
from abc import ABC, abstractmethod
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar, Protocol, runtime_checkable

import torch
from torch import Tensor, nn

from icd.errors import ConfigError

FAMILY_KEY = "family"  # the key of the family's name in a checkpoint's detector_spec dict
DEFAULT_FAMILY = "torchvision"  # the family of a detector_spec dict without that key


@dataclass(frozen=True)
class FeatureLayout:
    """The feature maps a detector gives for distillation, one entry per level, finest first.

    levels: the pyramid levels l of the maps (P_l: named ``P{l}`` in metrics and logs).
    strides: frame pixels per cell of each level (2**l for torchvision's P_l), float.
    channels: C_l, the channels of each level's map (all equal for an FPN).
    """

    levels: tuple[int, ...]
    strides: tuple[float, ...]
    channels: tuple[int, ...]

    def __post_init__(self) -> None:
        if not (len(self.levels) == len(self.strides) == len(self.channels)) or not self.levels:
            raise ValueError(
                f"FeatureLayout: levels {self.levels}, strides {self.strides} and channels {self.channels} "
                "must be non-empty and of one length"
            )

    @property
    def names(self) -> list[str]:
        """``["P3", "P4", ...]``."""
        return [f"P{level}" for level in self.levels]

    @property
    def width(self) -> int | list[int]:
        """The channels as the distillers take them: one int when every level has the same."""
        return self.channels[0] if len(set(self.channels)) == 1 else list(self.channels)


@dataclass
class InputFrame:
    """A batch in a detector's input frame (see the module docstring for the units).

    images: the padded, normalised input [N, 3, Hp, Wp] the detector's feature extractor reads.
    image_sizes: int64 [N, 2], (h_i, w_i) of each image in the frame, before padding.
    boxes: N float tensors [n_i, 4] (x1, y1, x2, y2) in frame pixels; None without targets.
    labels: N int64 tensors [n_i], 0..C-1; None without targets.
    """

    images: Tensor
    image_sizes: Tensor
    boxes: list[Tensor] | None = None
    labels: list[Tensor] | None = None

    @property
    def padded_size(self) -> tuple[int, int]:
        """(Hp, Wp) of the batch."""
        return int(self.images.shape[-2]), int(self.images.shape[-1])

    def valid_regions(self) -> Tensor:
        """float [N, 4] (0, 0, w_i, h_i): each image's valid region in the frame."""
        sizes = self.image_sizes.to(self.images.device, torch.float32)
        zeros = torch.zeros_like(sizes)
        return torch.cat([zeros, sizes.flip(-1)], dim=-1)


@runtime_checkable
class Tap(Protocol):
    """What a family's ``tap`` returns: the student's maps and frame, seen during its own forward.

    ``batch`` after a training forward: an ``icd.detection.feature_tap.TappedBatch`` (features,
    images, image_sizes, boxes and labels 0..C-1 in the frame); ``clear()`` drops the last
    forward's tensors (and their graph); ``remove()`` detaches the tap from the model.
    """

    @property
    def batch(self) -> Any: ...

    def clear(self) -> None: ...

    def remove(self) -> None: ...


class DetectorFamily(ABC):
    """One detector family's adapter; subclass it, then ``register_family(YourFamily())``.

    Class attributes:
        name: the family's name (``detector_spec["family"]`` in checkpoints).
        detectors: the ``--detector`` names it builds (unique across families).
        backbones: the ``--backbone`` names it takes (the CLI offers the union of all families').
        spec_type: its spec dataclass (fields ``detector`` and ``num_classes`` at least).
        inheritable_parts: what ``--inherit-teacher`` may copy from a teacher of the same family.
        scale_settings: the keys of ``frame_settings`` that only set the scale images are resized
            to; a teacher may differ from its student in them (``check_teacher_frame``).

    Methods marked abstract must be given; the others have defaults that fit a detector without
    background class, masks or special metrics. What holds for every detector of a kind (its
    defaults, whether it needs masks, its best metric) takes the detector's name; what concerns one
    detector takes its spec (and the model built from it).
    """

    name: ClassVar[str]
    detectors: ClassVar[tuple[str, ...]]
    backbones: ClassVar[tuple[str, ...]] = ()
    spec_type: ClassVar[type]
    inheritable_parts: ClassVar[tuple[str, ...]] = ()
    scale_settings: ClassVar[tuple[str, ...]] = ()

    # -- the spec (what checkpoints store) ------------------------------------------------------
    @abstractmethod
    def spec_from_args(self, values: Mapping[str, Any], num_classes: int) -> Any:
        """The spec of ``icd train``'s flags (``vars(args)`` or a checkpoint's saved ``args``, where an
        absent or None flag takes the family's default), for ``num_classes`` classes; a ConfigError
        naming the flag when they do not fit together."""

    def spec_from_dict(self, saved: Mapping[str, Any]) -> Any:
        """The spec of a checkpoint's ``detector_spec`` dict (its ``"family"`` key ignored)."""
        return self.spec_type(**{k: v for k, v in saved.items() if k != FAMILY_KEY})

    def spec_to_dict(self, spec: Any) -> dict[str, Any]:
        """``spec`` as a plain dict (str/int/float/bool/None/list: ``weights_only``-loadable), with
        the family's name under ``"family"``."""
        to_dict = getattr(spec, "to_dict", None)
        values = to_dict() if callable(to_dict) else dataclasses.asdict(spec)
        return {**values, FAMILY_KEY: self.name}

    def with_overrides(self, spec: Any, values: Mapping[str, Any]) -> Any:
        """``spec`` with the given fields replaced (``icd eval --min-size``, ``icd predict
        --score-thresh``); None values and fields the spec lacks are left alone."""
        names = {f.name for f in dataclasses.fields(spec)}
        return dataclasses.replace(spec, **{k: v for k, v in values.items() if v is not None and k in names})

    # -- building -------------------------------------------------------------------------------
    @abstractmethod
    def build(
        self, spec: Any, backbone_weights: Mapping[str, Tensor] | None = None, source: str = "backbone weights"
    ) -> nn.Module:
        """The detector of ``spec``, in train mode on the CPU, randomly initialised except for
        ``backbone_weights`` (a state dict of its backbone read by the caller; ``source`` names it in
        errors); never downloads."""

    def load_weights(self, model: nn.Module, state: Mapping[str, Tensor], what: str, source: str) -> None:
        """Load a detector state dict (or a checkpoint with it under ``"model"``) strictly; a
        ``WeightsMismatchError`` naming ``source`` lists missing, unexpected or reshaped keys."""
        from icd.detection.models import load_detector_weights

        load_detector_weights(model, state, what=what, source=source)

    # -- the features and the input frame -------------------------------------------------------
    @abstractmethod
    def feature_layout(self, spec: Any) -> FeatureLayout:
        """The levels, strides and channels of the maps distilled (``features`` and ``tap``)."""

    @abstractmethod
    def tap(self, model: nn.Module, spec: Any) -> Tap:
        """Attach to the student ``model`` (built from ``spec``): after each training forward
        (``losses``) its ``batch`` holds the maps of ``feature_layout`` and the frame of that forward,
        labels 0..C-1."""

    @abstractmethod
    def features(self, model: nn.Module, spec: Any, images: Tensor) -> list[Tensor]:
        """The maps of ``feature_layout(spec)`` of ``model`` (the teacher) on a batch already in the
        input frame, [N, 3, Hp, Wp] (the student's ``tap().batch.images``): L tensors [N, C_l, H_l, W_l].
        Gradients as the caller's context has them (the trainer calls it under ``no_grad``)."""

    @abstractmethod
    def frame(
        self, model: nn.Module, spec: Any, images: list[Tensor], targets: list[dict] | None = None, *,
        augment: bool = False,
    ) -> InputFrame:
        """``images`` (N float [3, H_i, W_i] in [0, 1]) and their ``targets`` (``"boxes"`` [n_i, 4]
        x1y1x2y2 in image pixels, ``"labels"`` 0..C-1) in ``model``'s input frame, as its own forward
        would make them: for a teacher used alone (``icd pretrain``, attention statistics).
        ``augment``: the training-time resizing (e.g. multi-scale), else the evaluation one."""

    def set_input_size(self, model: nn.Module, min_size: Sequence[int] | None, max_size: int | None) -> None:
        """Make ``model`` resize its inputs as a student of these sizes does (``icd pretrain
        --min-size/--max-size``); None: unchanged. A family of fixed-size inputs refuses sizes."""
        if min_size is not None or max_size is not None:
            raise ConfigError(f"--min-size/--max-size: {self.name} detectors have a fixed input size")

    def frame_settings(self, model: nn.Module) -> dict[str, Any]:
        """The settings of ``model`` that decide its input frame (resizing, normalisation, padding),
        as comparable plain values; ``check_same_frame`` compares them."""
        return {}

    def check_same_frame(self, teacher: nn.Module, student: nn.Module) -> None:
        """ConfigError naming the first frame setting in which ``teacher`` and ``student`` differ: the
        teacher reads the student's frame (``features``), which must be the one it was trained on."""
        differences = check_teacher_frame(self, teacher, self, student)
        if differences:
            raise ConfigError(differences[0], "the teacher reads the student's resized, normalised, padded batch, "
                              "so both must resize and normalise alike")  # fmt: skip

    # -- training -------------------------------------------------------------------------------
    def losses(self, model: nn.Module, spec: Any, images: list[Tensor], targets: list[dict]) -> dict[str, Tensor]:
        """The detector's own training losses (0-dim tensors by name) for ``images`` (N float
        [3, H_i, W_i] in [0, 1], on the model's device) and ``targets`` (``"boxes"`` x1y1x2y2 image
        pixels, ``"labels"`` 0..C-1, ``"masks"`` uint8 [n_i, H_i, W_i] when ``needs_masks``). The
        family converts labels to the detector's own (the default passes them as they are)."""
        return dict(model(images, targets))

    def compiled_parts(self, model: nn.Module) -> list[nn.Module]:
        """The submodules ``--compile`` compiles in place (fixed-rank tensor work); default the model."""
        return [model]

    def feature_module(self, model: nn.Module) -> nn.Module:
        """The submodule whose weights decide ``features`` (its state dict fingerprints a teacher
        for ``icd pretrain``'s files); default the whole model."""
        return model

    # -- inheritance (--inherit-teacher) --------------------------------------------------------
    def part_prefixes(self, spec: Any, parts: Iterable[str]) -> tuple[str, ...]:
        """The state-dict prefixes of ``parts`` (names of ``inheritable_parts``) in the detector of
        ``spec``."""
        parts = list(parts)
        if parts:
            where = f"--inherit-teacher {','.join(parts)}"
            raise ConfigError(where, f"{self.name} detectors have no inheritable parts")
        return ()

    def inherit(
        self, student: nn.Module, student_spec: Any, teacher: nn.Module, teacher_spec: Any, parts: Iterable[str]
    ) -> list[str]:
        """Copy the teacher's ``parts`` into the student in place (nothing copied on any mismatch, a
        ConfigError naming ``--inherit-teacher``); returns the state keys copied."""
        from icd.detection.inherit import copy_prefixes

        parts = tuple(parts)
        if not parts:
            return []
        if student_spec.detector != teacher_spec.detector:
            raise ConfigError(
                f"--inherit-teacher {','.join(parts)}: the student is a {student_spec.detector} and the teacher "
                f"a {teacher_spec.detector}; only the same detector can inherit its neck and head"
            )
        return copy_prefixes(student, teacher, self.part_prefixes(student_spec, parts), parts)

    # -- defaults -------------------------------------------------------------------------------
    def default_levels(self, detector: str) -> tuple[int, int]:
        """(min_level, max_level) of ``detector``'s maps when the flags leave them unset."""
        raise ConfigError(f"--detector {detector}", f"{self.name} detectors take no --min-level/--max-level")

    def method_defaults(self, detector: str, method: str) -> dict[str, Any]:
        """Defaults of the ``--distill method``'s config fields for ``detector``, taken by the fields
        a run leaves None (``{"loss_weight": 8.0, "max_labels": 300}`` for ICD on RetinaNet); {}: the
        method's own defaults."""
        return {}

    def base_lr(self, detector: str) -> float:
        """``detector``'s learning rate for 16 images per iteration (scaled linearly to the batch), for
        its ``student_optimizer``."""
        return 0.01

    def student_optimizer(self, detector: str) -> str:
        """The optimiser ``detector`` trains with: ``"sgd"`` (momentum ``--momentum``) or ``"adamw"``
        (DETR-family recipes; ``--momentum`` unused); both take ``--weight-decay``."""
        return "sgd"

    # -- evaluation and prediction --------------------------------------------------------------
    def needs_masks(self, detector: str) -> bool:
        """``detector`` trains on instance masks (the data loader then reads segmentations; asked
        before the spec exists, whose number of classes comes from the data)."""
        return False

    def best_metric(self, detector: str, metrics: Mapping[str, float]) -> str:
        """The metric ``model_best.pth`` of a ``detector`` is chosen by, among an evaluation's ``metrics``."""
        return "AP"

    def predict(self, model: nn.Module, spec: Any, images: list[Tensor]) -> list[dict[str, Tensor]]:
        """Detections of ``model`` (in eval mode) on ``images`` (N float [3, H_i, W_i] in [0, 1]):
        per image ``"boxes"`` float [n, 4] x1y1x2y2 in that image's pixels, ``"labels"`` int64 [n]
        0..C-1, ``"scores"`` float [n] and, for mask detectors, ``"masks"`` float [n, 1, H_i, W_i]
        (probabilities). The default returns the model's outputs as they are."""
        return [dict(out) for out in model(images)]

    # -- command line ---------------------------------------------------------------------------
    def add_flags(self, group: Any, command: str) -> None:
        """The family's own flags (``--<family>-*``) in ``command``'s argparse group; none by default."""
        return None


def check_spec(family: DetectorFamily, spec: Any) -> None:
    """TypeError when ``spec`` is not a spec of ``family`` (a programming error, not user input)."""
    if not isinstance(spec, family.spec_type):
        raise TypeError(f"{type(family).__name__}: expected a {family.spec_type.__name__}, got {type(spec).__name__}")


def check_teacher_frame(
    teacher_family: DetectorFamily,
    teacher: nn.Module,
    student_family: DetectorFamily,
    student: nn.Module,
    source: str = "",
) -> list[str]:
    """How the teacher's input frame differs from the student's, which it reads (``features``).

    A ConfigError names the first setting that would feed the teacher input unlike any it was
    trained on (normalisation, padding, a frame of another family); settings of both families'
    ``scale_settings`` may differ (the teacher then sees the objects at the student's scale) and
    come back as lines ``"teacher K = X but student K = Y"``, for a warning; [] when alike.
    ``source``: where the teacher came from (``"--teacher PATH"``), leading the error.
    """
    lead = f"{source}: " if source else ""
    theirs, ours = teacher_family.frame_settings(teacher), student_family.frame_settings(student)
    if set(theirs) != set(ours):
        raise ConfigError(
            f"{lead}the teacher is a {teacher_family.name} detector, the student a {student_family.name} one",
            "their input frames are made differently (resizing, normalisation, padding) and the teacher reads the "
            "student's; distil between detectors of one family",
        )
    scale_only = set(teacher_family.scale_settings) & set(student_family.scale_settings)
    differences = []
    for key in sorted(set(theirs) | set(ours)):
        if theirs.get(key) == ours.get(key):
            continue
        line = f"teacher {key} = {theirs.get(key)!r} but student {key} = {ours.get(key)!r}"
        if key not in scale_only:
            raise ConfigError(lead + line, "the teacher reads the student's resized, normalised, padded batch; it must "
                              "normalise and pad alike, or its features are not its own")  # fmt: skip
        differences.append(line)
    return differences
