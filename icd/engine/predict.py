"""``icd predict``: a trained detector run on images (files or folders), its detections written as a
COCO-format JSON and drawn on each image as a PNG.

    icd predict --checkpoint runs/icd/model_best.pth data/shapes/val --score-threshold 0.5 --out predictions

``OUT/detections.json`` is a COCO-format file: ``images`` (``id`` 1..n in the order read,
``file_name`` as given, ``width``, ``height``, ``drawn``: the PNG's name), ``categories`` (``id``,
``name``) and ``annotations``, one per detection: ``id``, ``image_id``, ``category_id``, ``bbox``
[x, y, w, h] in pixels of the original image, ``score``, ``area`` (w x h), ``iscrowd`` 0 (and the
mask as RLE ``segmentation`` for Mask R-CNN). Its ``annotations`` list is a COCO results list,
what pycocotools' ``COCO.loadRes`` takes. ``OUT/<image name>.png`` shows each image with its boxes,
class names and scores (``icd.detection.drawing``).

Class names come from the checkpoint (every checkpoint of ``icd train`` keeps its training
data's categories), or from ``--categories FILE`` (a COCO annotation JSON, e.g. the training
split's: for checkpoints written before names were kept, or to rename); without either the
classes are shown and written as their labels 0..C-1, and a warning says so.

``--out`` (see :func:`check_out_dir`): a prediction writes only files that are its own. A folder
holding an earlier prediction (its ``detections.json``) is refused unless ``--overwrite``, which
removes that prediction's files (its JSON and the PNGs it lists) once the model is loaded; other
files in the folder are left alone, and a file this prediction would write that is not an earlier
prediction's (a picture of the user's, an input image) is refused, with or without ``--overwrite``.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import logging
import os
from collections.abc import Iterator, Sequence

import torch
from PIL import Image
from tqdm import tqdm

from icd.data.coco import BadDataError, read_annotation_file
from icd.data.images import read_rgb
from icd.detection.adapters import family_of
from icd.detection.drawing import draw_detections, save_png
from icd.detection.evaluation import to_coco_detections, write_detections
from icd.engine.checkpoint import load_checkpoint
from icd.engine.distributed import resolve_device
from icd.engine.evaluator import autocast
from icd.engine.run_spec import build_loaded_detector, checkpoint_categories, checkpoint_detector_spec
from icd.errors import ConfigError, OutputDirError

log = logging.getLogger("icd.predict")

DETECTIONS_FILE = "detections.json"
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp")


@dataclasses.dataclass
class InputImage:
    """One image to predict on: its path as given, its size, and the PNG it is drawn into."""

    path: str
    width: int
    height: int
    drawn: str


def collect_images(paths: Sequence[str], on_bad_data: str = "error") -> list[InputImage]:
    """The images of ``paths`` (files, and the image files directly inside folders, sorted), with
    their sizes read from the file headers and unique PNG names (``a.jpg`` -> ``a.png``,
    ``a_2.png`` for a second ``a``). A path that does not exist, a folder without images, or a file
    PIL cannot open is an error naming it (``on_bad_data="skip"``: an unreadable file is skipped
    with a warning)."""
    files: list[str] = []
    for path in paths:
        if os.path.isdir(path):
            found = sorted(
                os.path.join(path, name)
                for name in os.listdir(path)
                if name.lower().endswith(IMAGE_EXTENSIONS) and os.path.isfile(os.path.join(path, name))
            )
            if not found:
                raise FileNotFoundError(f"IMAGES {path}: a folder without image files ({', '.join(IMAGE_EXTENSIONS)})")
            files += found
        elif os.path.isfile(path):
            files.append(path)
        else:
            raise FileNotFoundError(f"IMAGES {path}: no such file or folder")
    images, taken = [], set()
    for path in files:
        try:
            with Image.open(path) as im:
                width, height = im.size
        except Exception as err:  # PIL raises several types for files it cannot identify
            message = f"IMAGES {path}: not an image PIL can open ({err})"
            if on_bad_data == "error":
                raise BadDataError(f"{message} (pass --on-bad-data skip to leave it out)") from None
            log.warning("skipping: %s", message)
            continue
        stem = os.path.splitext(os.path.basename(path))[0]
        drawn, n = f"{stem}.png", 1
        while drawn in taken:
            n += 1
            drawn = f"{stem}_{n}.png"
        taken.add(drawn)
        images.append(InputImage(path, width, height, drawn))
    if not images:
        raise BadDataError("IMAGES: every file was skipped (--on-bad-data skip); nothing to predict on")
    return images


def class_categories(ckpt: dict, num_classes: int, categories_file: str | None) -> list[dict]:
    """[{"id", "name"}] of the model's classes in label order: from ``categories_file`` when given
    (its categories sorted by id), else the checkpoint's, else the labels themselves (a warning)."""
    if categories_file is not None:
        data = read_annotation_file(categories_file)
        categories = [{"id": c["id"], "name": c["name"]} for c in sorted(data["categories"], key=lambda c: c["id"])]
        if len(categories) != num_classes:
            raise ConfigError(
                f"--categories {categories_file}",
                f"has {len(categories)} categories; the model has {num_classes} classes",
            )
        return categories
    categories = checkpoint_categories(ckpt)
    if categories is not None:
        return categories
    log.warning(
        "the checkpoint keeps no class names (written before icd saved them): classes are shown as their "
        "labels 0..%d and written with those as category ids; --categories FILE (the training annotation "
        "JSON) names them",
        num_classes - 1,
    )
    return [{"id": i, "name": str(i)} for i in range(num_classes)]


