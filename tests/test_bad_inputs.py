"""Bad inputs are rejected with a message naming the flag, file or field; none crashes, hangs,
overwrites a run, or exits 0 after training or evaluating nothing (tiny runs, 64 px images)."""

from __future__ import annotations

import json
import os
import shutil

import numpy as np
import pytest
import torch
from PIL import Image
from tiny_runs import TINY
from user_errors import RUN, error_line, parse_error

from icd.cli import build_parser, main
from icd.data.coco import BadDataError, CocoDetection
from icd.detection.models import DetectorSpec, build_detector
from icd.engine.checkpoint import load_checkpoint, save_atomic
from icd.errors import NonFiniteError
from icd.flags import teacher_only


def _copy_data(data: str, dst, edit=None, corrupt: tuple[str, ...] = ()) -> str:
    """A copy of the shapes data; ``edit(split, coco_dict)`` changes an annotation file, the
    images of the ``corrupt`` splits are overwritten with non-image bytes."""
    shutil.copytree(data, dst)
    for split in ("train", "val"):
        path = os.path.join(dst, "annotations", f"instances_{split}.json")
        if edit is not None:
            with open(path) as f:
                coco = json.load(f)
            edit(split, coco)
            with open(path, "w") as f:
                json.dump(coco, f)
        if split in corrupt:
            for name in os.listdir(os.path.join(dst, split)):
                with open(os.path.join(dst, split, name), "wb") as f:
                    f.write(b"not an image")
    return str(dst)


# -- flags, on the command line and in presets ------------------------------------------------
BAD_FLAGS = [
    ("--batch-size", "0"),
    ("--print-freq", "0"),
    ("--workers", "-1"),
    ("--lr", "nan"),
    ("--lr", "-0.01"),
    ("--momentum", "1.5"),
    ("--weight-decay", "inf"),
    ("--distill-weight", "nan"),
    ("--icd-clip", "0"),
    ("--icd-lr", "inf"),
    ("--icd-lr", "-1"),
    ("--min-size", "0"),
    ("--max-size", "0"),
    ("--fpn-channels", "0"),
    ("--icd-heads", "0"),
    ("--icd-mask-temperature", "0"),
    ("--icd-mask-temperature", "nan"),
    ("--iters", "0"),
    ("--flip-prob", "2"),
]


@pytest.mark.parametrize(("flag", "value"), BAD_FLAGS)
def test_out_of_range_flags_are_parse_errors(flag, value, capsys):
    line = parse_error(["train", "--data-path", "d", flag, value], capsys)
    assert f"argument {flag}" in line and f"{value}: expected" in line


@pytest.mark.parametrize("value", ["nan", "0", "-4"])
def test_a_bad_attention_gain_is_a_parse_error(value, capsys):
    line = parse_error(["pretrain", "--data-path", "d", "--teacher", "t.pth", "--attention-gain", value], capsys)
    assert "argument --attention-gain" in line and f"{value}: expected" in line


@pytest.mark.parametrize(("key", "value"), [("batch_size", "0"), ("lr", "nan"), ("icd_clip", "0.0"),
                                            ("print_freq", "0"), ("workers", "-2"), ("momentum", "inf")])
def test_out_of_range_preset_values_are_errors_naming_the_preset(key, value, tmp_path, capsys):
    preset = tmp_path / "bad.toml"
    preset.write_text(f"{key} = {value}\n")
    line = parse_error(["train", "--config", str(preset), "--data-path", "d"], capsys)
    assert f"preset {preset}: {key} = " in line and "expected" in line


@pytest.mark.parametrize(
    "flags",
    ["--distill icd", "--distill fpn-mse", "--icd-heads 4", "--inherit-teacher neck", "--distill-weight 1",
     "--teacher-backbone resnet50", "--icd-neg-ratio 5.0"],  # the last two equal to the defaults
)
def test_distillation_flags_without_teacher_are_errors(flags, capsys):
    assert main(["train", "--data-path", "d", *flags.split()]) == 2
    line = error_line(capsys)
    assert f"--{flags.split()[0][2:]}" in line and "need --teacher" in line


