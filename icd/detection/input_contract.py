"""One input frame for teacher and student: what distilling one torchvision detector from another assumes.

ICD (and the FPN-MSE peer) run the teacher's backbone on the student's batch as the student's
``GeneralizedRCNNTransform`` made it (resized, normalised, padded [N, 3, Hp, Wp]), so that boxes,
image sizes and FPN cells of the two detectors line up. That batch is what the teacher itself would
see only when both transforms resize and normalise alike; ``check_same_input_transform`` says so
before training starts, instead of distilling from a teacher that looks at inputs it was not
trained on.
"""

from __future__ import annotations

from typing import Any

from torch import nn

# GeneralizedRCNNTransform attributes that decide the input frame
TRANSFORM_FIELDS = ("image_mean", "image_std", "min_size", "max_size", "size_divisible", "fixed_size")


def _transform_fields(model: nn.Module, role: str) -> dict[str, Any]:
    transform = getattr(model, "transform", None)
    if transform is None:
        raise TypeError(f"{role} ({type(model).__name__}) has no .transform; expected a torchvision detector")
    return {name: _plain(getattr(transform, name, None)) for name in TRANSFORM_FIELDS}


def _plain(value: Any) -> Any:
    if isinstance(value, (list, tuple)):
        return tuple(float(v) if isinstance(v, float) else v for v in value)
    return value


def check_same_input_transform(teacher: nn.Module, student: nn.Module) -> None:
    """Raise ValueError naming the first transform setting in which ``teacher`` and ``student`` differ.

    Compared: ``image_mean``, ``image_std`` (normalisation), ``min_size``, ``max_size``,
    ``size_divisible`` and ``fixed_size`` (resizing and padding) of ``model.transform``.
    """
    theirs, ours = _transform_fields(teacher, "teacher"), _transform_fields(student, "student")
    for name in TRANSFORM_FIELDS:
        if theirs[name] != ours[name]:
            raise ValueError(
                f"teacher.transform.{name} = {theirs[name]!r} but student.transform.{name} = {ours[name]!r}: "
                "the teacher's backbone is fed the student's resized, normalised, padded batch, so both "
                "detectors must resize and normalise alike (build them with the same min_size, max_size, "
                "image_mean and image_std)"
            )