def earlier_prediction(out_dir: str) -> list[str] | None:
    """The files of the prediction already in ``out_dir``: its detections.json and the PNGs that
    file lists (those that exist); None when there is none (no detections.json, or one that is not
    a prediction's: a COCO file without the ``drawn`` names)."""
    path = os.path.join(out_dir, DETECTIONS_FILE)
    if not os.path.isfile(path):
        return None
    try:
        with open(path, encoding="utf-8") as f:
            images = json.load(f).get("images")
        drawn = [image["drawn"] for image in images]
    except (OSError, ValueError, AttributeError, TypeError, KeyError):
        return None
    if not all(isinstance(name, str) and name == os.path.basename(name) and name.endswith(".png") for name in drawn):
        return None
    return [path] + [os.path.join(out_dir, name) for name in drawn if os.path.isfile(os.path.join(out_dir, name))]


def check_out_dir(out_dir: str, images: Sequence[InputImage], overwrite: bool) -> list[str]:
    """Whether this prediction may write into ``out_dir`` (reads only); returns the files of the
    earlier prediction that ``--overwrite`` replaces. OutputDirError, naming the folder and the
    file, when it holds an earlier prediction and ``overwrite`` is off, or when a file this one
    would write exists and is not an earlier prediction's (never written over: the user's)."""
    where = f"--out {out_dir}"
    if os.path.exists(out_dir) and not os.path.isdir(out_dir):
        raise OutputDirError(where, "is a file, not a folder")
    earlier = earlier_prediction(out_dir) or []
    if earlier and not overwrite:
        raise OutputDirError(
            where, f"holds another prediction ({DETECTIONS_FILE}); pass --overwrite to replace it, or another --out"
        )
    inputs = {os.path.realpath(image.path): image.path for image in images}
    ours = {os.path.realpath(path) for path in earlier}
    for name in (DETECTIONS_FILE, *(image.drawn for image in images)):
        path = os.path.join(out_dir, name)
        if os.path.realpath(path) in inputs:
            image = inputs[os.path.realpath(path)]
            raise OutputDirError(where, f"{name} would be written over the input image {image}; choose another --out")
        if os.path.lexists(path) and os.path.realpath(path) not in ours:
            raise OutputDirError(
                where, f"holds {name}, which is no file of an earlier prediction; icd predict does not write over "
                "it: choose another --out"
            )  # fmt: skip
    return earlier


def _prepare_out_dir(out_dir: str, earlier: list[str]) -> None:
    """Create ``out_dir`` and remove the earlier prediction's files (its JSON first: a folder never
    holds a detections.json that lists PNGs of another prediction)."""
    try:
        os.makedirs(out_dir, exist_ok=True)
        if earlier:
            log.warning("--overwrite: removing the earlier prediction's %s and %d PNGs", DETECTIONS_FILE,
                        len(earlier) - 1)  # fmt: skip
        for path in earlier:
            if os.path.lexists(path):
                os.remove(path)
    except OSError as err:
        raise OutputDirError(f"--out {out_dir}", f"cannot be written: {err.strerror or err}") from None