def test_distillation_keys_of_a_preset_without_teacher_are_errors(tmp_path, capsys):
    preset = tmp_path / "p.toml"
    preset.write_text("icd_heads = 8\n")  # even the default value: the preset asks for distillation
    assert main(["train", "--config", str(preset), "--data-path", "d"]) == 2
    assert "--icd-heads 8" in error_line(capsys)
    # flags added later (the teacher side's pre-training, ...) are covered by their prefix
    assert teacher_only("icd_pretrain_iters") and teacher_only("icd_init") and not teacher_only("lr")


# -- output directory ------------------------------------------------------------------------
def test_a_new_run_never_lands_on_another_runs_files(data, finished_run, tmp_path, capsys):
    ckpt = os.path.join(finished_run, "checkpoint.pth")
    before = {name: open(os.path.join(finished_run, name), "rb").read() for name in os.listdir(finished_run)}
    # refused before anything is built: even an unusable --data-path is not looked at
    assert main(f"train --data-path {tmp_path}/nothing {RUN} --output-dir {finished_run}".split()) == 2
    line = error_line(capsys)
    assert "holds another run (checkpoint.pth, metrics.jsonl)" in line
    assert f"--resume {ckpt}" in line and "--overwrite" in line
    after = {name: open(os.path.join(finished_run, name), "rb").read() for name in os.listdir(finished_run)}
    assert after == before

    copy = str(tmp_path / "copy")
    shutil.copytree(finished_run, copy)
    old_metrics = open(os.path.join(copy, "metrics.jsonl")).read()
    save_atomic({"model": {}}, os.path.join(copy, "model_5.pth"))  # an epoch file of the old run
    assert main(f"train --data-path {data} {RUN} --output-dir {copy} --overwrite --seed 3".split()) == 0
    assert not os.path.exists(os.path.join(copy, "model_5.pth"))
    new_metrics = open(os.path.join(copy, "metrics.jsonl")).read()
    assert new_metrics != old_metrics and new_metrics.count('"type": "train"') == 1  # no mixed records
    assert load_checkpoint(os.path.join(copy, "checkpoint.pth"))["args"]["seed"] == 3


def test_an_unwritable_output_dir_is_refused_at_start(data, tmp_path, capsys):
    blocker = tmp_path / "a_file"
    blocker.write_text("x")
    assert main(f"train --data-path {data} {RUN} --output-dir {blocker}/run".split()) == 2
    assert f"--output-dir {blocker}/run: is not writable" in error_line(capsys)


def test_resume_and_overwrite_together_are_refused(data, finished_run, capsys):
    ckpt = os.path.join(finished_run, "checkpoint.pth")
    assert main(f"train --data-path {data} {RUN} --output-dir {finished_run} --resume {ckpt} --overwrite".split()) == 2
    assert "--resume and --overwrite" in error_line(capsys)


# -- resume -----------------------------------------------------------------------------------
def test_resume_into_other_distillation_settings_names_the_difference(data, finished_run, tmp_path, capsys):
    spec = DetectorSpec("retinanet", "resnet18", num_classes=7, fpn_channels=32, norm="gn",
                        min_size=(64,), max_size=64)
    teacher = str(tmp_path / "teacher.pth")
    save_atomic({"model": build_detector(spec).state_dict(), "detector_spec": spec.to_dict()}, teacher)
    ckpt = os.path.join(finished_run, "checkpoint.pth")
    argv = f"train --data-path {data} {TINY} --iters 2 --no-eval --output-dir {finished_run} --resume {ckpt}"
    assert main(f"{argv} --teacher {teacher} --distill fpn-mse".split()) == 2
    line = error_line(capsys)
    assert "--teacher none there, given here" in line and "optimizer" not in line
    assert main(f"{argv} --fpn-channels 16".split()) == 2
    assert "--fpn-channels 32 there, 16 here" in error_line(capsys)
    # a teacher's weights are no run to resume (in the teacher's own folder: no other run's files there)
    assert main(f"{argv} --resume {teacher} --output-dir {tmp_path}".split()) == 2
    assert "is not an icd train checkpoint (no optimizer" in error_line(capsys)


