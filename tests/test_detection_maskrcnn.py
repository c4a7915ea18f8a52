"""Mask R-CNN: built on P2-P6 with masks, trained and evaluated (bbox + segm) end to end."""

from __future__ import annotations

import json
import logging
import os

import numpy as np
import torch
from pycocotools import mask as mask_utils
from tiny_runs import TINY, fewer_rois
from torch import nn

from icd.cli import main
from icd.data.coco import CocoDetection, split_paths
from icd.data.shapes import generate
from icd.detection.models import DetectorSpec, build_backbone, build_detector
from icd.engine.distributed import DistInfo
from icd.engine.evaluator import eval_loader, evaluate


def _spec(**kw) -> DetectorSpec:
    kw = {"num_classes": 3, "fpn_channels": 32, "norm": "gn", "min_size": (64,), "max_size": 96, **kw}
    return DetectorSpec("maskrcnn", "resnet18", **kw)


def test_maskrcnn_on_p2_p6_trains_with_a_mask_loss_and_predicts_masks():
    spec = _spec()
    assert spec.levels == [2, 3, 4, 5, 6] and spec.label_offset == 1
    maps = list(build_backbone(spec)(torch.rand(1, 3, 64, 64)).values())
    assert [tuple(m.shape) for m in maps] == [(1, 32, 64 >> lv, 64 >> lv) for lv in spec.levels]
    model = build_detector(spec)
    heads = model.roi_heads
    # RoIs pool from P2-P5 (the FPN outputs of ResNet), not the max-pooled P6
    assert heads.box_roi_pool.featmap_names == ["0", "1", "2", "3"]
    assert heads.mask_roi_pool.featmap_names == ["0", "1", "2", "3"]
    assert heads.box_roi_pool.output_size == (7, 7) and heads.mask_roi_pool.output_size == (14, 14)
    assert heads.box_predictor.cls_score.out_features == 4  # 3 classes + background
    images = [torch.rand(3, 64, 80), torch.rand(3, 72, 64)]
    mask = torch.zeros(1, 64, 80, dtype=torch.uint8)
    mask[0, 6:50, 4:40] = 1
    targets = [
        {"boxes": torch.tensor([[4.0, 6.0, 40.0, 50.0]]), "labels": torch.tensor([2]), "masks": mask},
        {"boxes": torch.zeros(0, 4), "labels": torch.zeros(0, dtype=torch.long),
         "masks": torch.zeros(0, 72, 64, dtype=torch.uint8)},
    ]
    losses = model(images, targets)
    assert {"loss_classifier", "loss_box_reg", "loss_mask", "loss_objectness"} <= set(losses)
    assert all(torch.isfinite(v) for v in losses.values()) and losses["loss_mask"] > 0
    sum(losses.values()).backward()
    assert model.roi_heads.mask_predictor.mask_fcn_logits.weight.grad.abs().sum() > 0
    model.eval()
    heads.score_thresh, heads.detections_per_img = 0.0, 10  # every image gets some (cheap) masks
    with torch.no_grad():
        outputs = model(images)
    for out, image in zip(outputs, images, strict=True):
        n = len(out["boxes"])
        assert n > 0 and out["masks"].shape == (n, 1, *image.shape[1:])
        assert 0.0 <= float(out["masks"].min()) and float(out["masks"].max()) <= 1.0


def _records(run_dir, kind):
    with open(os.path.join(run_dir, "metrics.jsonl")) as f:
        return [r for r in map(json.loads, f) if r["type"] == kind]


