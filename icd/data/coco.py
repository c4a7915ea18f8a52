"""COCO-format detection data through pycocotools: an image folder and an annotation JSON.

Targets follow torchvision's detection models: ``boxes`` float [n, 4] (x1, y1, x2, y2, pixels of
the original image), ``labels`` int64 [n] contiguous 0..C-1 (categories sorted by id),
``image_id`` int. Crowd annotations are left out of the targets (COCOeval ignores them itself);
images without boxes are kept with ``boxes`` [0, 4]. With ``with_masks`` (Mask R-CNN) each target
also has ``masks`` uint8 [n, H, W], one per box in the same order, decoded by pycocotools from
the annotation's ``segmentation`` (polygons, compressed or uncompressed RLE).

Bad data is found before any model is built, except a corrupt image (found when it is read):

- file level, always an error: not JSON (or truncated), a top level that is not an object, no
  ``images`` / ``annotations`` / ``categories`` list, no category, a category without an integer
  ``id`` and a ``name``, no image (left);
- per image: no integer ``id``, a ``file_name`` that is missing or resolves outside the image
  folder, a ``width`` / ``height`` that is not a positive integer or (when the image is read) is
  not the image's real size;
- per annotation: no ``id``, ``category_id`` or ``bbox``; an ``id``, ``image_id`` or
  ``category_id`` that is not an integer; a bbox not four finite numbers or of negative size; an
  unknown category or image; with masks, a non-crowd annotation without a ``segmentation`` that
  decodes at its image's size (an annotation that is no object or has no ``image_id`` at all
  belongs to no image that could be left out: a file-level error).

Per-image and per-annotation problems are reported with the file, the field and the id, then
skipped (``on_bad_data="skip"``) or raised (``"error"``); the masks are decoded only once the
image's declared size is checked against the real one (a JSON field never sizes an allocation).
An annotation without ``area`` gets its bbox's (COCOeval needs one), without ``iscrowd`` 0.
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
import math
import os
import random
from collections.abc import Collection, Sequence
from typing import Any

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import Dataset

from icd.data.images import read_rgb
from icd.errors import DataFileError

log = logging.getLogger(__name__)

BAD_DATA_CHOICES = ("skip", "error")


class BadDataError(DataFileError, RuntimeError):
    """A corrupt image or a malformed annotation file, with what and where in the message."""


REQUIRED_LISTS = ("images", "annotations", "categories")


def _bbox_problem(bbox: Any) -> str | None:
    if not isinstance(bbox, (list, tuple)) or len(bbox) != 4:
        return f"bbox {bbox!r} is not [x, y, w, h]"
    if not all(isinstance(v, (int, float)) and math.isfinite(v) for v in bbox):
        return f"bbox {bbox!r} has a non-finite or non-numeric value"
    if bbox[2] < 0 or bbox[3] < 0:
        return f"bbox {bbox!r} has a negative width or height"
    return None


def _segmentation_problem(segm: Any, height: Any, width: Any) -> str | None:
    """Why pycocotools cannot decode ``segm`` into a [height, width] mask; None when it can."""
    if segm is None or (isinstance(segm, list) and not segm):
        return "no 'segmentation' (masks need one)"
    if isinstance(segm, list):  # polygons [[x1, y1, x2, y2, ...], ...]
        for poly in segm:
            # fewer than 6 numbers is no polygon (pycocotools reads exactly 4 as a box)
            if not (
                isinstance(poly, list)
                and len(poly) >= 6
                and len(poly) % 2 == 0
                and all(isinstance(v, (int, float)) and math.isfinite(v) for v in poly)
            ):
                return f"segmentation polygon {poly!r} is not 3 or more finite (x, y) points"
        if not (isinstance(height, int) and isinstance(width, int)):
            return "its image has no integer 'height' and 'width' to draw the polygons in"
        for poly in segm:  # pycocotools allocates along the outline: keep it near the image
            if not (-width <= min(poly[0::2]) and max(poly[0::2]) <= 2 * width
                    and -height <= min(poly[1::2]) and max(poly[1::2]) <= 2 * height):  # fmt: skip
                return f"segmentation polygon {_short(poly)} lies far outside the {width}x{height} image"
        return None
    if isinstance(segm, dict):  # RLE {"size": [h, w], "counts": str | bytes | [run lengths]}
        size, counts = segm.get("size"), segm.get("counts")
        if not isinstance(size, (list, tuple)) or list(size) != [height, width]:
            return f"segmentation RLE size {size!r} is not the image's [height, width] {[height, width]}"
        if isinstance(counts, list):
            if not all(isinstance(c, int) and c >= 0 for c in counts) or sum(counts) != height * width:
                return f"segmentation RLE counts do not cover the {height}x{width} image"
        elif isinstance(counts, (str, bytes)):
            runs = _compressed_rle_counts(counts)
            if runs is None or min(runs, default=0) < 0 or sum(runs) != height * width:
                return f"segmentation RLE counts {_short(counts)} do not decode to the {width}x{height} image"
        else:
            return f"segmentation RLE counts of type {type(counts).__name__} (expected str or a list)"
        return None
    return f"segmentation of type {type(segm).__name__} is neither polygons nor RLE"


def _short(value: Any, limit: int = 60) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _compressed_rle_counts(counts: str | bytes) -> list[int] | None:
    """The run lengths of COCO's compressed RLE string (None when it is malformed).

    The format (pycocotools' maskApi): each run is a little-endian sequence of 5-bit groups, one
    character each (value + 48), bit 0x20 set on all but the last, the last's bit 0x10 the sign;
    from the third run on, the value is the difference to the run two before. Checked here in
    Python because pycocotools' decoder trusts the string and writes past its buffer otherwise.
    """
    data = counts.encode("ascii", "replace") if isinstance(counts, str) else bytes(counts)
    runs: list[int] = []
    i = 0
    while i < len(data):
        value, shift, more = 0, 0, True
        while more:
            if i >= len(data):
                return None  # the string ends inside a number
            c = data[i] - 48
            if not 0 <= c < 64:
                return None
            value |= (c & 0x1F) << shift
            more = bool(c & 0x20)
            i += 1
            shift += 5
            if not more and c & 0x10:
                value |= -1 << shift
        if len(runs) > 2:
            value += runs[-2]
        runs.append(value)
    return runs


def _image_problem(image: Any, image_dir: str) -> str | None:
    """Why an ``images`` entry cannot be used; None when it can."""
    if not isinstance(image, dict):
        return f"is a {type(image).__name__}, not an object"
    if not isinstance(image.get("id"), int) or isinstance(image.get("id"), bool):
        return f"has no integer 'id' ({_short(image.get('id'))})"
    name = image.get("file_name")
    if not isinstance(name, str) or not name:
        return "has no 'file_name'"
    root = os.path.normpath(os.path.abspath(image_dir))
    path = os.path.normpath(os.path.join(root, name))
    if os.path.isabs(name) or os.path.commonpath([root, path]) != root or path == root:
        return f"file_name {name!r} resolves outside the image folder {image_dir}"
    for key in ("width", "height"):
        value = image.get(key)
        if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value <= 0):
            return f"'{key}' {_short(value)} is not a positive integer"
    return None


_ANNOTATION_FIELDS = ("id", "image_id", "category_id", "bbox")


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _annotation_fields_problem(ann: Any) -> str | None:
    """A missing or mistyped field of an ``annotations`` entry; None when all are there."""
    if not isinstance(ann, dict):
        return f"is a {type(ann).__name__}, not an object"
    for field in _ANNOTATION_FIELDS:
        if field not in ann:
            return f"has no '{field}'"
    for field in ("id", "image_id", "category_id"):
        if not _is_int(ann[field]):
            return f"'{field}' {_short(ann[field])} is not an integer"
    return None


def read_annotation_file(path: str) -> dict:
    """The JSON of a COCO annotation file with its file-level structure checked (BadDataError
    naming the file and the field otherwise); entries are checked by :class:`CocoDetection`."""
    try:
        with open(path, "rb") as f:
            data = json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise BadDataError(f"{path}: not valid JSON ({err}); is the file truncated?") from None
    if not isinstance(data, dict):
        raise BadDataError(
            f"{path}: the top level is a JSON {type(data).__name__}; expected an object with "
            f"{', '.join(map(repr, REQUIRED_LISTS))}"
        )
    for key in REQUIRED_LISTS:
        if key not in data:
            raise BadDataError(f"{path}: no {key!r} (a COCO annotation file has {', '.join(REQUIRED_LISTS)})")
        if not isinstance(data[key], list):
            raise BadDataError(f"{path}: {key!r} is a JSON {type(data[key]).__name__}; expected a list")
    if not data["categories"]:
        raise BadDataError(f"{path}: 'categories' is empty; a detector needs at least one category")
    seen = set()
    for i, cat in enumerate(data["categories"]):
        cat_id = cat.get("id") if isinstance(cat, dict) else None
        if not isinstance(cat_id, int) or isinstance(cat_id, bool) or not isinstance(cat.get("name"), str):
            raise BadDataError(f"{path}: categories[{i}] {_short(cat)} has no integer 'id' and string 'name'")
        if cat_id in seen:
            raise BadDataError(f"{path}: categories[{i}]: category id {cat_id} appears twice")
        seen.add(cat_id)
    if not data["images"]:
        raise BadDataError(f"{path}: 'images' is empty; nothing to train or evaluate on")
    return data


def empty_categories(data: dict) -> list[dict]:
    """The categories of a (file-level checked) annotation dict that no annotation uses."""
    # a malformed category_id (a list, a dict) uses nothing here: the annotation checks name it
    used = {ann.get("category_id") for ann in data["annotations"]
            if isinstance(ann, dict) and isinstance(ann.get("category_id"), int)}  # fmt: skip
    return [cat for cat in data["categories"] if cat["id"] not in used]


def empty_categories_message(data: dict, path: str) -> str | None:
    """What to tell about the categories of ``path`` without any annotation (None: there are none).

    A Roboflow export has one: category 0, named after the dataset and the supercategory of every
    other category, which no annotation uses; it becomes a class the detector never sees."""
    empty = empty_categories(data)
    if not empty:
        return None
    others = [cat for cat in data["categories"] if cat not in empty]
    described = []
    for cat in empty:
        parent = bool(others) and all(c.get("supercategory") == cat["name"] for c in others)
        note = " (the supercategory of every other category: an export's dataset-level category)" if parent else ""
        described.append(f"{cat['id']} {cat['name']!r}{note}")
    return (
        f"{path}: {len(empty)} of {len(data['categories'])} categories have no annotation: {'; '.join(described)}. "
        "Each stays a class of the detector that it never sees; --drop-empty-categories leaves them out"
    )


def report_categories(dataset: CocoDetection) -> None:
    """Log what a training split's categories need said: those --drop-empty-categories left out, or a
    warning about categories without any annotation (``empty_categories_message``)."""
    if dataset.dropped_categories:
        names = ", ".join(f"{c['id']} {c['name']!r}" for c in dataset.dropped_categories)
        log.info("%s: left out the categories without annotations: %s", dataset.annotation_file, names)
        return
    message = empty_categories_message(dataset.coco.dataset, dataset.annotation_file)
    if message is not None:
        log.warning("%s", message)


def coco_index(data: dict):
    """pycocotools.coco.COCO over an already loaded (and checked) annotation dict."""
    from pycocotools.coco import COCO

    coco = COCO()
    coco.dataset = data
    with contextlib.redirect_stdout(io.StringIO()):
        coco.createIndex()
    return coco


class CocoDetection(Dataset):
    """Images and targets of one COCO-format split.

    Args:
        image_dir: folder the annotation's ``file_name``s are relative to.
        annotation_file: COCO JSON (instances_*.json).
        train: horizontal flip with probability ``flip_prob`` when True.
        on_bad_data: "skip" (report and leave out) or "error" (raise BadDataError).
        seed: the flip of sample i in epoch e depends only on (seed, e, i), so the data order
            and augmentation are reproducible across worker counts, processes and resumes.
        with_masks: give each target ``masks`` uint8 [n, H, W] (decoded when a sample is read;
            non-crowd annotations without a usable ``segmentation`` are bad data).
        drop_empty_categories: leave out the categories that no annotation of the file uses (a
            Roboflow export's dataset-level category 0); the classes are the others.
        categories: the category ids that are the classes (the training split's, or those a
            checkpoint was trained on); the file's other categories must be unused (left out),
            and each of these must be in the file. None: every category of the file.
    """

    def __init__(
        self,
        image_dir: str,
        annotation_file: str,
        train: bool = False,
        flip_prob: float = 0.5,
        on_bad_data: str = "error",
        seed: int = 0,
        with_masks: bool = False,
        drop_empty_categories: bool = False,
        categories: Collection[int] | None = None,
    ) -> None:
        if on_bad_data not in BAD_DATA_CHOICES:
            raise ValueError(f"on_bad_data={on_bad_data!r}; expected one of {BAD_DATA_CHOICES}")
        self.image_dir = image_dir
        self.annotation_file = annotation_file
        self.train = train
        self.flip_prob = flip_prob
        self.on_bad_data = on_bad_data
        self.seed = seed
        self.with_masks = with_masks
        self.epoch = 0
        data = read_annotation_file(annotation_file)
        self.dropped_categories: list[dict] = []  # left out by drop_empty_categories or categories
        if drop_empty_categories or categories is not None:
            data["categories"] = self._kept_categories(data, drop_empty_categories, categories)
        data["images"] = self._checked_images(data["images"])
        data["annotations"] = self._checked_annotations(data)
        self.coco = coco_index(data)
        self.category_ids: list[int] = sorted(self.coco.getCatIds())
        self.category_names: list[str] = [self.coco.cats[c]["name"] for c in self.category_ids]
        self.label_of_category = {c: i for i, c in enumerate(self.category_ids)}
        self.image_ids: list[int] = sorted(self.coco.imgs.keys())
        self._annotations: dict[int, list[dict]] = {i: [] for i in self.image_ids}
        for ann in data["annotations"]:
            self._annotations[ann["image_id"]].append(ann)

    @property
    def num_classes(self) -> int:
        return len(self.category_ids)

    @property
    def categories(self) -> list[dict]:
        """[{"id", "name"}] of each class in label order (what checkpoints keep as class names)."""
        return [{"id": c, "name": n} for c, n in zip(self.category_ids, self.category_names, strict=True)]

    @property
    def num_annotations(self) -> int:
        """Annotations kept (crowd ones included)."""
        return sum(len(anns) for anns in self._annotations.values())

    @property
    def most_instances(self) -> int:
        """The largest number of non-crowd annotations of one image (0 for no annotations): an
        upper bound of the boxes one image gives (boxes empty after clipping are dropped later)."""
        return max((sum(not a.get("iscrowd", 0) for a in anns) for anns in self._annotations.values()), default=0)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def _bad(self, message: str) -> None:
        if self.on_bad_data == "error":
            raise BadDataError(f"{message} (pass --on-bad-data skip to leave it out)")
        log.warning("skipping: %s", message)

    def _kept_categories(self, data: dict, drop_empty: bool, keep: Collection[int] | None) -> list[dict]:
        path, empty = self.annotation_file, {cat["id"] for cat in empty_categories(data)}
        by_id = {cat["id"]: cat for cat in data["categories"]}
        if keep is not None:
            missing = sorted(set(keep) - set(by_id))
            if missing:
                raise BadDataError(f"{path}: no category with id {missing} (the classes are {sorted(keep)})")
            used = sorted(c for c in by_id if c not in keep and c not in empty)
            if used:
                raise BadDataError(
                    f"{path}: categories {used} have annotations but are not among the classes {sorted(keep)} "
                    "(the training split's or the checkpoint's)"
                )
        kept = [cat for cat in data["categories"] if (keep is None or cat["id"] in keep)
                and not (drop_empty and cat["id"] in empty)]  # fmt: skip
        if not kept:
            raise BadDataError(f"{path}: no category has an annotation; nothing is left to detect")
        self.dropped_categories = [cat for cat in data["categories"] if cat not in kept]
        return kept

    def _checked_images(self, images: list) -> list[dict]:
        kept, seen = [], set()
        for i, image in enumerate(images):
            problem = _image_problem(image, self.image_dir)
            if problem is None and image["id"] in seen:
                problem = f"image id {image['id']} appears twice"
            if problem is not None:
                image_id = image.get("id") if isinstance(image, dict) else None
                self._bad(f"{self.annotation_file}: images[{i}] (image id {image_id}) {problem}")
                continue
            seen.add(image["id"])
            kept.append(image)
        if not kept:
            raise BadDataError(f"{self.annotation_file}: no usable image is left (every entry was skipped)")
        return kept

    def _checked_annotations(self, data: dict) -> list[dict]:
        images = {image["id"]: image for image in data["images"]}
        categories = {cat["id"] for cat in data["categories"]}
        kept, seen, no_area = [], set(), 0
        for i, ann in enumerate(data["annotations"]):
            if not isinstance(ann, dict) or "image_id" not in ann:
                # no image to leave out with it: the file is malformed, whatever --on-bad-data says
                what = "is not an object" if not isinstance(ann, dict) else "has no 'image_id'"
                raise BadDataError(f"{self.annotation_file}: annotations[{i}] {what}; the file is malformed")
            problem = _annotation_fields_problem(ann)
            if problem is not None:
                ann_id = ann.get("id") if isinstance(ann, dict) else None
                self._bad(f"{self.annotation_file}: annotations[{i}] (annotation id {ann_id}) {problem}")
                continue
            where = f"{self.annotation_file}: annotation id {ann['id']} (image id {ann['image_id']})"
            problem = _bbox_problem(ann["bbox"])
            if problem is None and ann["id"] in seen:
                problem = "its id appears twice"
            if problem is None and ann["category_id"] not in categories:
                problem = f"category_id {ann['category_id']!r} is not in 'categories'"
            if problem is None and ann["image_id"] not in images:
                problem = "image_id is not in 'images' (or its image entry was skipped)"
            if problem is None and self.with_masks and not ann.get("iscrowd", 0):
                image = images[ann["image_id"]]
                problem = _segmentation_problem(ann.get("segmentation"), image.get("height"), image.get("width"))
            if problem is not None:
                self._bad(f"{where}: {problem}")
                continue
            seen.add(ann["id"])
            ann.setdefault("iscrowd", 0)
            if "area" not in ann:
                ann["area"] = float(ann["bbox"][2] * ann["bbox"][3])
                no_area += 1
            kept.append(ann)
        if no_area:
            log.info("%s: %d annotations have no 'area'; using their bbox's (w x h)", self.annotation_file, no_area)
        return kept

    def __len__(self) -> int:
        return len(self.image_ids)

    def image_path(self, index: int) -> str:
        return os.path.join(self.image_dir, self.coco.imgs[self.image_ids[index]]["file_name"])

    def _target(self, image_id: int, width: int, height: int) -> dict[str, Tensor]:
        boxes, labels, masks = [], [], []
        for ann in self._annotations[image_id]:
            if ann.get("iscrowd", 0):
                continue
            x, y, w, h = ann["bbox"]
            x1, y1 = min(max(x, 0.0), width), min(max(y, 0.0), height)
            x2, y2 = min(max(x + w, 0.0), width), min(max(y + h, 0.0), height)
            if x2 - x1 < 1e-3 or y2 - y1 < 1e-3:  # empty after clipping: nothing to detect
                continue
            boxes.append([x1, y1, x2, y2])
            labels.append(self.label_of_category[ann["category_id"]])
            if self.with_masks:
                masks.append(self.coco.annToMask(ann))
        target = {
            "boxes": torch.tensor(boxes, dtype=torch.float32).reshape(-1, 4),
            "labels": torch.tensor(labels, dtype=torch.int64),
            "image_id": image_id,
        }
        if self.with_masks:
            target["masks"] = (
                torch.from_numpy(np.stack(masks))
                if masks
                else torch.zeros(0, height, width, dtype=torch.uint8)
            )
        return target

    def __getitem__(self, index: int) -> tuple[Tensor, dict[str, Tensor]] | None:
        """image float [3, H, W] in [0, 1] and its target; None for a skipped corrupt image (or,
        with masks, one whose masks are not its size)."""
        image_id = self.image_ids[index]
        path = self.image_path(index)
        try:
            tensor = read_rgb(path)
        except Exception as err:  # PIL raises several types for truncated / unreadable files
            self._bad(f"image {path} (image id {image_id}) cannot be read: {err}")
            return None
        height, width = tensor.shape[1:]
        declared = self.coco.imgs[image_id]
        if (declared.get("width", width), declared.get("height", height)) != (width, height):
            # checked before any mask is decoded at the declared size
            self._bad(
                f"{self.annotation_file}: image {path} (image id {image_id}) is {width}x{height} but "
                f"its entry says {declared.get('width')}x{declared.get('height')} ('width'/'height')"
            )
            return None
        target = self._target(image_id, width, height)
        if "masks" in target and target["masks"].shape[1:] != (height, width):
            self._bad(
                f"image {path} (image id {image_id}) is {width}x{height} but its annotations' "
                f"masks are {target['masks'].shape[2]}x{target['masks'].shape[1]} (the JSON's "
                "'width'/'height' or an RLE 'size' is wrong)"
            )
            return None
        if self.train and self._flip(index):
            tensor = tensor.flip(-1)
            boxes = target["boxes"]
            target["boxes"] = torch.stack(
                [width - boxes[:, 2], boxes[:, 1], width - boxes[:, 0], boxes[:, 3]], dim=1
            )
            if "masks" in target:
                target["masks"] = target["masks"].flip(-1)
        return tensor, target

    def _flip(self, index: int) -> bool:
        return random.Random(hash((self.seed, self.epoch, index))).random() < self.flip_prob


def encode_rle(masks: np.ndarray) -> list[dict]:
    """COCO compressed RLEs ({"size": [H, W], "counts": str}, JSON-ready) of bool/uint8 masks [n, H, W]."""
    from pycocotools import mask as mask_utils

    stacked = np.asfortranarray(np.asarray(masks, dtype=np.uint8).transpose(1, 2, 0))  # pycocotools: [H, W, n]
    return [
        {"size": [int(v) for v in rle["size"]], "counts": rle["counts"].decode("ascii")}
        for rle in mask_utils.encode(stacked)
    ]


def load_coco(annotation_file: str):
    """pycocotools.coco.COCO of a JSON file (file-level structure checked), without its prints."""
    return coco_index(read_annotation_file(annotation_file))


def collate(batch: Sequence[tuple[Tensor, dict] | None]) -> tuple[list[Tensor], list[dict]]:
    """Lists of images and targets, leaving out the samples a dataset skipped (None)."""
    kept = [b for b in batch if b is not None]
    return [b[0] for b in kept], [b[1] for b in kept]


def split_paths(data_path: str, split: str) -> tuple[str, str]:
    """(image folder, annotation file) of ``split`` under a COCO-layout root.

    Accepts both ``root/{split}2017`` + ``annotations/instances_{split}2017.json`` (COCO) and
    ``root/{split}`` + ``annotations/instances_{split}.json`` (what ``icd data shapes`` writes).
    """
    for image_dir, ann in (
        (f"{split}2017", f"instances_{split}2017.json"),
        (split, f"instances_{split}.json"),
    ):
        ann_path = os.path.join(data_path, "annotations", ann)
        if os.path.exists(ann_path):
            return os.path.join(data_path, image_dir), ann_path
    raise FileNotFoundError(
        f"no annotation file for split {split!r} under {data_path}/annotations "
        f"(looked for instances_{split}2017.json and instances_{split}.json)"
    )


def dataset_paths(
    data_path: str | None,
    split: str,
    annotation_file: str | None = None,
    image_dir: str | None = None,
    flag: str = "train",
) -> tuple[str, str]:
    """(image folder, annotation file) of one split: ``annotation_file`` + ``image_dir`` when given
    (any COCO-format export: Roboflow's ``train/_annotations.coco.json`` with the images beside it,
    a ``train.json`` next to ``train/``, CVAT, Label Studio), else ``split_paths(data_path, split)``.

    ``flag`` names the command-line pair in errors (``--{flag}-ann``, ``--{flag}-images``).
    """
    ann_flag, images_flag = f"--{flag}-ann", f"--{flag}-images"
    if annotation_file is None and image_dir is None:
        if data_path is None:
            raise ValueError(f"give --data-path (a COCO-layout root) or {ann_flag} FILE and {images_flag} DIR")
        return split_paths(data_path, split)
    if annotation_file is None or image_dir is None:
        given, missing = (ann_flag, images_flag) if image_dir is None else (images_flag, ann_flag)
        raise ValueError(f"{given} needs {missing} too (the annotation file and its image folder go together)")
    if not os.path.isfile(annotation_file):
        raise FileNotFoundError(f"{ann_flag} {annotation_file}: no such file")
    if not os.path.isdir(image_dir):
        raise FileNotFoundError(f"{images_flag} {image_dir}: no such folder")
    return image_dir, annotation_file
