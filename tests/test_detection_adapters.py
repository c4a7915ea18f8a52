"""The detector adapter seam (icd/detection/adapters): the registry and torchvision's family."""

from __future__ import annotations

import pytest
import torch

from icd.detection.adapters import (
    DETECTOR_FAMILIES,
    FeatureLayout,
    InputFrame,
    Tap,
    check_teacher_frame,
    detector_names,
    family_of,
    family_of_spec,
    get_family,
    register_family,
    unregister_family,
)
from icd.detection.adapters.torchvision import TorchvisionFamily
from icd.errors import ConfigError

TINY = {"backbone": "resnet18", "fpn_channels": 32, "min_size": [64], "max_size": 64}


def _images_and_targets():
    images = [torch.rand(3, 64, 56), torch.rand(3, 48, 64)]
    targets = [
        {"boxes": torch.tensor([[2.0, 3.0, 30.0, 40.0]]), "labels": torch.tensor([2])},
        {"boxes": torch.tensor([[5.0, 5.0, 20.0, 25.0], [30.0, 10.0, 60.0, 40.0]]), "labels": torch.tensor([0, 1])},
    ]
    return images, targets


def test_registry_finds_families_and_names_the_flag_when_it_cannot():
    assert set(TorchvisionFamily.detectors) <= set(detector_names())
    assert isinstance(family_of("retinanet"), TorchvisionFamily)
    assert get_family("torchvision") is family_of("maskrcnn")
    with pytest.raises(ConfigError, match=r"^--teacher-detector yolo: no such detector"):
        family_of("yolo", "--teacher-detector")
    with pytest.raises(ConfigError, match="no such detector family"):
        get_family("mmdet")
    # a checkpoint's spec dict without "family" was written by torchvision's detectors
    assert family_of_spec({"detector": "fcos"}).name == "torchvision"
    with pytest.raises(ValueError, match="registered already"):
        register_family(TorchvisionFamily())
    with pytest.raises(ValueError, match="built in"):
        unregister_family("torchvision")


def test_a_family_whose_detector_is_taken_is_refused():
    class Clash(TorchvisionFamily):
        name = "clash"
        detectors = ("fcos",)

    with pytest.raises(ValueError, match=r"\['fcos'\] belong to 'torchvision'"):
        register_family(Clash())
    assert "clash" not in DETECTOR_FAMILIES


