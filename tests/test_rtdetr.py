"""RT-DETR from Hugging Face transformers (icd/detection/adapters/rtdetr.py); skipped without the
``rtdetr`` extra (pip install --no-deps -r requirements-rtdetr.txt)."""

from __future__ import annotations

import pytest
import torch

from icd.detection.adapters import rtdetr as adapter

if not adapter.available():
    pytest.skip("the rtdetr extra (transformers, scipy) is not installed", allow_module_level=True)

from icd.detection.feature_tap import FeatureTap  # noqa: E402
from icd.errors import ConfigError, WeightsMismatchError  # noqa: E402

S = 64  # the square input side of the tiny models


def tiny_spec(backbone: str = "resnet18", **kw) -> adapter.RTDetrSpec:
    settings = {"num_classes": 3, "width": 0.25, "hidden_dim": 32, "image_size": S, "num_queries": 12,
                "num_denoising": 6, "decoder_layers": 2, **kw}  # fmt: skip
    return adapter.RTDetrSpec(backbone=backbone, **settings)


def batch() -> tuple[list[torch.Tensor], list[dict]]:
    images = [torch.rand(3, 48, 96), torch.rand(3, 64, 64)]  # another size and aspect than the input frame
    targets = [
        {"boxes": torch.tensor([[12.0, 6.0, 36.0, 30.0]]), "labels": torch.tensor([1])},
        {"boxes": torch.tensor([[0.0, 0.0, 16.0, 16.0], [32.0, 40.0, 60.0, 64.0]]), "labels": torch.tensor([0, 2])},
    ]
    return images, targets