def test_resume_of_a_finished_run_trains_nothing_and_says_so(data, finished_run, capsys):
    ckpt = os.path.join(finished_run, "checkpoint.pth")
    assert main(f"train --data-path {data} {RUN} --output-dir {finished_run} --resume {ckpt}".split()) == 2
    assert "is at iteration 1 and this run stops at iteration 1: nothing to train" in error_line(capsys)


# -- non-finite --------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def trainer(data, tmp_path_factory):
    from icd.engine.trainer import Trainer

    out = tmp_path_factory.mktemp("nonfinite")
    args = build_parser().parse_args(f"train --data-path {data} {RUN} --output-dir {out}".split())
    built = Trainer(args)
    yield built
    built.close()


def _batch(trainer):
    images, targets = zip(*(trainer.train_set[i] for i in range(2)), strict=True)
    return list(images), list(targets)


def test_non_finite_loss_names_the_losses_and_writes_nothing(trainer, monkeypatch):
    images, targets = _batch(trainer)
    losses = {"classification": torch.tensor(float("nan")), "bbox_regression": torch.tensor(0.5)}
    monkeypatch.setattr(trainer, "_losses", lambda *a: losses)
    with pytest.raises(NonFiniteError, match=r"iteration 1: loss_classification = nan \(finite: "
                                             r"loss_bbox_regression 0.5\); the student diverged"):
        trainer.train_step(images, targets)

    def teacher_at_fault(*a):  # the teacher's FPN maps are the non-finite ones
        trainer._teacher_maps = [torch.ones(1, 2, 4, 4), torch.full((1, 2, 2, 2), float("inf"))]
        return {"classification": torch.tensor(0.3), "distill": torch.tensor(float("nan"))}

    monkeypatch.setattr(trainer, "_losses", teacher_at_fault)
    with pytest.raises(NonFiniteError, match=r"loss_distill = nan .* the teacher's FPN outputs are non-finite"):
        trainer.train_step(images, targets)
    assert trainer.iteration == 0 and not os.path.exists(os.path.join(trainer.args.output_dir, "checkpoint.pth"))


def test_non_finite_parameter_stops_before_any_checkpoint(trainer):
    images, targets = _batch(trainer)
    trainer.train_step(images, targets)  # a real step: finite
    assert bool(trainer._params_finite)
    weight = dict(trainer.model.named_parameters())["head.classification_head.cls_logits.weight"]
    with torch.no_grad():
        weight[0, 0, 0, 0] = float("nan")
    with pytest.raises(NonFiniteError, match="head.classification_head.cls_logits.weight is non-finite"):
        trainer.save(1, 0)  # no NaN checkpoint, ever
    assert not os.path.exists(os.path.join(trainer.args.output_dir, "checkpoint.pth"))
    trainer._params_finite = torch.tensor(False)  # what the step that wrote the NaN would have flagged
    with pytest.raises(NonFiniteError, match="made head.classification_head.cls_logits.weight non-finite"):
        trainer.train_step(images, targets)


def test_teacher_with_non_finite_weights_is_refused(data, tmp_path, capsys):
    spec = DetectorSpec("retinanet", "resnet18", num_classes=7, fpn_channels=32, norm="gn",
                        min_size=(64,), max_size=64)
    state = build_detector(spec).state_dict()
    state["backbone.fpn.layer_blocks.0.0.weight"][0, 0, 0, 0] = float("nan")
    teacher = str(tmp_path / "teacher.pth")
    save_atomic({"model": state, "detector_spec": spec.to_dict()}, teacher)
    out = tmp_path / "run"
    assert main(f"train --data-path {data} {RUN} --teacher {teacher} --output-dir {out}".split()) == 1
    assert "its weight backbone.fpn.layer_blocks.0.0.weight has NaN or inf" in error_line(capsys)
    assert not os.path.exists(out / "checkpoint.pth")


