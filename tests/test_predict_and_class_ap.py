"""What a user looks at after training: the AP of each category (icd eval), class names kept in
checkpoints, and `icd predict` (COCO-format detections and PNGs with the boxes drawn)."""

from __future__ import annotations

import csv
import json
import logging
import os

import numpy as np
import pytest
from PIL import Image
from tiny_runs import TINY

from icd.cli import main
from icd.data.coco import load_coco
from icd.detection.class_table import markdown_table, write_class_tables
from icd.detection.drawing import MIN_DRAWN_SIDE, class_colour, draw_detections
from icd.detection.evaluation import coco_scores, per_class_rows
from icd.engine.checkpoint import load_checkpoint, save_atomic
from icd.engine.run_spec import checkpoint_categories


def _ground_truth(tmp_path):
    """Three categories: 'cat' with two boxes, 'dog' with one, 'empty' with none."""
    boxes = {1: [[10, 10, 40, 40]], 2: [[50, 50, 30, 30], [5, 60, 20, 20]]}
    annotations = [
        {"id": 10 * image + k, "image_id": image, "category_id": 3 if (image, k) == (2, 1) else 7, "bbox": box,
         "area": box[2] * box[3], "iscrowd": 0}
        for image, image_boxes in boxes.items() for k, box in enumerate(image_boxes)
    ]  # fmt: skip
    data = {
        "images": [{"id": i, "file_name": f"{i}.png", "width": 100, "height": 100} for i in (1, 2)],
        "annotations": annotations,
        "categories": [{"id": 3, "name": "dog"}, {"id": 7, "name": "cat"}, {"id": 9, "name": "empty"}],
    }
    path = tmp_path / "gt.json"
    path.write_text(json.dumps(data))
    return load_coco(str(path))


def test_per_class_ap_is_each_category_s_own_and_averages_to_the_overall_ap(tmp_path):
    gt = _ground_truth(tmp_path)
    # both cats found exactly; the dog is missed (a box elsewhere)
    detections = [
        {"image_id": 1, "category_id": 7, "bbox": [10, 10, 40, 40], "score": 0.9},
        {"image_id": 2, "category_id": 7, "bbox": [50, 50, 30, 30], "score": 0.8},
        {"image_id": 2, "category_id": 3, "bbox": [70, 5, 20, 20], "score": 0.7},
    ]
    scores = coco_scores(gt, detections)
    assert scores.per_class[7] == {"AP": 100.0, "AP50": 100.0, "AP75": 100.0}
    assert scores.per_class[3] == {"AP": 0.0, "AP50": 0.0, "AP75": 0.0}
    assert scores.per_class[9] == {"AP": None, "AP50": None, "AP75": None}  # no ground truth
    # COCO's AP is the mean over the categories with ground truth
    assert scores.metrics["AP"] == pytest.approx(50.0)
    rows = per_class_rows(gt, {"bbox": scores})
    assert [(r["name"], r["category_id"], r["instances"]) for r in rows] == [("dog", 3, 1), ("cat", 7, 2),
                                                                             ("empty", 9, 0)]
    # no detections at all: 0 where there is ground truth, None where there is none
    empty = coco_scores(gt, [])
    assert empty.per_class[7]["AP"] == 0.0 and empty.per_class[9]["AP"] is None


def test_per_class_tables_json_csv_markdown(tmp_path):
    gt = _ground_truth(tmp_path)
    scores = coco_scores(gt, [{"image_id": 1, "category_id": 7, "bbox": [10, 10, 40, 40], "score": 0.9}])
    rows = per_class_rows(gt, {"bbox": scores})
    paths = write_class_tables(str(tmp_path / "out"), "val", rows)
    assert sorted(os.path.basename(p) for p in paths.values()) == [
        "per_class_ap_val.csv", "per_class_ap_val.json", "per_class_ap_val.md"]
    with open(paths["json"]) as f:
        assert json.load(f) == rows
    with open(paths["csv"]) as f:
        table = list(csv.DictReader(f))
    assert [r["name"] for r in table] == ["dog", "cat", "empty"] and table[2]["AP"] == ""
    assert float(table[1]["AP50"]) == pytest.approx(rows[1]["AP50"])
    md = markdown_table(rows).splitlines()
    assert md[0] == "| category | id | instances | AP | AP50 | AP75 |"
    assert md[4] == "| empty | 9 | 0 | - | - | - |"
    assert not any(name.endswith(".tmp") for name in os.listdir(tmp_path / "out"))


