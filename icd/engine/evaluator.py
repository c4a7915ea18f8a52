"""COCO evaluation (bbox; segm for mask detectors) of a detector over a dataset, gathered across ranks."""

from __future__ import annotations

import logging
import os
from contextlib import nullcontext
from typing import Any

import torch
from torch import nn
from torch.utils.data import DataLoader
from tqdm import tqdm

from icd.data.coco import CocoDetection, collate
from icd.detection.adapters import DetectorFamily
from icd.detection.class_table import write_class_tables
from icd.detection.evaluation import (
    coco_scores,
    has_segmentations,
    per_class_rows,
    to_coco_detections,
    write_detections,
)
from icd.engine.distributed import DistInfo, all_gather_objects
from icd.engine.sampler import ResumableSampler
from icd.errors import NothingDoneError

log = logging.getLogger(__name__)

DETECTIONS_FILE = "detections_{split}.json"


def autocast(device: torch.device, enabled: bool, dtype: str | None = None):
    """Autocast to ``dtype`` ("float16" or "bfloat16"; None: float16 on CUDA, bfloat16 on CPU);
    a no-op context when disabled."""
    if not enabled:
        return nullcontext()
    from icd.engine.speed import amp_dtype

    return torch.autocast(device_type=device.type, dtype=amp_dtype(device, dtype))


def eval_loader(
    dataset: CocoDetection, info: DistInfo, batch_size: int, workers: int
) -> DataLoader:
    sampler = ResumableSampler(dataset, info.world_size, info.rank, shuffle=False)
    return DataLoader(
        dataset, batch_size=batch_size, sampler=sampler, num_workers=workers, collate_fn=collate
    )


@torch.no_grad()
def evaluate(
    model: nn.Module,
    loader: DataLoader,
    dataset: CocoDetection,
    info: DistInfo,
    label_offset: int = 0,
    amp: bool = False,
    output_dir: str | None = None,
    amp_dtype: str | None = None,
    split: str = "val",
    progress: bool = True,
    *,
    family: DetectorFamily | None = None,
    spec: Any = None,
) -> dict[str, float]:
    """AP, AP50, AP75, APs, APm, APl (%) of ``model``'s boxes on ``loader``'s images.

    ``family`` and ``spec``: the detections are the family's ``predict`` of ``model`` (built from
    ``spec``), labels 0..C-1; without them ``model(images)``'s outputs, whose labels less
    ``label_offset`` are 0..C-1.

    When the model gives masks (Mask R-CNN) also segm_AP, segm_AP50, ... of its masks, provided
    the ground truth has segmentations (otherwise a warning and bbox metrics only). Every rank
    predicts its share; rank 0 gathers them (dropping the duplicates that DistributedSampler pads
    with), runs COCOeval and writes ``detections_{split}.json`` in ``output_dir`` (one result per
    detection, with its ``segmentation`` when there are masks) and the AP of each category as
    ``per_class_ap_{split}.json`` / ``.csv`` / ``.md`` (``icd.detection.class_table``). Other ranks
    return the same metrics (broadcast through the gather).
    """
    was_training = model.training
    model.eval()
    per_image: dict[int, list[dict]] = {}
    gives_masks = False
    bar = tqdm(loader, desc=f"eval {split}", disable=not (progress and info.is_main), leave=False)
    for images, targets in bar:
        if not images:
            continue
        images = [im.to(info.device, non_blocking=True) for im in images]
        with autocast(info.device, amp, amp_dtype):
            outputs = model(images) if family is None else family.predict(model, spec, images)
        for out, target in zip(outputs, targets, strict=True):
            gives_masks = gives_masks or "masks" in out
            image_id = int(target["image_id"])
            per_image[image_id] = to_coco_detections(
                [out], [image_id], dataset.category_ids, label_offset if family is None else 0
            )
    model.train(was_training)
    merged: dict[int, list[dict]] = {}
    for rank_dets, rank_gives_masks in all_gather_objects((per_image, gives_masks), info):
        gives_masks = gives_masks or rank_gives_masks
        for image_id, dets in rank_dets.items():
            merged.setdefault(image_id, dets)
    if not merged:  # the same on every rank (gathered)
        raise NothingDoneError(
            f"evaluation of {dataset.annotation_file}: none of its {len(dataset)} images could be read "
            "(all skipped as bad data); no metrics"
        )
    metrics = {}
    if info.is_main:
        detections = [d for image_id in sorted(merged) for d in merged[image_id]]
        image_ids = sorted(merged)
        scores = {"bbox": coco_scores(dataset.coco, detections, "bbox", image_ids=image_ids)}
        if gives_masks and has_segmentations(dataset.coco, image_ids):
            scores["segm"] = coco_scores(dataset.coco, detections, "segm", image_ids=image_ids)
        elif gives_masks:
            log.warning(
                "%s: an annotation has no 'segmentation'; the masks are not evaluated (no segm_AP)",
                dataset.annotation_file,
            )
        metrics = {name: value for result in scores.values() for name, value in result.metrics.items()}
        if output_dir is not None:
            write_detections(
                os.path.join(output_dir, DETECTIONS_FILE.format(split=split)), detections
            )
            write_class_tables(output_dir, split, per_class_rows(dataset.coco, scores, image_ids))
    return all_gather_objects(metrics, info)[0]