# -- nothing trained or evaluated ---------------------------------------------------------------
def test_every_image_skipped_is_no_run(data, finished_run, tmp_path, capsys):
    bad = _copy_data(data, tmp_path / "bad", corrupt=("train", "val"))
    out = tmp_path / "run"
    assert main(f"train --data-path {bad} {RUN} --on-bad-data skip --output-dir {out}".split()) == 2
    assert "epoch 0: no optimiser step in 2 batches" in error_line(capsys)
    assert not os.path.exists(out / "checkpoint.pth")
    ckpt = os.path.join(finished_run, "checkpoint.pth")
    argv = f"eval --data-path {bad} --checkpoint {ckpt} --workers 0 --device cpu --no-progress --on-bad-data skip"
    assert main([*argv.split(), "--output-dir", str(tmp_path / "eval")]) == 2
    assert "none of its 2 images could be read" in error_line(capsys)


def test_training_split_without_annotations_warns(data, tmp_path, caplog):
    from icd.engine.trainer import Trainer

    def drop(split, coco):
        coco["annotations"] = []

    empty = _copy_data(data, tmp_path / "empty", edit=drop)
    args = build_parser().parse_args(f"train --data-path {empty} {RUN} --output-dir {tmp_path / 'r'}".split())
    Trainer(args).close()
    assert "has no (usable) annotations" in caplog.text


# -- malformed annotation files -----------------------------------------------------------------
def _image_dir(tmp_path, sizes=((32, 24),)):
    image_dir = tmp_path / "images"
    image_dir.mkdir(exist_ok=True)
    images = []
    for i, (w, h) in enumerate(sizes, start=1):
        Image.fromarray(np.zeros((h, w, 3), np.uint8)).save(image_dir / f"{i}.png")
        images.append({"id": i, "file_name": f"{i}.png", "width": w, "height": h})
    return str(image_dir), images


def _coco(images, annotations=None, categories=None):
    return {
        "images": images,
        "annotations": annotations if annotations is not None else
        [{"id": 1, "image_id": 1, "category_id": 1, "bbox": [2, 2, 8, 8], "iscrowd": 0, "area": 64}],
        "categories": categories if categories is not None else [{"id": 1, "name": "a"}],
    }


def _write_json(tmp_path, obj, name="ann.json") -> str:
    path = tmp_path / name
    path.write_text(obj if isinstance(obj, str) else json.dumps(obj))
    return str(path)


FILE_LEVEL = [
    ("{not json", "not valid JSON"),
    ('{"images": [{"id": 1, "file_name"', "not valid JSON"),  # truncated
    ("[1, 2]", "the top level is a JSON list"),
    ({"annotations": [], "categories": [{"id": 1, "name": "a"}]}, "no 'images'"),
    ("no annotations", "no 'annotations'"),
    ("no categories", "no 'categories'"),
    ("empty categories", "'categories' is empty"),
    ("empty images", "'images' is empty"),
    ("category without id", r"categories\[0\] .* has no integer 'id'"),
    ({"images": {}, "annotations": [], "categories": []}, "'images' is a JSON dict; expected a list"),
]


@pytest.mark.parametrize(("content", "message"), FILE_LEVEL)
def test_file_level_problems_stop_even_under_skip(content, message, tmp_path):
    image_dir, images = _image_dir(tmp_path)
    coco = _coco(images)
    if content == "no annotations":
        del coco["annotations"]
    elif content == "no categories":
        del coco["categories"]
    elif content == "empty categories":
        coco["categories"] = []
    elif content == "empty images":
        coco["images"] = []
    elif content == "category without id":
        coco["categories"] = [{"name": "a"}]
    else:
        coco = content
    path = _write_json(tmp_path, coco)
    for mode in ("error", "skip"):
        with pytest.raises(BadDataError, match=f"{path}: .*{message}" if "JSON" not in message else message):
            CocoDetection(image_dir, path, on_bad_data=mode)