def test_maskrcnn_teacher_then_icd_student_report_segm_ap(tmp_path, monkeypatch):
    fewer_rois(monkeypatch)
    data = str(tmp_path / "shapes")
    generate(data, num_train=6, num_val=4, image_size=64, seed=5)
    teacher = str(tmp_path / "teacher")
    # --score-thresh 0: an untrained detector still gives detections (and masks) to evaluate
    common = f"train --data-path {data} {TINY} --detector maskrcnn --epochs 1 --batch-size 2 --score-thresh 0"
    main(f"{common} --print-freq 1 --no-eval --output-dir {teacher}".split())
    assert all(r["loss_mask"] > 0 for r in _records(teacher, "train"))
    student = str(tmp_path / "student")
    main(f"{common} --print-freq 1 --teacher {teacher}/checkpoint.pth --distill icd --icd-heads 4 "
         f"--output-dir {student}".split())
    records = _records(student, "train")
    assert len(records) == 3
    assert all(r["loss_distill"] > 0 and r["loss_mask"] > 0 for r in records)
    (record,) = _records(student, "eval")
    assert 0 <= record["AP"] <= 100 and 0 <= record["segm_AP"] <= 100
    assert {"segm_AP50", "segm_AP75", "segm_APs", "segm_APm", "segm_APl"} <= set(record)
    with open(os.path.join(student, "detections_val.json")) as f:
        detections = json.load(f)
    assert {d["image_id"] for d in detections} == {1, 2, 3, 4}
    for det in detections[:20]:
        assert det["segmentation"]["size"] == [64, 64] and isinstance(det["segmentation"]["counts"], str)
        mask_utils.decode(det["segmentation"])  # valid RLE
    evaluated = str(tmp_path / "eval")
    main(f"eval --data-path {data} --checkpoint {student}/checkpoint.pth --workers 0 --device cpu "
         f"--no-progress --output-dir {evaluated}".split())
    (again,) = _records(evaluated, "eval")
    assert again["segm_AP"] == record["segm_AP"] and again["AP"] == record["AP"]
    png = str(tmp_path / "curves.png")
    assert main(["plot", student, "--out", png]) == 0
    with open(png, "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"


class _GroundTruthMasks(nn.Module):
    """Gives each image of ``dataset`` (in order) its ground truth as Mask R-CNN outputs."""

    def __init__(self, dataset: CocoDetection) -> None:
        super().__init__()
        self.dataset, self.seen = dataset, 0

    def forward(self, images):
        outputs = []
        for _ in images:
            anns = self.dataset.coco.imgToAnns[self.dataset.image_ids[self.seen]]
            self.seen += 1
            boxes = torch.tensor([a["bbox"] for a in anns], dtype=torch.float32).reshape(-1, 4)
            boxes[:, 2:] += boxes[:, :2]
            masks = np.stack([self.dataset.coco.annToMask(a) for a in anns])
            outputs.append({
                "boxes": boxes,
                "scores": torch.full((len(anns),), 0.9),
                "labels": torch.tensor([self.dataset.label_of_category[a["category_id"]] + 1 for a in anns]),
                "masks": torch.from_numpy(masks)[:, None].float(),
            })
        return outputs


def test_evaluate_gives_segm_metrics_and_masks_in_one_json(tmp_path, caplog):
    generate(str(tmp_path), num_train=1, num_val=3, image_size=64, seed=2)
    dataset = CocoDetection(*split_paths(str(tmp_path), "val"))
    run = lambda ds, out: evaluate(_GroundTruthMasks(dataset), eval_loader(ds, DistInfo(), 2, 0), ds,
                                   DistInfo(), label_offset=1, output_dir=str(out), progress=False)
    metrics = run(dataset, tmp_path / "run")
    assert metrics["AP"] > 99.9 and metrics["segm_AP"] > 99.9 and metrics["segm_AP75"] > 99.9
    with open(tmp_path / "run" / "detections_val.json") as f:
        detections = json.load(f)
    assert len(detections) == len(dataset.coco.anns)
    assert all("bbox" in d and "segmentation" in d for d in detections)
    # ground truth without segmentations: box AP only, and a warning that says why
    _, ann_file = split_paths(str(tmp_path), "val")
    with open(ann_file) as f:
        coco = json.load(f)
    for a in coco["annotations"]:
        del a["segmentation"]
    with open(ann_file, "w") as f:
        json.dump(coco, f)
    boxes_only = CocoDetection(*split_paths(str(tmp_path), "val"))
    with caplog.at_level(logging.WARNING):
        metrics = run(boxes_only, tmp_path / "boxes")
    assert metrics["AP"] > 99.9 and not any(k.startswith("segm") for k in metrics)
    assert "no 'segmentation'" in caplog.text
