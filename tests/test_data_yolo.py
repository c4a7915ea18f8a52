"""`icd data shapes --format yolo`: the YOLO txt layout matches the COCO files it is made from."""

from __future__ import annotations

import json
import os

import torch

from icd.cli import main
from icd.nn import ClassPrior


def test_shapes_in_the_yolo_layout_match_the_coco_annotations(tmp_path):
    args = f"data shapes --out {tmp_path} --num-train 4 --num-val 2 --image-size 64 --seed 1 --format yolo"
    assert main(args.split()) == 0
    yolo = tmp_path / "yolo"
    for split, count in (("train", 4), ("val", 2)):
        assert len(os.listdir(yolo / "images" / split)) == count
        assert len(os.listdir(yolo / "labels" / split)) == count
    coco = json.loads((tmp_path / "annotations" / "instances_train.json").read_text())
    names = [c["name"] for c in sorted(coco["categories"], key=lambda c: c["id"])]
    text = (yolo / "data.yaml").read_text()
    assert f'path: "{yolo}"' in text and 'train: "images/train"' in text and 'val: "images/val"' in text
    assert all(f'  {i}: "{n}"' in text for i, n in enumerate(names))

    image = coco["images"][0]
    anns = [a for a in coco["annotations"] if a["image_id"] == image["id"]]
    lines = (yolo / "labels" / "train" / image["file_name"].replace(".png", ".txt")).read_text().splitlines()
    assert len(lines) == len(anns) > 0
    for line, ann in zip(lines, anns, strict=True):
        label, cx, cy, w, h = line.split()
        x, y, bw, bh = ann["bbox"]
        assert int(label) == ann["category_id"] - 1
        expected = [(x + bw / 2) / 64, (y + bh / 2) / 64, bw / 64, bh / 64]
        assert [float(v) for v in (cx, cy, w, h)] == [round(v, 6) for v in expected]

    from_yolo = ClassPrior.from_yolo_labels(yolo / "labels" / "train", len(names))
    from_coco = ClassPrior.from_coco(tmp_path / "annotations" / "instances_train.json")
    for name in ("class_freq", "size_mean", "size_std"):
        torch.testing.assert_close(getattr(from_yolo, name), getattr(from_coco, name), atol=1e-5, rtol=1e-5)
