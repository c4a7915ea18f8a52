"""Initialise a student's FPN (neck) and detection head from its teacher ("inheriting").

The published ICD configurations start the student's FPN and head from the teacher's weights
(worth about +0.8 AP for RetinaNet R50 <- R101 there); the backbones differ, so only the parts
above it can be shared. Parts and the state-dict prefixes they cover, per detector:

    neck  backbone.fpn.                     (lateral, output and extra-level convs)
    head  head.                             (RetinaNet, FCOS)
          rpn., roi_heads.                  (Faster R-CNN, Mask R-CNN)

Every parameter and buffer under those prefixes must exist in the teacher with the same
shape; otherwise nothing is copied and the error lists the offending entries.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import torch
from torch import nn

from icd.errors import ConfigError

INHERITABLE_PARTS = ("neck", "head")
_HEAD_PREFIXES = {
    "retinanet": ("head.",),
    "fcos": ("head.",),
    "fasterrcnn": ("rpn.", "roi_heads."),
    "maskrcnn": ("rpn.", "roi_heads."),
}


def parse_parts(text: str | Iterable[str] | None, known: Sequence[str] = INHERITABLE_PARTS) -> tuple[str, ...]:
    """``"neck,head"`` (or a list of names) as a tuple of part names of ``known`` (a detector
    family's ``inheritable_parts``; torchvision's by default); ``""``/None: ()."""
    if text is None:
        return ()
    names = text.split(",") if isinstance(text, str) else list(text)
    parts = tuple(dict.fromkeys(n.strip() for n in names if n.strip()))
    unknown = [p for p in parts if p not in known]
    if unknown:
        raise ConfigError(f"inherit-teacher parts {unknown}: expected a comma list of {tuple(known)}")
    return parts


def part_prefixes(detector: str, parts: Iterable[str]) -> tuple[str, ...]:
    """State-dict prefixes of ``parts`` in a ``detector`` built by icd.detection.models."""
    prefixes: list[str] = []
    for part in parse_parts(list(parts)):
        prefixes += ["backbone.fpn."] if part == "neck" else list(_HEAD_PREFIXES[detector])
    return tuple(prefixes)


def inherit_from_teacher(
    student: nn.Module,
    teacher: nn.Module,
    parts: Iterable[str],
    student_detector: str,
    teacher_detector: str,
) -> list[str]:
    """Copy the teacher's ``parts`` into the student in place; returns the copied state keys.

    Raises ValueError (nothing copied) when the detectors differ, or when an entry under the
    parts' prefixes is missing in the teacher or has another shape there.
    """
    parts = parse_parts(list(parts))
    if not parts:
        return []
    if student_detector != teacher_detector:
        raise ConfigError(
            f"--inherit-teacher {','.join(parts)}: the student is a {student_detector} and the teacher "
            f"a {teacher_detector}; only the same detector can inherit its neck and head"
        )
    return copy_prefixes(student, teacher, part_prefixes(student_detector, parts), parts)


def copy_prefixes(student: nn.Module, teacher: nn.Module, prefixes: tuple[str, ...], parts: Iterable[str]) -> list[str]:
    """Copy every state entry of the student under ``prefixes`` from the teacher, in place; returns
    the copied keys. ConfigError naming ``--inherit-teacher`` (``parts``: the names it was given),
    nothing copied, when an entry is missing in the teacher or has another shape there, or the
    student has none under the prefixes."""
    parts = tuple(parts)
    own = {k: v for k, v in student.state_dict().items() if k.startswith(prefixes)}
    theirs = teacher.state_dict()
    missing = sorted(k for k in own if k not in theirs)
    mismatched = [
        f"{k}: student {list(v.shape)} teacher {list(theirs[k].shape)}"
        for k, v in sorted(own.items())
        if k in theirs and theirs[k].shape != v.shape
    ]
    if not own or missing or mismatched:
        details = []
        if not own:
            details.append(f"the student has no entries under {list(prefixes)}")
        if missing:
            details.append(f"missing in the teacher: {missing}")
        if mismatched:
            details.append("shape mismatches: " + "; ".join(mismatched))
        raise ConfigError(
            f"--inherit-teacher {','.join(parts)}: cannot initialise the student from the teacher "
            f"({' | '.join(details)}). Match --fpn-channels, --min-level/--max-level and the "
            "detector to the teacher's, or inherit fewer parts."
        )
    with torch.no_grad():
        for key, value in own.items():
            value.copy_(theirs[key].to(device=value.device, dtype=value.dtype))
    return sorted(own)
