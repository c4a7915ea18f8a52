"""Categories without any annotation (a Roboflow export's dataset-level category 0): warned about, or
left out with --drop-empty-categories in training, evaluation and pre-training alike."""

from __future__ import annotations

import json
import logging

import pytest
from tiny_runs import TINY

from icd.cli import main
from icd.data.coco import BadDataError, CocoDetection, empty_categories_message
from icd.engine.checkpoint import load_checkpoint
from icd.engine.run_spec import checkpoint_categories


def _roboflow_like(data, split: str) -> str:
    """The shapes split with Roboflow's category 0: named after the dataset, parent of the others, unused."""
    with open(data / "annotations" / f"instances_{split}.json") as f:
        coco = json.load(f)
    for category in coco["categories"]:
        category["supercategory"] = "shapes"
    coco["categories"].insert(0, {"id": 0, "name": "shapes", "supercategory": "none"})
    path = data / f"{split}_roboflow.json"
    path.write_text(json.dumps(coco))
    return str(path)


@pytest.fixture(scope="module")
def export(tmp_path_factory):
    data = tmp_path_factory.mktemp("export")
    assert main(f"data shapes --out {data} --num-train 4 --num-val 2 --image-size 64 --seed 1".split()) == 0
    flags = (f"--train-ann {_roboflow_like(data, 'train')} --train-images {data / 'train'} "
             f"--val-ann {_roboflow_like(data, 'val')} --val-images {data / 'val'}")  # fmt: skip
    return data, flags


def test_the_message_names_the_category_and_the_flag(export):
    data, _ = export
    path = str(data / "train_roboflow.json")
    with open(path) as f:
        message = empty_categories_message(json.load(f), path)
    assert "1 of 8 categories have no annotation: 0 'shapes' (the supercategory of every other category" in message
    assert message.endswith("--drop-empty-categories leaves them out")
    with open(data / "annotations" / "instances_train.json") as f:
        assert empty_categories_message(json.load(f), "x") is None


def test_kept_with_a_warning_by_default(export, tmp_path, caplog):
    _, flags = export
    run = tmp_path / "kept"
    with caplog.at_level(logging.WARNING):
        assert main(f"train {flags} {TINY} --epochs 1 --no-eval --output-dir {run}".split()) == 0
    assert "0 'shapes'" in caplog.text and "--drop-empty-categories" in caplog.text
    categories = checkpoint_categories(load_checkpoint(str(run / "checkpoint.pth")))
    assert len(categories) == 8 and categories[0] == {"id": 0, "name": "shapes"}


def test_dropped_in_training_and_in_evaluation(export, tmp_path, caplog):
    data, flags = export
    run = tmp_path / "dropped"
    with caplog.at_level(logging.INFO):
        assert main(f"train {flags} {TINY} --epochs 1 --score-thresh 0 --drop-empty-categories "
                    f"--output-dir {run}".split()) == 0  # fmt: skip
    assert "left out the categories without annotations: 0 'shapes'" in caplog.text
    categories = checkpoint_categories(load_checkpoint(str(run / "checkpoint.pth")))
    assert [c["id"] for c in categories] == list(range(1, 8))
    with open(run / "per_class_ap_val.json") as f:  # the training run's evaluation: the 7 classes
        assert [r["category_id"] for r in json.load(f)] == list(range(1, 8))
    # icd eval of the export (category 0 still in its file) takes the checkpoint's classes
    out = tmp_path / "eval"
    assert main(f"eval --checkpoint {run}/checkpoint.pth --val-ann {data / 'val_roboflow.json'} "
                f"--val-images {data / 'val'} --workers 0 --device cpu --no-progress --output-dir {out}".split()) == 0
    with open(out / "per_class_ap_val.json") as f:
        assert [r["name"] for r in json.load(f)][:2] == ["circle", "square"]


def test_a_category_with_annotations_is_never_dropped(export):
    data, _ = export
    ann = str(data / "val_roboflow.json")
    with open(ann) as f:
        used = {a["category_id"] for a in json.load(f)["annotations"]}
    dataset = CocoDetection(str(data / "val"), ann, drop_empty_categories=True)
    assert dataset.category_ids == sorted(used)  # 2 images: some shapes are absent there too
    assert [c["id"] for c in dataset.dropped_categories] == sorted(set(range(8)) - used)
    with pytest.raises(BadDataError, match=r"categories \[\d+.*\] have annotations but are not among the classes"):
        CocoDetection(str(data / "val"), ann, categories=[c for c in range(1, 8) if c != min(used)])
    with pytest.raises(BadDataError, match=r"no category with id \[42\]"):
        CocoDetection(str(data / "val"), ann, categories=[*range(1, 8), 42])
