"""--inherit-teacher: the student's FPN and head start as the teacher's, or nothing is copied."""

from __future__ import annotations

import pytest
import torch

from icd.detection.inherit import inherit_from_teacher, parse_parts, part_prefixes
from icd.detection.models import DetectorSpec, build_detector


def _pair(detector: str, student_fpn: int = 32, teacher_fpn: int = 32):
    common = {"num_classes": 5, "norm": "gn", "min_size": (64,), "max_size": 64}
    torch.manual_seed(0)
    student = build_detector(DetectorSpec(detector, "resnet18", fpn_channels=student_fpn, **common))
    torch.manual_seed(1)
    teacher = build_detector(DetectorSpec(detector, "resnet34", fpn_channels=teacher_fpn, **common))
    return student, teacher


@pytest.mark.parametrize("detector", ["retinanet", "fcos", "fasterrcnn"])
@pytest.mark.parametrize("parts", ["neck,head", "neck", "head"])
def test_inherited_parts_equal_the_teachers_and_nothing_else_moves(detector, parts):
    student, teacher = _pair(detector)
    before = {k: v.clone() for k, v in student.state_dict().items()}
    copied = inherit_from_teacher(student, teacher, parts.split(","), detector, detector)
    prefixes = part_prefixes(detector, parse_parts(parts))
    own, theirs = student.state_dict(), teacher.state_dict()
    assert copied == sorted(k for k in own if k.startswith(prefixes))
    assert any(".weight" in k for k in copied)
    for key, value in own.items():
        if key.startswith(prefixes):
            torch.testing.assert_close(value, theirs[key], rtol=0, atol=0)
            if value.is_floating_point() and value.numel() > 1 and value.std() > 0:
                assert not torch.equal(value, before[key]), key  # it really was different
        else:
            torch.testing.assert_close(value, before[key], rtol=0, atol=0)
    # the ResNet bodies differ in depth, so they are never part of the copy
    assert not any(k.startswith("backbone.body.") for k in copied)


def test_head_prefixes_per_detector():
    assert part_prefixes("retinanet", ["head"]) == ("head.",)
    assert part_prefixes("maskrcnn", ["neck", "head"]) == ("backbone.fpn.", "rpn.", "roi_heads.")


def test_shape_mismatch_lists_the_parameters_and_copies_nothing():
    student, teacher = _pair("retinanet", student_fpn=32, teacher_fpn=64)
    before = {k: v.clone() for k, v in student.state_dict().items()}
    with pytest.raises(ValueError, match=r"backbone\.fpn\.inner_blocks\.0\.0\.weight: student \[32, 128, 1, 1\] "
                       r"teacher \[64, 128, 1, 1\]") as info:
        inherit_from_teacher(student, teacher, ["neck", "head"], "retinanet", "retinanet")
    assert "head.classification_head.conv" in str(info.value)
    for key, value in student.state_dict().items():
        torch.testing.assert_close(value, before[key], rtol=0, atol=0)


def test_other_detector_and_unknown_part_are_errors():
    student, _ = _pair("retinanet")
    _, teacher = _pair("fcos")
    with pytest.raises(ValueError, match="student is a retinanet and the teacher a fcos"):
        inherit_from_teacher(student, teacher, ["head"], "retinanet", "fcos")
    with pytest.raises(ValueError, match=r"parts \['backbone'\]"):
        parse_parts("neck,backbone")
    assert parse_parts("") == () and parse_parts(" neck , head,neck") == ("neck", "head")
    assert inherit_from_teacher(student, teacher, [], "retinanet", "fcos") == []