@pytest.mark.parametrize("backbone", ["resnet18", "resnet50"])
def test_tap_gives_the_hybrid_encoder_maps_at_strides_8_16_32(backbone):
    model = adapter.build_rtdetr(tiny_spec(backbone)).train()
    images, targets = batch()
    with FeatureTap(model) as tap:
        losses = model(images, targets)
        tapped = tap.batch
    assert set(losses) == set(adapter.LOSS_KINDS)
    assert all(v.ndim == 0 and torch.isfinite(v) and v > 0 for v in losses.values())
    assert tapped.padded_size == (S, S)
    assert tapped.image_sizes.tolist() == [[S, S], [S, S]]  # no padding: all valid
    assert [tuple(f.shape) for f in tapped.features] == [(2, 32, S // s, S // s) for s in (8, 16, 32)]
    assert model.spec.strides == [8, 16, 32] and model.spec.levels == [3, 4, 5]
    # boxes in the resized frame: image 0 (48 x 96) is scaled by (64/96, 64/48)
    torch.testing.assert_close(tapped.boxes[0], torch.tensor([[8.0, 8.0, 24.0, 40.0]]))
    torch.testing.assert_close(tapped.boxes[1], targets[1]["boxes"])
    assert [lab.tolist() for lab in tapped.labels] == [[1], [0, 2]]
    # the teacher's maps on the student's batch: the same maps from the batch alone
    again = list(model.backbone(tapped.images).values())
    for a, b in zip(again, tapped.features, strict=True):
        torch.testing.assert_close(a, b)
    sum(losses.values()).backward()
    assert model.hf.model.backbone.model.embedder.embedder[0].convolution.weight.grad is not None


@pytest.mark.parametrize("detector", ["rtdetr", "rtdetrv2"])
def test_losses_sum_to_transformers_total(detector):
    """The three kinds regroup transformers' loss_dict: their sum is its weighted total (RT-DETR and
    RT-DETRv2: the same backbone and encoder, another decoder)."""
    model = adapter.build_rtdetr(tiny_spec(detector=detector)).train()
    assert type(model.hf).__name__ == adapter.HF_CLASSES[detector][1]
    images, targets = batch()
    torch.manual_seed(1)
    ours = sum(model(images, targets).values())
    image_list, resized = model.transform(images, targets)
    torch.manual_seed(1)  # the same denoising queries
    theirs = model.hf(pixel_values=image_list.tensors, labels=model._hf_labels(resized, S)).loss
    torch.testing.assert_close(ours, theirs)


def test_detections_are_in_each_original_image_frame():
    model = adapter.build_rtdetr(tiny_spec(score_thresh=0.0, max_detections=5)).eval()
    # one query per corner box: cx, cy, w, h in [0, 1] of the square frame
    boxes = torch.tensor([[[0.25, 0.5, 0.5, 1.0], [0.9, 0.9, 0.4, 0.4]]])
    logits = torch.tensor([[[4.0, -4.0, -4.0], [-4.0, -4.0, 3.0]]])
    (out,) = model.postprocess(logits, boxes, [(48, 96)])
    assert out["labels"][:2].tolist() == [0, 2]
    torch.testing.assert_close(out["boxes"][0], torch.tensor([0.0, 0.0, 48.0, 48.0]))
    torch.testing.assert_close(out["boxes"][1], torch.tensor([67.2, 33.6, 96.0, 48.0]))  # clamped to the image
    assert out["scores"][0] == torch.sigmoid(torch.tensor(4.0))
    assert len(out["scores"]) == 5
    with torch.no_grad():
        detections = model(batch()[0])
    assert [d["boxes"].shape[1] for d in detections] == [4, 4]
    assert float(detections[0]["boxes"][:, 2].max()) <= 96 and float(detections[0]["boxes"][:, 3].max()) <= 48


def test_local_weights_load_strictly(tmp_path):
    from safetensors.torch import save_file

    source = adapter.build_rtdetr(tiny_spec())
    path = tmp_path / "model.safetensors"
    save_file({k: v.contiguous() for k, v in source.hf.state_dict().items()}, str(path))
    model = adapter.build_rtdetr(tiny_spec(), adapter.read_local_weights(str(tmp_path)), "the file")
    for (k, a), b in zip(model.hf.state_dict().items(), source.hf.state_dict().values(), strict=True):
        assert torch.equal(a, b), k
    with pytest.raises(WeightsMismatchError, match="other shapes"):
        adapter.build_rtdetr(tiny_spec(hidden_dim=16), adapter.read_local_weights(str(path)), "the file")
    with pytest.raises(WeightsMismatchError, match="missing keys"):
        adapter.build_rtdetr(tiny_spec("resnet50"), adapter.read_local_weights(str(path)), "the file")
    with pytest.raises(ConfigError, match="no such weights file"):
        adapter.read_local_weights(str(tmp_path / "nothing"))


@pytest.mark.parametrize(
    ("settings", "flag"),
    [({"backbone": "resnet152"}, "--backbone"), ({"image_size": 100}, "--min-size 100"),
     ({"hidden_dim": 12}, "--fpn-channels 12"), ({"norm": "gn"}, "--norm gn")],  # fmt: skip
)
def test_spec_errors_name_the_flag(settings, flag):
    with pytest.raises(ConfigError, match=flag):
        adapter.RTDetrSpec(**settings)


def test_family_builds_from_flags_and_round_trips_its_spec():
    from icd.detection.adapters import family_of, family_of_spec

    family = family_of("rtdetr")
    flags = {"detector": "rtdetr", "backbone": "resnet18", "fpn_channels": 32, "min_size": [S], "max_size": 1333,
             "rtdetr_width": 0.25, "rtdetr_queries": 12, "rtdetr_decoder_layers": 2, "rtdetr_denoising": 6}  # fmt: skip
    spec = family.spec_from_args(flags, num_classes=3)
    assert spec == tiny_spec()
    saved = family.spec_to_dict(spec)
    assert saved["family"] == "rtdetr" and family_of_spec(saved).spec_from_dict(saved) == spec
    layout = family.feature_layout(spec)
    assert layout.levels == (3, 4, 5) and layout.strides == (8.0, 16.0, 32.0) and layout.width == 32
    with pytest.raises(ConfigError, match="--min-size 64 96"):
        family.spec_from_args({**flags, "min_size": [64, 96]}, num_classes=3)
    with pytest.raises(ConfigError, match="--max-level 7"):
        family.spec_from_args({**flags, "max_level": 7}, num_classes=3)


def test_family_frame_features_and_inheritance():
    from icd.detection.adapters import family_of

    family = family_of("rtdetr")
    # the neck is inheritable when the encoders' blocks are as wide (R18 halves them by default)
    student, teacher = adapter.build_rtdetr(tiny_spec(expansion=1.0)), adapter.build_rtdetr(tiny_spec("resnet50"))
    images, targets = batch()
    frame = family.frame(student, student.spec, images, targets)
    assert frame.padded_size == (S, S) and frame.valid_regions().tolist() == [[0, 0, S, S]] * 2
    torch.testing.assert_close(frame.boxes[0], torch.tensor([[8.0, 8.0, 24.0, 40.0]]))
    maps = family.features(teacher, teacher.spec, frame.images)
    assert [tuple(m.shape) for m in maps] == [(2, 32, S // s, S // s) for s in (8, 16, 32)]
    family.check_same_frame(teacher, student)
    copied = family.inherit(student, student.spec, teacher, teacher.spec, ["neck", "head"])
    assert copied and all(k.startswith(("hf.model.encoder.", "hf.model.dec", "hf.model.enc_", "hf.model.denoising"))
                          for k in copied)  # fmt: skip
    for key in copied:
        assert torch.equal(student.state_dict()[key], teacher.state_dict()[key])
    with pytest.raises(ConfigError, match="--inherit-teacher neck"):
        family.inherit(adapter.build_rtdetr(tiny_spec()), tiny_spec(), teacher, teacher.spec, ["neck"])
    family.set_input_size(student, [96], None)
    with pytest.raises(ConfigError, match="teacher input side"):
        family.check_same_frame(teacher, student)


def test_family_loads_backbone_or_whole_detector_weights():
    from icd.detection.adapters import family_of

    family = family_of("rtdetr")
    source = adapter.build_rtdetr(tiny_spec())
    resnet = source.hf.model.backbone.model.state_dict()
    model = family.build(tiny_spec(), resnet, "--backbone-weights r.pth")
    assert torch.equal(model.hf.model.backbone.model.embedder.embedder[0].convolution.weight,
                       source.hf.model.backbone.model.embedder.embedder[0].convolution.weight)  # fmt: skip
    whole = family.build(tiny_spec(), source.hf.state_dict(), "--backbone-weights d.pth")
    pairs = zip(whole.state_dict().values(), source.state_dict().values(), strict=True)
    assert all(torch.equal(a, b) for a, b in pairs)
    with pytest.raises(WeightsMismatchError, match="--backbone-weights r50.pth"):
        family.build(tiny_spec("resnet50"), resnet, "--backbone-weights r50.pth")


# icd train's flags of the tiny RT-DETRs above (the conftest's ``data``: 4 + 2 shapes images of 64 px)
TINY_RTDETR = ("--detector rtdetr --fpn-channels 32 --min-size 64 --rtdetr-width 0.25 --rtdetr-queries 12 "
               "--rtdetr-decoder-layers 2 --rtdetr-denoising 6 --batch-size 2 --workers 0 --device cpu "
               "--no-progress --epoch-checkpoint-every 0")  # fmt: skip


@pytest.fixture(scope="module")
def rtdetr_teacher(data, tmp_path_factory) -> str:
    """A 2-iteration RT-DETR R50 (the teacher of the distillation tests), evaluated once."""
    from icd.cli import main

    out = tmp_path_factory.mktemp("rtdetr_teacher")
    argv = f"train --data-path {data} --backbone resnet50 {TINY_RTDETR} --iters 2 --print-freq 1 --output-dir {out}"
    assert main(argv.split()) == 0
    return str(out / "checkpoint.pth")


def test_teacher_run_evaluates_and_its_checkpoint_rebuilds(rtdetr_teacher):
    """icd train --detector rtdetr: trained with AdamW, evaluated by the COCO evaluator, and the
    checkpoint (read with weights_only=True) rebuilds the same detector."""
    import json
    import os

    from icd.engine.checkpoint import load_checkpoint
    from icd.engine.run_spec import load_detector

    run = os.path.dirname(rtdetr_teacher)
    records = [json.loads(line) for line in open(os.path.join(run, "metrics.jsonl"))]
    train = [r for r in records if r["type"] == "train"]
    assert [r["iter"] for r in train] == [1, 2]
    assert all(set(adapter.LOSS_KINDS) <= set(r) and r["loss"] > 0 for r in train)
    (evaluation,) = [r for r in records if r["type"] == "eval"]
    assert 0.0 <= evaluation["AP"] <= 100.0
    ckpt = load_checkpoint(rtdetr_teacher, "--teacher")
    assert ckpt["detector_spec"]["family"] == "rtdetr" and ckpt["detector_spec"]["backbone"] == "resnet50"
    assert ckpt["optimizer"]["param_groups"][0].get("amsgrad") is False  # AdamW, not SGD
    model, spec = load_detector(ckpt)
    assert isinstance(model, adapter.RTDetrDetector) and spec.hidden_dim == 32
    for key, value in model.state_dict().items():
        assert torch.equal(value, ckpt["model"][key]), key


@pytest.mark.parametrize("method", ["icd", "fpn-mse"])
def test_student_distils_from_the_teacher_on_the_hybrid_encoder_maps(method, data, rtdetr_teacher, tmp_path):
    import json

    from icd.cli import main
    from icd.engine.checkpoint import load_checkpoint

    out = tmp_path / method
    argv = (f"train --data-path {data} --backbone resnet18 {TINY_RTDETR} --iters 2 --no-eval --print-freq 1 "
            f"--teacher {rtdetr_teacher} --distill {method} --output-dir {out}")  # fmt: skip
    assert main(argv.split()) == 0
    train = [json.loads(line) for line in open(out / "metrics.jsonl")]
    assert [r["iter"] for r in train if r["type"] == "train"] == [1, 2]
    assert all(r["loss_distill"] > 0 for r in train if r["type"] == "train")
    ckpt = load_checkpoint(str(out / "checkpoint.pth"), "--resume")
    assert ckpt["detector_spec"]["backbone"] == "resnet18"
    assert bool(ckpt["distiller"]) == (method == "icd")  # ICD's modules are saved; FPN-MSE has none


def test_without_transformers_the_detector_names_the_extra(data, tmp_path):
    """--detector rtdetr where transformers cannot be imported: one line naming requirements-rtdetr.txt."""
    import subprocess
    import sys
    import textwrap

    code = textwrap.dedent("""
        import sys

        class Absent:
            def find_spec(self, name, path=None, target=None):
                if name.split(".")[0] == "transformers":
                    raise ModuleNotFoundError(f"No module named {name!r}", name=name)

        sys.meta_path.insert(0, Absent())
        from icd.cli import main

        sys.exit(main(sys.argv[1:]))
    """)
    argv = f"train --data-path {data} {TINY_RTDETR} --iters 1 --output-dir {tmp_path / 'run'}".split()
    done = subprocess.run([sys.executable, "-c", code, *argv], capture_output=True, text=True, timeout=300)
    assert done.returncode == 2, done.stderr
    assert done.stderr.strip().splitlines()[-1] == (
        "icd: error: --detector rtdetr needs the rtdetr extra (transformers is missing): " + adapter.INSTALL_HINT
    )
