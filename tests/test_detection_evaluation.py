"""COCO bbox and segm evaluation of detector outputs: category mapping, masks as RLE, perfect and
empty results, mask areas for segm."""

from __future__ import annotations

import copy
import json

import numpy as np
import pytest
import torch
from pycocotools import mask as mask_utils

from icd.data.coco import load_coco
from icd.detection.evaluation import (
    METRIC_NAMES,
    coco_metrics,
    has_segmentations,
    metric_names,
    to_coco_detections,
)


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
        metrics = coco_metrics(coco, dets)
        assert set(metrics) == set(METRIC_NAMES)
        assert metrics["AP"] > 99.9 and metrics["APs"] > 99.9 and metrics["APl"] > 99.9
        assert metrics["APm"] == -1.0  # no medium ground truth


def test_wrong_or_missing_detections_lower_ap(tmp_path):
    coco = _gt(tmp_path)
    dets = to_coco_detections(_outputs(0, shift=8.0), [5, 6], [9, 40])  # small box IoU 0.43
    metrics = coco_metrics(coco, dets)
    assert 45.0 < metrics["AP"] < 55.0 and metrics["APs"] == 0.0
    assert coco_metrics(coco, []) == dict.fromkeys(METRIC_NAMES, 0.0)
    assert coco_metrics(coco, dets, "segm") == dict.fromkeys(metric_names("segm"), 0.0)


def _rle(mask: np.ndarray) -> dict:
    rle = mask_utils.encode(np.asfortranarray(mask.astype(np.uint8)))
    return {"size": [int(v) for v in rle["size"]], "counts": rle["counts"].decode("ascii")}


def _segm_gt(tmp_path):
    """Image 5 (60x80): a polygon and a compressed RLE; image 6 (100x100): an uncompressed RLE
    and a crowd region."""
    blob = np.zeros((60, 80), bool)
    blob[30:50, 40:75] = True
    blob[10:30, 60:66] = True
    bar = np.zeros((100, 100), bool)
    bar[20:70, 5:25] = True
    flat = bar.flatten(order="F").astype(int)
    runs = np.diff(np.concatenate([[0], np.flatnonzero(np.diff(flat)) + 1, [flat.size]])).tolist()
    segmentations = [
        (5, 9, [[5.0, 5.0, 30.0, 8.0, 12.0, 28.0]]),
        (5, 40, _rle(blob)),
        (6, 9, {"size": [100, 100], "counts": runs}),
    ]
    coco = {
        "images": [
            {"id": 5, "file_name": "a.png", "width": 80, "height": 60},
            {"id": 6, "file_name": "b.png", "width": 100, "height": 100},
        ],
        "annotations": [],
        "categories": [{"id": 9, "name": "x"}, {"id": 40, "name": "y"}],
    }
    for i, (image_id, category, segm) in enumerate(segmentations, start=1):
        image = coco["images"][image_id - 5]
        rle = segm
        if isinstance(segm, list) or isinstance(segm["counts"], list):
            rle = mask_utils.frPyObjects(segm, image["height"], image["width"])
            rle = mask_utils.merge(rle) if isinstance(rle, list) else rle
        coco["annotations"].append(
            {
                "id": i,
                "image_id": image_id,
                "category_id": category,
                "segmentation": segm,
                "bbox": mask_utils.toBbox(rle).tolist(),
                "area": float(mask_utils.area(rle)),
                "iscrowd": 0,
            }
        )
    crowd = np.zeros((100, 100), bool)
    crowd[80:95, 60:95] = True
    coco["annotations"].append(
        {"id": 4, "image_id": 6, "category_id": 40, "segmentation": _rle(crowd),
         "bbox": [60, 80, 35, 15], "area": float(crowd.sum()), "iscrowd": 1}
    )
    path = tmp_path / "segm_gt.json"
    path.write_text(json.dumps(coco))
    return load_coco(str(path))