@contextlib.contextmanager
def _writing(path: str) -> Iterator[None]:
    """Around the write of a PNG or the JSON at ``path``: a failed write (a full disk, a file-size
    limit) is one line naming the file, with no temporary file left."""
    try:
        yield
    except OSError as err:
        try:
            os.remove(f"{path}.tmp")
        except OSError:
            pass
        raise OutputDirError(path, f"could not be written ({err.strerror or err})") from None


def _read_rgb(image: InputImage, on_bad_data: str) -> torch.Tensor | None:
    """The image as the detector's input, float [3, H, W] in [0, 1], read as training reads its
    images (every PIL mode scaled: icd.data.images); None when it is skipped."""
    try:
        return read_rgb(image.path)
    except Exception as err:  # a truncated file is found only when it is decoded; a mode icd cannot scale
        message = f"IMAGES {image.path}: cannot be read: {err}"
        if on_bad_data == "error":
            raise BadDataError(f"{message} (pass --on-bad-data skip to leave it out)") from None
        log.warning("skipping: %s", message)
        return None


def _picture(tensor: torch.Tensor) -> Image.Image:
    """float [3, H, W] in [0, 1] -> the 8-bit RGB picture the detections are drawn on."""
    pixels = tensor.mul(255.0).round_().clamp_(0, 255).to(torch.uint8).permute(1, 2, 0).contiguous()
    return Image.fromarray(pixels.numpy(), mode="RGB")


@torch.no_grad()
def predict(args: argparse.Namespace) -> str:
    """Run ``icd predict``; returns the path of the detections JSON."""
    images = collect_images(args.images, args.on_bad_data)
    earlier = check_out_dir(args.out, images, args.overwrite)  # before the model: fail now, not later
    source = f"--checkpoint {args.checkpoint}"
    ckpt = load_checkpoint(args.checkpoint, "--checkpoint")
    spec = checkpoint_detector_spec(
        ckpt,
        source,
        flags_hint="icd predict takes a checkpoint of icd train (evaluate a bare state dict with icd eval "
        "--detector ... --backbone ...)",
    )
    family = family_of(spec.detector)
    spec = family.with_overrides(spec, {"score_thresh": args.score_thresh})
    categories = class_categories(ckpt, spec.num_classes, args.categories)
    names = [c["name"] for c in categories]
    device = resolve_device(args.device)
    model = build_loaded_detector(spec, ckpt, what="used for prediction", source=source).to(device).eval()
    _prepare_out_dir(args.out, earlier)
    entries, results = [], []
    bar = tqdm(total=len(images), desc="icd predict", disable=args.no_progress, dynamic_ncols=True)
    for start in range(0, len(images), args.batch_size):
        batch = [(i, image) for i, image in enumerate(images[start : start + args.batch_size], start + 1)]
        read = [(i, image, _read_rgb(image, args.on_bad_data)) for i, image in batch]
        read = [(i, image, rgb) for i, image, rgb in read if rgb is not None]
        bar.update(len(batch))
        if not read:
            continue
        with autocast(device, args.amp):
            outputs = family.predict(model, spec, [rgb.to(device) for _, _, rgb in read])  # labels 0..C-1
        for (image_id, image, rgb), out in zip(read, outputs, strict=True):
            labels = out["labels"].tolist()
            picture = _picture(rgb)
            boxes, scores = out["boxes"].float().tolist(), out["scores"].float().tolist()
            png = os.path.join(args.out, image.drawn)
            with _writing(png):
                save_png(draw_detections(picture, boxes, labels, scores, names), png)
            entries.append({"id": image_id, "file_name": image.path, "width": picture.width,
                            "height": picture.height, "drawn": image.drawn})  # fmt: skip
            results += to_coco_detections([out], [image_id], [c["id"] for c in categories])
    bar.close()
    for n, result in enumerate(results, 1):
        result.update(id=n, area=round(result["bbox"][2] * result["bbox"][3], 3), iscrowd=0)
    path = os.path.join(args.out, DETECTIONS_FILE)
    with _writing(path):
        write_detections(path, {"images": entries, "categories": categories, "annotations": results})
    log.info("%d detections (score >= %g) on %d images: %s and %d PNGs in %s",
             len(results), args.score_thresh, len(entries), path, len(entries), args.out)  # fmt: skip
    return path