@pytest.mark.parametrize("field", ["category_id", "bbox", "id"])
def test_annotation_without_a_field_is_named_and_skippable(field, tmp_path, caplog):
    image_dir, images = _image_dir(tmp_path)
    good = {"id": 1, "image_id": 1, "category_id": 1, "bbox": [2, 2, 8, 8]}  # no area, no iscrowd: filled in
    broken = {"id": 2, "image_id": 1, "category_id": 1, "bbox": [1, 1, 4, 4]}
    del broken[field]
    path = _write_json(tmp_path, _coco(images, [good, broken]))
    with pytest.raises(BadDataError, match=rf"annotations\[1\] .*has no '{field}'"):
        CocoDetection(image_dir, path)
    ds = CocoDetection(image_dir, path, on_bad_data="skip")
    assert ds.num_annotations == 1 and ds.coco.anns[1]["area"] == 64 and ds[0][1]["boxes"].shape == (1, 4)
    assert f"has no '{field}'" in caplog.text


def test_a_file_name_outside_the_image_folder_is_bad_data(tmp_path, caplog):
    image_dir, images = _image_dir(tmp_path, sizes=((32, 24), (16, 16)))
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(tmp_path / "secret.png")
    images[1]["file_name"] = "../secret.png"
    images.append({"id": 3, "file_name": str(tmp_path / "secret.png"), "width": 8, "height": 8})
    path = _write_json(tmp_path, _coco(images))
    with pytest.raises(BadDataError, match=r"file_name '\.\./secret\.png' resolves outside the image folder"):
        CocoDetection(image_dir, path)
    ds = CocoDetection(image_dir, path, on_bad_data="skip")
    assert ds.image_ids == [1] and "secret.png" in caplog.text


def test_bad_data_in_a_run_is_one_line_before_any_model_is_built(data, tmp_path, capsys, monkeypatch):
    from icd.detection.adapters.torchvision import TorchvisionFamily

    def no_model(*a, **k):
        raise AssertionError("a model was built")

    monkeypatch.setattr(TorchvisionFamily, "build", no_model)

    def no_bbox(split, coco):
        if split == "train":
            del coco["annotations"][3]["bbox"]

    bad = _copy_data(data, tmp_path / "bad", edit=no_bbox)
    assert main(f"train --data-path {bad} {RUN} --output-dir {tmp_path / 'r'}".split()) == 2
    line = error_line(capsys)
    assert "instances_train.json: annotations[3] (annotation id" in line and "has no 'bbox'" in line


# -- declared sizes ------------------------------------------------------------------------------
def test_a_huge_declared_size_is_checked_before_a_mask_is_decoded(tmp_path, caplog):
    image_dir, images = _image_dir(tmp_path)
    images[0].update(width=200_000, height=300_000)  # 60 G pixels: decoding at it would never end well
    ann = {"id": 1, "image_id": 1, "category_id": 1, "bbox": [2, 2, 8, 8], "iscrowd": 0, "area": 64,
           "segmentation": [[2, 2, 10, 2, 10, 10, 2, 10]]}
    path = _write_json(tmp_path, _coco(images, [ann]))
    ds = CocoDetection(image_dir, path, with_masks=True)
    with pytest.raises(BadDataError, match=r"is 32x24 but its entry says 200000x300000"):
        ds[0]
    assert CocoDetection(image_dir, path, with_masks=True, on_bad_data="skip")[0] is None


@pytest.mark.parametrize(
    ("segmentation", "message"),
    [
        ({"size": [24, 32], "counts": "0Z1"}, "do not decode to the 32x24 image"),  # too few pixels
        ({"size": [24, 32], "counts": "PP"}, "do not decode"),  # ends inside a number
        ({"size": [24, 32], "counts": "\x7f\x7f"}, "do not decode"),  # not the alphabet
        ([[2, 2, 1e9, 2, 10, 1e9]], "lies far outside the 32x24 image"),
    ],
)
def test_masks_that_would_write_out_of_bounds_are_bad_data(segmentation, message, tmp_path):
    image_dir, images = _image_dir(tmp_path)
    ann = {"id": 1, "image_id": 1, "category_id": 1, "bbox": [2, 2, 8, 8], "iscrowd": 0, "area": 64,
           "segmentation": segmentation}
    path = _write_json(tmp_path, _coco(images, [ann]))
    with pytest.raises(BadDataError, match=message):
        CocoDetection(image_dir, path, with_masks=True)