def test_drawn_boxes_have_their_class_colour_and_a_readable_tag():
    image = Image.new("RGB", (64, 48), (255, 255, 255))
    drawn = draw_detections(image, [[8, 20, 40, 44]], [2], [0.87], ["a", "b", "triangle"])
    scale = MIN_DRAWN_SIDE // 48 + (MIN_DRAWN_SIDE % 48 > 0)
    assert drawn.size == (64 * scale, 48 * scale)  # small images are enlarged by a whole factor
    pixels = np.asarray(drawn)
    colour = class_colour(2)
    # the box's left edge, below the tag, is in the class's colour
    assert tuple(pixels[40 * scale, 8 * scale]) == colour
    # the tag above the box: filled with the colour, with text of another colour in it
    tag = pixels[20 * scale - 8 : 20 * scale - 2, 8 * scale : 8 * scale + 60].reshape(-1, 3)
    tag_colours = {tuple(p) for p in tag}
    assert colour in tag_colours and len(tag_colours) > 2
    # outside the box and the tag the image is untouched
    assert tuple(pixels[2, pixels.shape[1] - 3]) == (255, 255, 255)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A tiny RetinaNet trained for one epoch on 4 shapes images (with class names in its checkpoint)."""
    root = tmp_path_factory.mktemp("predict")
    data = root / "shapes"
    assert main(f"data shapes --out {data} --num-train 4 --num-val 2 --image-size 64 --seed 3".split()) == 0
    run = root / "run"
    assert main(f"train --data-path {data} {TINY} --epochs 1 --score-thresh 0 --output-dir {run}".split()) == 0
    return data, run


def test_checkpoints_keep_the_class_names(trained):
    data, run = trained
    with open(data / "annotations" / "instances_train.json") as f:
        categories = sorted(json.load(f)["categories"], key=lambda c: c["id"])
    expected = [{"id": c["id"], "name": c["name"]} for c in categories]
    for name in ("checkpoint.pth", "model_best.pth"):
        assert checkpoint_categories(load_checkpoint(str(run / name))) == expected
    assert expected[0]["name"] == "circle"


def test_eval_prints_and_writes_the_per_class_table(trained, tmp_path, capsys):
    data, run = trained
    out = tmp_path / "eval"
    assert main(f"eval --data-path {data} --checkpoint {run}/checkpoint.pth --workers 0 --device cpu "
                f"--no-progress --score-thresh 0 --output-dir {out}".split()) == 0
    printed = capsys.readouterr().out
    assert "| category | id | instances | AP | AP50 | AP75 |" in printed and "| circle | 1 |" in printed
    with open(out / "per_class_ap_val.json") as f:
        rows = json.load(f)
    with open(out / "metrics.jsonl") as f:
        (record,) = [json.loads(line) for line in f]
    assert len(rows) == 7
    measured = [r["AP"] for r in rows if r["instances"] > 0]
    assert record["AP"] == pytest.approx(sum(measured) / len(measured), abs=1e-6)


def test_predict_writes_coco_detections_and_drawn_pngs(trained, tmp_path, capsys):
    data, run = trained
    out = tmp_path / "pred"
    single = data / "train" / sorted(os.listdir(data / "train"))[0]
    argv = f"predict --checkpoint {run}/checkpoint.pth {data}/val {single} --score-threshold 0 --device cpu " \
           f"--no-progress --out {out}"
    assert main(argv.split()) == 0
    assert capsys.readouterr().out.strip() == str(out / "detections.json")
    with open(out / "detections.json") as f:
        result = json.load(f)
    assert [c["name"] for c in result["categories"]][:3] == ["circle", "square", "triangle"]
    assert [image["id"] for image in result["images"]] == [1, 2, 3]
    assert result["images"][2]["file_name"] == str(single)
    drawn = [image["drawn"] for image in result["images"]]
    assert sorted(drawn) == sorted(f for f in os.listdir(out) if f.endswith(".png")) and len(set(drawn)) == 3
    for image in result["images"]:
        with Image.open(out / image["drawn"]) as png:
            assert png.size == (image["width"] * 8, image["height"] * 8)  # 64 px images drawn 8x
    detections = result["annotations"]
    assert detections, "an untrained detector at score 0 still gives detections"
    category_ids = {c["id"] for c in result["categories"]}
    for d in detections:
        assert d["image_id"] in {1, 2, 3} and d["category_id"] in category_ids and 0 <= d["score"] <= 1
        x, y, w, h = d["bbox"]
        assert w >= 0 and h >= 0 and d["area"] == pytest.approx(w * h, abs=1e-2) and d["iscrowd"] == 0
    assert [d["id"] for d in detections] == list(range(1, len(detections) + 1))
    # the annotations are a COCO results list: pycocotools loads them against the val ground truth
    gt = load_coco(str(data / "annotations" / "instances_val.json"))
    val_ids = {image["file_name"]: image["id"] for image in gt.dataset["images"]}
    by_name = {os.path.basename(image["file_name"]): image["id"] for image in result["images"][:2]}
    remap = {by_name[name]: val_ids[name] for name in by_name}
    results = [{**d, "image_id": remap[d["image_id"]]} for d in detections if d["image_id"] in remap]
    assert len(gt.loadRes(results).anns) == len(results)

    # a higher threshold keeps only the detections above it; an --out with a prediction is refused
    assert main([*argv.split(), "--score-threshold", "0.99"]) == 2
    assert "--overwrite" in capsys.readouterr().err
    assert main([*argv.split(), "--score-threshold", "0.2", "--overwrite"]) == 0
    with open(out / "detections.json") as f:
        kept = json.load(f)["annotations"]
    assert all(d["score"] >= 0.2 for d in kept)
    assert len(kept) == sum(d["score"] >= 0.2 for d in detections)


def test_predict_with_a_checkpoint_without_class_names(trained, tmp_path, caplog):
    caplog.set_level(logging.INFO)
    data, run = trained
    ckpt = load_checkpoint(str(run / "checkpoint.pth"))
    del ckpt["categories"]  # as written before class names were kept
    old = str(tmp_path / "old.pth")
    save_atomic(ckpt, old)
    common = f"predict --checkpoint {old} {data}/val --score-threshold 0 --device cpu --no-progress"
    assert main([*common.split(), "--out", str(tmp_path / "ids")]) == 0
    assert "keeps no class names" in caplog.text and "--categories" in caplog.text
    with open(tmp_path / "ids" / "detections.json") as f:
        assert json.load(f)["categories"][:2] == [{"id": 0, "name": "0"}, {"id": 1, "name": "1"}]
    ann = data / "annotations" / "instances_train.json"
    assert main([*common.split(), "--categories", str(ann), "--out", str(tmp_path / "named")]) == 0
    # icd eval of it names the classes after the data, and says so
    assert main(f"eval --data-path {data} --checkpoint {old} --workers 0 --device cpu --no-progress "
                f"--output-dir {tmp_path / 'eval'}".split()) == 0  # fmt: skip
    assert "keeps no class names; the per-category table names the classes after the data" in caplog.text
    with open(tmp_path / "eval" / "per_class_ap_val.json") as f:
        assert json.load(f)[0]["name"] == "circle"
    with open(tmp_path / "named" / "detections.json") as f:
        assert json.load(f)["categories"][0] == {"id": 1, "name": "circle"}


def test_predict_bad_inputs_are_one_line_errors(trained, tmp_path, capsys):
    data, run = trained
    base = f"predict --checkpoint {run}/checkpoint.pth --device cpu --no-progress --out {tmp_path / 'o'}"
    assert main([*base.split(), str(tmp_path / "missing.png")]) == 2
    assert "IMAGES" in capsys.readouterr().err and not (tmp_path / "o").exists()
    (tmp_path / "empty").mkdir()
    assert main([*base.split(), str(tmp_path / "empty")]) == 2
    assert "without image files" in capsys.readouterr().err
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"not a png")
    assert main([*base.split(), str(broken)]) == 2
    assert "broken.png" in capsys.readouterr().err
    good = data / "val" / sorted(os.listdir(data / "val"))[0]
    assert main([*base.split(), "--on-bad-data", "skip", str(broken), str(good)]) == 0
    with open(tmp_path / "o" / "detections.json") as f:
        assert [image["file_name"] for image in json.load(f)["images"]] == [str(good)]


def test_predict_out_writes_only_its_own_files(trained, tmp_path, capsys):
    """--out: other files stay; a file of the user's (or an input image) is never written over, with or
    without --overwrite; --overwrite replaces an earlier prediction, its PNGs included."""
    data, run = trained
    val = sorted(os.listdir(data / "val"))
    base = f"predict --checkpoint {run}/checkpoint.pth --score-threshold 0 --device cpu --no-progress"
    out = tmp_path / "out"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    two = [str(data / "val" / name) for name in val[:2]]
    assert main([*base.split(), *two, "--out", str(out)]) == 0  # beside another file: only new files
    capsys.readouterr()
    first = sorted(os.listdir(out))
    assert first == sorted(["notes.txt", "detections.json", *(os.path.splitext(n)[0] + ".png" for n in val[:2])])
    # --overwrite with one image: the earlier prediction's other PNG goes, the user's file stays
    assert main([*base.split(), two[1], "--out", str(out), "--overwrite"]) == 0
    capsys.readouterr()
    assert sorted(os.listdir(out)) == sorted(["notes.txt", "detections.json", os.path.splitext(val[1])[0] + ".png"])
    assert (out / "notes.txt").read_text() == "mine"

    # a picture of the user's where a PNG would go: refused, with or without --overwrite
    mine = tmp_path / "mine"
    mine.mkdir()
    picture = mine / (os.path.splitext(val[0])[0] + ".png")
    picture.write_bytes(b"the user's picture")
    for extra in ([], ["--overwrite"]):
        assert main([*base.split(), two[0], "--out", str(mine), *extra]) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and f"--out {mine}: holds {picture.name}, which is no file of an earlier" in err
    assert picture.read_bytes() == b"the user's picture" and os.listdir(mine) == [picture.name]
    # a detections.json that is no prediction's (a COCO results list): never replaced
    other = tmp_path / "other"
    other.mkdir()
    (other / "detections.json").write_text("[]")
    assert main([*base.split(), two[0], "--out", str(other), "--overwrite"]) == 2
    assert "holds detections.json, which is no file of an earlier prediction" in capsys.readouterr().err
    assert (other / "detections.json").read_text() == "[]"
    # --out the folder of the images: the drawing would replace an input image
    photos = tmp_path / "photos"
    photos.mkdir()
    (photos / val[0]).write_bytes((data / "val" / val[0]).read_bytes())
    for extra in ([], ["--overwrite"]):
        assert main([*base.split(), str(photos), "--out", str(photos), *extra]) == 2
        assert "would be written over the input image" in capsys.readouterr().err
    assert (photos / val[0]).read_bytes() == (data / "val" / val[0]).read_bytes()
    assert os.listdir(photos) == [val[0]]


def test_predict_reads_16_bit_images_as_training_does(trained, tmp_path):
    """A 16-bit grey PNG is scaled by 65535 (icd.data.images), not clipped to white as PIL's RGB conversion does."""
    data, run = trained
    grey = tmp_path / "grey16.png"
    Image.fromarray(np.full((64, 64), 30000, dtype=np.uint16)).save(grey)
    with Image.open(grey) as im:
        assert im.mode.startswith("I;16") or im.mode == "I"
    out = tmp_path / "pred"
    argv = f"predict --checkpoint {run}/checkpoint.pth {grey} --score-threshold 1 --device cpu --no-progress "
    argv += f"--out {out}"
    assert main(argv.split()) == 0
    with Image.open(out / "grey16.png") as png:
        pixels = np.asarray(png.convert("RGB"))
    assert np.all(pixels == round(30000 / 65535 * 255))  # no detection at score 1: the image alone
