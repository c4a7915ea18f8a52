"""Any COCO-format export: --train-ann/--train-images and --val-ann/--val-images beside --data-path."""

from __future__ import annotations

import json
import os
import shutil

import pytest
from tiny_runs import TINY

from icd.cli import main
from icd.data.coco import CocoDetection, dataset_paths, split_paths


@pytest.fixture(scope="module")
def shapes(tmp_path_factory):
    out = tmp_path_factory.mktemp("shapes")
    assert main(f"data shapes --out {out} --num-train 4 --num-val 2 --image-size 64 --seed 3".split()) == 0
    return str(out)


def _roboflow(shapes: str, root: str) -> dict[str, tuple[str, str]]:
    """Roboflow's COCO export: {train,valid}/_annotations.coco.json with the images beside it,
    image ids from 0 and an unused category 0 (the dataset's supercategory) before the classes."""
    paths = {}
    for split, folder in (("train", "train"), ("val", "valid")):
        image_dir, ann = split_paths(shapes, split)
        shutil.copytree(image_dir, os.path.join(root, folder))
        with open(ann) as f:
            coco = json.load(f)
        coco["categories"] = [{"id": 0, "name": "shapes", "supercategory": "none"}] + coco["categories"]
        for image in coco["images"]:
            image["id"] -= 1
        for annotation in coco["annotations"]:
            annotation["image_id"] -= 1
        out = os.path.join(root, folder, "_annotations.coco.json")
        with open(out, "w") as f:
            json.dump(coco, f)
        paths[split] = (out, os.path.join(root, folder))
    return paths


def _beside(shapes: str, root: str) -> dict[str, tuple[str, str]]:
    """A plain export: train.json next to train/, val.json next to val/."""
    paths = {}
    for split in ("train", "val"):
        image_dir, ann = split_paths(shapes, split)
        shutil.copytree(image_dir, os.path.join(root, split))
        shutil.copy(ann, os.path.join(root, f"{split}.json"))
        paths[split] = (os.path.join(root, f"{split}.json"), os.path.join(root, split))
    return paths


def _records(run_dir: str, kind: str) -> list[dict]:
    with open(os.path.join(run_dir, "metrics.jsonl")) as f:
        return [r for r in map(json.loads, f) if r["type"] == kind]


@pytest.mark.parametrize("layout", [_roboflow, _beside], ids=["roboflow", "json_beside_folder"])
def test_train_and_eval_on_an_export_layout(layout, shapes, tmp_path):
    paths = layout(shapes, str(tmp_path / "export"))
    (train_ann, train_images), (val_ann, val_images) = paths["train"], paths["val"]
    # the same samples as the COCO-layout root they were made from
    ours = CocoDetection(*dataset_paths(None, "train", train_ann, train_images))
    root = CocoDetection(*split_paths(shapes, "train"))
    assert len(ours) == len(root) == 4
    for i in range(len(ours)):
        (image, target), (root_image, root_target) = ours[i], root[i]
        assert image.equal(root_image) and target["boxes"].equal(root_target["boxes"])
        names = [ours.category_names[j] for j in target["labels"]]
        assert names == [root.category_names[j] for j in root_target["labels"]]

    run = str(tmp_path / "run")
    main(f"train --train-ann {train_ann} --train-images {train_images} --val-ann {val_ann} "
         f"--val-images {val_images} {TINY} --epochs 1 --batch-size 2 --print-freq 1 --score-thresh 0 "
         f"--epoch-checkpoint-every 0 --output-dir {run}".split())
    assert [r["iter"] for r in _records(run, "train")] == [1, 2]
    (trained,) = _records(run, "eval")
    assert 0 <= trained["AP"] <= 100
    with open(os.path.join(run, "detections_val.json")) as f:
        image_ids = {d["image_id"] for d in json.load(f)}
    with open(val_ann) as f:
        assert image_ids <= {image["id"] for image in json.load(f)["images"]}

    if layout is _roboflow:  # icd eval reads the same pair
        evaluated = str(tmp_path / "eval")
        main(f"eval --checkpoint {run}/checkpoint.pth --val-ann {val_ann} --val-images {val_images} "
             f"--workers 0 --device cpu --no-progress --output-dir {evaluated}".split())
        (record,) = _records(evaluated, "eval")
        assert record["AP"] == trained["AP"] and record["AP50"] == trained["AP50"]


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        ("", "give --data-path (a COCO-layout root) or --train-ann FILE and --train-images DIR"),
        ("--train-ann {ann} --no-eval", "--train-ann needs --train-images too"),
        ("--train-images {images} --no-eval", "--train-images needs --train-ann too"),
        ("--train-ann {images}/missing.json --train-images {images} --no-eval", "missing.json: no such file"),
        ("--train-ann {ann} --train-images {images}/nowhere --no-eval", "--train-images {images}/nowhere: no such"),
        ("--train-ann {ann} --train-images {images}", "or --val-ann FILE and --val-images DIR"),
        ("--data-path {root} --val-ann {ann}", "--val-ann needs --val-images too"),
    ],
)
def test_data_flag_errors_name_the_flag(flags, message, shapes, capsys):
    images, ann = split_paths(shapes, "train")
    fill = {"ann": ann, "images": images, "root": shapes}
    try:  # a usage error exits from the parser, a missing file is printed by main(): both give 2
        code = main(["train", *flags.format(**fill).split(), "--output-dir", "unused"])
    except SystemExit as exit_info:
        code = exit_info.code
    assert code == 2
    err = capsys.readouterr().err
    assert "icd: error:" in err and message.format(**fill) in err


def test_eval_needs_the_pair_or_a_root(shapes, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["eval", "--checkpoint", "c.pth", "--val-images", shapes])
    assert exit_info.value.code == 2 and "--val-images needs --val-ann too" in capsys.readouterr().err
