"""COCO evaluation (pycocotools COCOeval, bbox and segm) of torchvision detector outputs: the
summary metrics and, from the same COCOeval run, the AP of each category."""

from __future__ import annotations

import contextlib
import io
import json
import os
from dataclasses import dataclass, field

import numpy as np
from torch import Tensor

from icd.data.coco import encode_rle

METRIC_NAMES = ("AP", "AP50", "AP75", "APs", "APm", "APl")
IOU_TYPES = ("bbox", "segm")
MASK_THRESHOLD = 0.5  # a pixel belongs to the instance when its mask probability exceeds this
# What COCOeval needs of a result besides image_id, category_id and score.
_RESULT_FIELD = {"bbox": "bbox", "segm": "segmentation"}


def metric_names(iou_type: str) -> tuple[str, ...]:
    """Metric keys: AP, AP50, ... for boxes (what the curves and the demo read); segm_AP, ... for masks."""
    if iou_type not in IOU_TYPES:
        raise ValueError(f"iou_type={iou_type!r}; expected one of {IOU_TYPES}")
    return METRIC_NAMES if iou_type == "bbox" else tuple(f"segm_{name}" for name in METRIC_NAMES)


def encode_masks(masks: Tensor) -> list[dict]:
    """COCO compressed RLEs ({"size": [H, W], "counts": str}) of probabilities [n, 1, H, W]."""
    return encode_rle((masks.detach()[:, 0] > MASK_THRESHOLD).cpu().numpy())


def to_coco_detections(
    outputs: list[dict[str, Tensor]],
    image_ids: list[int],
    category_ids: list[int],
    label_offset: int = 0,
) -> list[dict]:
    """Detector outputs (boxes x1y1x2y2 in original pixels, scores, labels) as COCO results.

    ``category_ids[label - label_offset]`` maps a model label back to the dataset's category id.
    An output with ``masks`` [n, 1, H, W] (probabilities, Mask R-CNN) also gives each result a
    ``segmentation``: the mask thresholded at 0.5, as compressed RLE with str counts.
    """
    results = []
    for out, image_id in zip(outputs, image_ids, strict=True):
        boxes = out["boxes"].detach().float().cpu()
        xywh = boxes.clone()
        xywh[:, 2:] -= xywh[:, :2]
        segmentations = encode_masks(out["masks"]) if "masks" in out else [None] * len(xywh)
        for box, score, label, segmentation in zip(
            xywh.tolist(), out["scores"].tolist(), out["labels"].tolist(), segmentations, strict=True
        ):
            index = int(label) - label_offset
            if not 0 <= index < len(category_ids):
                continue  # torchvision never gives these; a foreign model might
            result = {
                "image_id": int(image_id),
                "category_id": int(category_ids[index]),
                "bbox": [round(v, 3) for v in box],
                "score": round(float(score), 5),
            }
            if segmentation is not None:
                result["segmentation"] = segmentation
            results.append(result)
    return results


# per category: AP over IoU 0.50:0.95, AP at IoU 0.5 and 0.75 (area all, at most 100 detections per image)
PER_CLASS_NAMES = ("AP", "AP50", "AP75")


@dataclass
class CocoScores:
    """What one COCOeval run gives: ``metrics`` (``metric_names(iou_type)``, %, -1 for an area range
    without ground truth) and ``per_class``: category id -> {"AP", "AP50", "AP75"} (%; None for a
    category without ground truth in the evaluated images), in the order of the category ids."""

    metrics: dict[str, float]
    per_class: dict[int, dict[str, float | None]] = field(default_factory=dict)


def coco_metrics(
    coco_gt,
    detections: list[dict],
    iou_type: str = "bbox",
    image_ids: list[int] | None = None,
    verbose: bool = False,
) -> dict[str, float]:
    """AP, AP50, AP75, APs, APm, APl (as percentages) of ``detections`` against ``coco_gt``
    (``coco_scores(...).metrics``)."""
    return coco_scores(coco_gt, detections, iou_type, image_ids, verbose).metrics


