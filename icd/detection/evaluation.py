"""COCO bbox evaluation (pycocotools COCOeval) of torchvision detector outputs."""

from __future__ import annotations

import contextlib
import io
import json
import os

import numpy as np
from torch import Tensor

METRIC_NAMES = ("AP", "AP50", "AP75", "APs", "APm", "APl")


def to_coco_detections(
    outputs: list[dict[str, Tensor]],
    image_ids: list[int],
    category_ids: list[int],
    label_offset: int = 0,
) -> list[dict]:
    """Detector outputs (boxes x1y1x2y2 in original pixels, scores, labels) as COCO results.

    ``category_ids[label - label_offset]`` maps a model label back to the dataset's category id.
    """
    results = []
    for out, image_id in zip(outputs, image_ids, strict=True):
        boxes = out["boxes"].detach().float().cpu()
        xywh = boxes.clone()
        xywh[:, 2:] -= xywh[:, :2]
        for box, score, label in zip(
            xywh.tolist(), out["scores"].tolist(), out["labels"].tolist(), strict=True
        ):
            index = int(label) - label_offset
            if not 0 <= index < len(category_ids):
                continue  # torchvision never gives these; a foreign model might
            results.append(
                {
                    "image_id": int(image_id),
                    "category_id": int(category_ids[index]),
                    "bbox": [round(v, 3) for v in box],
                    "score": round(float(score), 5),
                }
            )
    return results


def coco_bbox_metrics(
    coco_gt, detections: list[dict], image_ids: list[int] | None = None, verbose: bool = False
) -> dict[str, float]:
    """AP, AP50, AP75, APs, APm, APl (as percentages) of ``detections`` against ``coco_gt``.

    With no detections at all every AP is 0 (COCOeval cannot load an empty result list).
    """
    if not detections:
        return dict.fromkeys(METRIC_NAMES, 0.0)
    from pycocotools.cocoeval import COCOeval

    sink = io.StringIO()
    with contextlib.redirect_stdout(sink):
        coco_dt = coco_gt.loadRes(detections)
        evaluator = COCOeval(coco_gt, coco_dt, "bbox")
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
    return {
        name: (float(v) * 100.0 if v >= 0 else -1.0)
        for name, v in zip(METRIC_NAMES, stats, strict=True)
    }


def write_detections(path: str, detections: list[dict]) -> None:
    """Write COCO results JSON atomically (temporary file + os.replace)."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(detections, f)
    os.replace(tmp, path)