@pytest.mark.parametrize("detector", ["fcos", "fasterrcnn"])
def test_torchvision_family_gives_layout_frame_and_labels_from_zero(detector):
    family = family_of(detector)
    spec = family.spec_from_args({"detector": detector, **TINY}, num_classes=3)
    saved = family.spec_to_dict(spec)
    assert saved["family"] == "torchvision" and family_of_spec(saved).spec_from_dict(saved) == spec
    layout = family.feature_layout(spec)
    assert isinstance(layout, FeatureLayout)
    assert layout.strides == tuple(2.0**level for level in layout.levels) and layout.width == 32
    model = family.build(spec)
    tap = family.tap(model, spec)
    images, targets = _images_and_targets()
    losses = family.losses(model, spec, images, targets)
    assert isinstance(tap, Tap)  # (after a forward: the check reads .batch)
    assert losses and all(v.ndim == 0 for v in losses.values())
    batch = tap.batch
    # the dataset's labels 0..C-1 whatever the detector's background class
    assert [lab.tolist() for lab in batch.labels] == [[2], [0, 1]]
    assert batch.padded_size == (64, 64) and batch.image_sizes.tolist() == [[64, 56], [48, 64]]
    maps = family.features(model, spec, batch.images)
    assert [m.shape for m in maps] == [f.shape for f in batch.features]
    assert [m.shape[-1] for m in maps] == [-(-64 // int(s)) for s in layout.strides]
    tap.remove()
    frame = family.frame(model, spec, images, targets)
    assert isinstance(frame, InputFrame) and frame.images.shape == batch.images.shape
    assert frame.valid_regions().tolist() == [[0.0, 0.0, 56.0, 64.0], [0.0, 0.0, 64.0, 48.0]]
    assert [lab.tolist() for lab in frame.labels] == [[2], [0, 1]]
    model.eval()
    with torch.no_grad():
        out = family.predict(model, spec, images)
    assert len(out) == 2 and all(((o["labels"] >= 0) & (o["labels"] < 3)).all() for o in out)


def test_torchvision_defaults_per_detector():
    family = get_family("torchvision")
    assert family.method_defaults("retinanet", "icd") == {"loss_weight": 8.0, "max_labels": 300}
    assert family.method_defaults("maskrcnn", "icd") == {"loss_weight": 3.0, "max_labels": 100}
    assert family.method_defaults("fcos", "fpn-mse") == {}
    assert family.default_levels("fcos") == (3, 7) and family.default_levels("fasterrcnn") == (2, 6)
    assert family.needs_masks("maskrcnn") and not family.needs_masks("fasterrcnn")
    assert family.best_metric("maskrcnn", {"AP": 1.0, "segm_AP": 2.0}) == "segm_AP"
    assert family.best_metric("maskrcnn", {"AP": 1.0}) == "AP"
    assert family.best_metric("fcos", {"AP": 1.0, "segm_AP": 2.0}) == "AP"
    assert family.base_lr("retinanet") == 0.01 and family.base_lr("maskrcnn") == 0.02


def test_teacher_and_student_frames_compared():
    family = get_family("torchvision")
    spec = family.spec_from_args({"detector": "fcos", **TINY}, 3)
    other = family.spec_from_args({"detector": "fcos", **TINY, "min_size": [96], "max_size": 96}, 3)
    family.check_same_frame(family.build(spec), family.build(spec))
    with pytest.raises(ConfigError, match=r"^teacher transform\.max_size = 64 but student transform\.max_size = 96: "):
        family.check_same_frame(family.build(spec), family.build(other))


def test_a_teacher_may_read_a_student_frame_of_another_scale_but_not_of_another_normalisation():
    family = get_family("torchvision")
    student = family.build(family.spec_from_args({"detector": "fcos", **TINY}, 3))
    teacher = family.build(family.spec_from_args({"detector": "fcos", **TINY, "min_size": [96], "max_size": 96}, 3))
    assert check_teacher_frame(family, student, family, student) == []
    lines = check_teacher_frame(family, teacher, family, student, "--teacher t.pth")
    assert lines == [
        "teacher transform.max_size = 96 but student transform.max_size = 64",
        "teacher transform.min_size = (96,) but student transform.min_size = (64,)",
    ]
    teacher.transform.image_std = [0.5, 0.5, 0.5]  # fed the student's batch, its features are not its own
    with pytest.raises(ConfigError, match=r"^--teacher t\.pth: teacher transform\.image_std = \(0\.5, 0\.5, 0\.5\) "):
        check_teacher_frame(family, teacher, family, student, "--teacher t.pth")


def test_a_teacher_of_another_family_reads_no_frame_of_this_one():
    class SquareFamily(TorchvisionFamily):  # a stand-in for a family with a frame of its own
        name = "square"
        scale_settings = ("side",)

        def frame_settings(self, model):
            return {"side": 64}

    family = get_family("torchvision")
    student = family.build(family.spec_from_args({"detector": "fcos", **TINY}, 3))
    with pytest.raises(ConfigError, match=r"^--teacher t\.pth: the teacher is a square detector, the student a torch"):
        check_teacher_frame(SquareFamily(), student, family, student, "--teacher t.pth")


@pytest.mark.parametrize("method", ["icd", "fpn-mse"])
def test_checkpoints_written_before_the_families_load_as_torchvision_ones(method):
    import os

    from icd.detection.models import DetectorSpec
    from icd.engine.run_spec import checkpoint_detector_spec, distiller_of_run

    path = os.path.join(os.path.dirname(__file__), "data", "distillers_before_registry.pth")
    saved = torch.load(path, weights_only=True)[method]
    assert "family" not in saved["detector_spec"]
    spec = checkpoint_detector_spec({"detector_spec": saved["detector_spec"]}, "old.pth", 7)
    teacher = checkpoint_detector_spec({"detector_spec": saved["teacher_spec"]}, "old teacher.pth", 7)
    assert isinstance(spec, DetectorSpec) and spec.family == "torchvision"
    assert get_family("torchvision").spec_to_dict(spec) == {**saved["detector_spec"], "family": "torchvision"}
    distiller_of_run(saved["args"], teacher, 7).load_state_dict(saved["distiller"], strict=True)
    with pytest.raises(ConfigError, match=r"^old\.pth: detector_spec family yolo: no such detector family"):
        checkpoint_detector_spec({"detector_spec": {**saved["detector_spec"], "family": "yolo"}}, "old.pth", 7)


def test_icd_train_warns_when_the_teacher_reads_its_student_at_another_scale(data, finished_run, tmp_path, caplog):
    from user_errors import RUN

    from icd.cli import main

    teacher = f"{finished_run}/checkpoint.pth"  # trained at 64 px
    argv = f"train --data-path {data} {RUN} --teacher {teacher} --distill fpn-mse --output-dir {tmp_path / 's'}"
    assert main([*argv.split(), "--min-size", "48", "--max-size", "48"]) == 0
    assert "teacher transform.min_size = (64,) but student transform.min_size = (48,): the teacher reads" in caplog.text
    assert f"(--teacher {teacher})" in caplog.text