def _outputs_from_gt(coco, image_ids, category_ids, label_offset):
    """Each image's non-crowd ground truth as detector outputs: x1y1x2y2 boxes, masks [n, 1, H, W]."""
    outputs = []
    for image_id in image_ids:
        anns = [a for a in coco.imgToAnns[image_id] if not a["iscrowd"]]
        boxes = torch.tensor([a["bbox"] for a in anns], dtype=torch.float32)
        boxes[:, 2:] += boxes[:, :2]
        masks = np.stack([coco.annToMask(a) for a in anns])
        outputs.append(
            {
                "boxes": boxes,
                "scores": torch.linspace(0.9, 0.5, len(anns)),
                "labels": torch.tensor([category_ids.index(a["category_id"]) + label_offset for a in anns]),
                # probabilities: 0.7 inside, 0.3 outside (thresholded at 0.5)
                "masks": torch.from_numpy(masks)[:, None].float() * 0.4 + 0.3,
            }
        )
    return outputs


def test_ground_truth_masks_as_detections_give_100_segm_and_bbox_ap(tmp_path):
    coco = _segm_gt(tmp_path)
    assert has_segmentations(coco)
    outputs = _outputs_from_gt(coco, [5, 6], [9, 40], label_offset=1)
    dets = to_coco_detections(outputs, [5, 6], [9, 40], label_offset=1)
    assert [d["category_id"] for d in dets] == [9, 40, 9]
    for det, ann_id in zip(dets, (1, 2, 3), strict=True):
        assert isinstance(det["segmentation"]["counts"], str)
        assert np.array_equal(mask_utils.decode(det["segmentation"]), coco.annToMask(coco.anns[ann_id]))
    before = copy.deepcopy(dets)
    json.dumps(dets)  # JSON-ready
    bbox = coco_metrics(coco, dets, "bbox")
    segm = coco_metrics(coco, dets, "segm")
    assert dets == before  # COCOeval's loadRes worked on copies
    assert set(bbox) == set(METRIC_NAMES) and set(segm) == {f"segm_{n}" for n in METRIC_NAMES}
    assert bbox["AP"] > 99.9 and segm["segm_AP"] > 99.9 and segm["segm_AP75"] > 99.9
    # masks one pixel row off: boxes still perfect, masks lose at strict IoUs
    for out in outputs:
        out["masks"] = out["masks"].roll(3, dims=-2)
    shifted = to_coco_detections(outputs, [5, 6], [9, 40], label_offset=1)
    assert coco_metrics(coco, shifted, "segm")["segm_AP"] < 90.0
    assert coco_metrics(coco, shifted, "bbox")["AP"] > 99.9


def test_segm_area_ranges_use_the_mask_area_not_the_box(tmp_path):
    coco = _segm_gt(tmp_path)
    (out,) = _outputs_from_gt(coco, [6], [9, 40], label_offset=0)
    line = torch.zeros(100, 100)
    line[torch.arange(25, 75), torch.arange(25, 75)] = 1.0  # mask area 50 (small), box 50x50
    out = {
        "boxes": torch.cat([out["boxes"], torch.tensor([[25.0, 25.0, 75.0, 75.0]])]),
        "scores": torch.tensor([0.5, 0.9]),  # the false positive ranks first
        "labels": torch.tensor([0, 0]),
        "masks": torch.cat([out["masks"], line[None, None]]),
    }
    dets = to_coco_detections([out], [6], [9, 40])
    segm = coco_metrics(coco, dets, "segm", image_ids=[6])
    bbox = coco_metrics(coco, dets, "bbox", image_ids=[6])
    # the one ground truth (1000 px) is small; the false positive's mask is small too and counts
    # against segm APs, its box (2500 px) is medium and does not count against bbox APs; either
    # way it halves the precision of AP
    assert segm["segm_AP"] == pytest.approx(50.0, abs=1.0) and segm["segm_APs"] == pytest.approx(50.0, abs=1.0)
    assert bbox["AP"] == pytest.approx(50.0, abs=1.0) and bbox["APs"] > 99.9


def test_missing_ground_truth_segmentation_is_seen(tmp_path):
    assert not has_segmentations(_gt(tmp_path))
    with pytest.raises(ValueError, match="iou_type"):
        metric_names("keypoints")
