"""COCO bbox evaluation of detector outputs: category mapping, perfect and empty results."""

from __future__ import annotations

import json

import torch

from icd.data.coco import load_coco
from icd.detection.evaluation import METRIC_NAMES, coco_bbox_metrics, to_coco_detections


def _gt(tmp_path):
    coco = {
        "images": [
            {"id": 5, "file_name": "a.png", "width": 200, "height": 200},
            {"id": 6, "file_name": "b.png", "width": 200, "height": 200},
        ],
        "annotations": [
            {
                "id": 1,
                "image_id": 5,
                "category_id": 40,
                "bbox": [10, 10, 20, 20],
                "area": 400,
                "iscrowd": 0,
            },
            {
                "id": 2,
                "image_id": 6,
                "category_id": 9,
                "bbox": [50, 60, 120, 100],
                "area": 12000,
                "iscrowd": 0,
            },
        ],
        "categories": [{"id": 9, "name": "x"}, {"id": 40, "name": "y"}],
    }
    path = tmp_path / "gt.json"
    path.write_text(json.dumps(coco))
    return load_coco(str(path))


def _outputs(label_offset: int, shift: float = 0.0):
    return [
        {
            "boxes": torch.tensor([[10.0 + shift, 10, 30 + shift, 30]]),
            "scores": torch.tensor([0.9]),
            "labels": torch.tensor([1 + label_offset]),
        },
        {
            "boxes": torch.tensor([[50.0, 60, 170, 160]]),
            "scores": torch.tensor([0.8]),
            "labels": torch.tensor([0 + label_offset]),
        },
    ]


def test_perfect_detections_give_100_ap_with_category_mapping(tmp_path):
    coco = _gt(tmp_path)
    for offset in (0, 1):  # Faster R-CNN's labels are shifted by one (0 = background)
        dets = to_coco_detections(_outputs(offset), [5, 6], [9, 40], label_offset=offset)
        assert [d["category_id"] for d in dets] == [40, 9]
        assert dets[0]["bbox"] == [10.0, 10.0, 20.0, 20.0]
        metrics = coco_bbox_metrics(coco, dets)
        assert set(metrics) == set(METRIC_NAMES)
        assert metrics["AP"] > 99.9 and metrics["APs"] > 99.9 and metrics["APl"] > 99.9
        assert metrics["APm"] == -1.0  # no medium ground truth


def test_wrong_or_missing_detections_lower_ap(tmp_path):
    coco = _gt(tmp_path)
    dets = to_coco_detections(_outputs(0, shift=8.0), [5, 6], [9, 40])  # small box IoU 0.43
    metrics = coco_bbox_metrics(coco, dets)
    assert 45.0 < metrics["AP"] < 55.0 and metrics["APs"] == 0.0
    assert coco_bbox_metrics(coco, []) == dict.fromkeys(METRIC_NAMES, 0.0)