def test_a_valid_compressed_rle_still_decodes(tmp_path):
    from pycocotools import mask as mask_utils

    image_dir, images = _image_dir(tmp_path)
    mask = np.zeros((24, 32), np.uint8)
    mask[3:9, 5:20] = 1
    rle = mask_utils.encode(np.asfortranarray(mask))
    ann = {"id": 1, "image_id": 1, "category_id": 1, "bbox": [5, 3, 15, 6], "iscrowd": 0, "area": 90,
           "segmentation": {"size": [24, 32], "counts": rle["counts"].decode("ascii")}}
    path = _write_json(tmp_path, _coco(images, [ann]))
    _, target = CocoDetection(image_dir, path, with_masks=True)[0]
    assert torch.equal(target["masks"][0], torch.from_numpy(mask))


# -- one-line errors and --debug -----------------------------------------------------------------
def test_user_errors_are_one_line_and_debug_shows_the_traceback(data, tmp_path, capsys, monkeypatch):
    argv = f"train --data-path {data} {RUN} --teacher {tmp_path}/missing.pth --output-dir {tmp_path / 'r'}"
    assert main(argv.split()) == 2
    assert f"no checkpoint file {tmp_path}/missing.pth" in error_line(capsys)
    garbage = tmp_path / "garbage.pth"
    garbage.write_text("not a checkpoint")
    assert main(f"eval --data-path {data} --checkpoint {garbage} --device cpu".split()) == 2
    assert "is not a readable torch checkpoint" in error_line(capsys)
    assert main(f"train --data-path {tmp_path}/none {RUN} --output-dir {tmp_path / 'r'}".split()) == 2
    assert "no annotation file for split 'train'" in error_line(capsys)
    with pytest.raises(FileNotFoundError):
        main(f"train --data-path {tmp_path}/none {RUN} --output-dir {tmp_path / 'r'} --debug".split())
    monkeypatch.setenv("ICD_DEBUG", "1")
    with pytest.raises(FileNotFoundError):
        main(f"train --data-path {tmp_path}/none {RUN} --output-dir {tmp_path / 'r'}".split())


def test_internal_errors_keep_their_traceback(data, tmp_path, monkeypatch):
    from icd.detection.adapters.torchvision import TorchvisionFamily

    def broken(*a, **k):
        raise ZeroDivisionError("a bug")

    monkeypatch.setattr(TorchvisionFamily, "build", broken)
    with pytest.raises(ZeroDivisionError, match="a bug"):
        main(f"train --data-path {data} {RUN} --output-dir {tmp_path / 'r'}".split())


def test_a_refused_eval_leaves_no_output_folder(data, tmp_path, monkeypatch, capsys):
    """eval checks that its --output-dir is writable before evaluating; refused later (here: no such
    checkpoint), it leaves no folder behind, not even the default ./output."""
    monkeypatch.chdir(tmp_path)
    missing = tmp_path / "absent.pth"
    assert main(f"eval --data-path {data} --checkpoint {missing} --workers 0 --device cpu --no-progress".split()) != 0
    assert f"--checkpoint {missing}" in error_line(capsys)
    nested = tmp_path / "a" / "b"
    assert main(f"eval --data-path {data} --checkpoint {missing} --device cpu --output-dir {nested}".split()) != 0
    assert sorted(os.listdir(tmp_path)) == []


def test_probe_of_an_unwritable_output_dir_is_one_line(tmp_path):
    from icd.engine.output_dir import probe_writable
    from icd.errors import OutputDirError

    blocker = tmp_path / "file"
    blocker.write_text("x")
    with pytest.raises(OutputDirError, match="is not writable"):
        probe_writable(str(blocker / "sub"))
    probe_writable(str(tmp_path / "new" / "deeper"))  # writable: checked, and gone again
    assert sorted(os.listdir(tmp_path)) == ["file"]