def coco_scores(
    coco_gt,
    detections: list[dict],
    iou_type: str = "bbox",
    image_ids: list[int] | None = None,
    verbose: bool = False,
) -> CocoScores:
    """AP, AP50, AP75, APs, APm, APl (as percentages) of ``detections`` against ``coco_gt``, and the
    AP, AP50 and AP75 of each category, from one COCOeval run.

    ``iou_type`` "bbox" matches the results' boxes, "segm" their ``segmentation`` masks (results
    without one are left out; the ground truth needs segmentations); see ``metric_names`` for
    the keys. Each result is evaluated through a copy holding only the fields of ``iou_type``:
    COCOeval's loadRes fills in fields in place, and given a bbox it would take the box's area,
    not the mask's, for the area ranges of segm. With no detections every AP is 0 (COCOeval
    cannot load an empty result list; a category with ground truth then has AP 0, one without None).
    """
    names = metric_names(iou_type)
    result_field = _RESULT_FIELD[iou_type]
    results = [
        {k: d[k] for k in ("image_id", "category_id", "score", result_field)} for d in detections if result_field in d
    ]
    if not results:
        with_truth = set(_ground_truth_counts(coco_gt, image_ids))
        per_class = {
            c: dict.fromkeys(PER_CLASS_NAMES, 0.0 if c in with_truth else None) for c in sorted(coco_gt.getCatIds())
        }
        return CocoScores(dict.fromkeys(names, 0.0), per_class)
    from pycocotools.cocoeval import COCOeval

    sink = io.StringIO()
    with contextlib.redirect_stdout(sink):
        coco_dt = coco_gt.loadRes(results)
        evaluator = COCOeval(coco_gt, coco_dt, iou_type)
        if image_ids is not None:
            evaluator.params.imgIds = sorted(set(image_ids))
        evaluator.evaluate()
        evaluator.accumulate()
        evaluator.summarize()
    if verbose:
        print(
            "\n".join(
                ln for ln in sink.getvalue().splitlines() if ln.lstrip().startswith("Average")
            )
        )
    stats = np.asarray(evaluator.stats[:6], dtype=float)
    # COCOeval gives -1 for an area range without ground truth; keep it visible as -1.
    metrics = {name: (float(v) * 100.0 if v >= 0 else -1.0) for name, v in zip(names, stats, strict=True)}
    return CocoScores(metrics, _per_class(evaluator))


def _per_class(evaluator) -> dict[int, dict[str, float | None]]:
    """Each category's AP, AP50, AP75 (%) from an accumulated COCOeval, as its summarize() reads the
    overall ones: precision [IoU, recall, category, area, max dets] at area "all" and the largest
    max-dets setting, averaged over the entries that are not -1 (None when all are: no ground truth)."""
    params = evaluator.params
    precision = evaluator.eval["precision"][:, :, :, params.areaRngLbl.index("all"), -1]
    iou_rows = {"AP": slice(None), "AP50": _iou_index(params, 0.5), "AP75": _iou_index(params, 0.75)}
    out = {}
    for k, category in enumerate(params.catIds):
        values = {}
        for name, rows in iou_rows.items():
            p = precision[rows, :, k]
            p = p[p > -1]
            values[name] = float(p.mean()) * 100.0 if p.size else None
        out[int(category)] = values
    return out


def _iou_index(params, iou: float) -> int:
    return int(np.flatnonzero(np.isclose(params.iouThrs, iou))[0])


def _ground_truth_counts(coco_gt, image_ids: list[int] | None = None) -> dict[int, int]:
    """Non-crowd ground-truth boxes per category id (of ``image_ids``; categories without any left out)."""
    ann_ids = coco_gt.getAnnIds(imgIds=image_ids) if image_ids is not None else coco_gt.getAnnIds()
    counts: dict[int, int] = {}
    for a in ann_ids:
        ann = coco_gt.anns[a]
        if not ann.get("iscrowd", 0):
            counts[ann["category_id"]] = counts.get(ann["category_id"], 0) + 1
    return counts


def per_class_rows(
    coco_gt, scores: dict[str, CocoScores], image_ids: list[int] | None = None
) -> list[dict]:
    """One row per category of ``coco_gt`` (id order): ``category_id``, ``name``, ``instances`` (its
    non-crowd ground-truth boxes in ``image_ids``) and the per-class values of each CocoScores of
    ``scores`` (iou type -> scores): AP, AP50, AP75 for "bbox", segm_AP, ... for "segm"."""
    counts = _ground_truth_counts(coco_gt, image_ids)
    rows = []
    for category in sorted(coco_gt.getCatIds()):
        row = {
            "category_id": int(category),
            "name": coco_gt.cats[category]["name"],
            "instances": counts.get(category, 0),
        }
        for iou_type, result in scores.items():
            prefix = "" if iou_type == "bbox" else f"{iou_type}_"
            values = result.per_class.get(int(category), dict.fromkeys(PER_CLASS_NAMES))
            row.update({f"{prefix}{name}": values[name] for name in PER_CLASS_NAMES})
        rows.append(row)
    return rows


def has_segmentations(coco_gt, image_ids: list[int] | None = None) -> bool:
    """Whether every ground-truth annotation (of ``image_ids``) has a ``segmentation`` (segm eval)."""
    ann_ids = coco_gt.getAnnIds(imgIds=image_ids) if image_ids is not None else coco_gt.getAnnIds()
    return all(coco_gt.anns[a].get("segmentation") for a in ann_ids)


def write_detections(path: str, detections: list[dict] | dict) -> None:
    """Write COCO results JSON (a results list, or a whole COCO-format dict) atomically (temporary
    file + os.replace)."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(detections, f)
    os.replace(tmp, path)
