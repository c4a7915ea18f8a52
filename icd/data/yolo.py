"""Export a COCO-format detection split to the YOLO txt layout (for ultralytics).

Layout written under ``out_dir`` (the images are hard links, or copies where links fail)::

    images/train/000000.png   labels/train/000000.txt   data.yaml
    images/val/000000.png     labels/val/000000.txt

Each label line is ``class cx cy w h`` with the box as fractions of the image's width and
height, ``class`` the contiguous label (index of the category id in the sorted ids). Images
without boxes get an empty label file (a background image). ``data.yaml`` names the splits
and the classes.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Mapping


def _link_or_copy(src: str, dst: str) -> None:
    if os.path.exists(dst):
        os.remove(dst)
    try:
        os.link(src, dst)
    except OSError:
        shutil.copyfile(src, dst)


def export_split(annotation_file: str, image_dir: str, out_dir: str, split: str) -> list[str]:
    """Write ``out_dir/images/split`` and ``out_dir/labels/split`` from one COCO JSON;
    returns the class names in label order."""
    with open(annotation_file, encoding="utf-8") as f:
        coco = json.load(f)
    categories = sorted(coco["categories"], key=lambda c: c["id"])
    label_of = {c["id"]: i for i, c in enumerate(categories)}
    lines: dict[int, list[str]] = {image["id"]: [] for image in coco["images"]}
    sizes = {image["id"]: (image["width"], image["height"]) for image in coco["images"]}
    for ann in coco.get("annotations", []):
        if ann.get("iscrowd", 0):
            continue
        width, height = sizes[ann["image_id"]]
        x, y, w, h = ann["bbox"]
        lines[ann["image_id"]].append(
            f"{label_of[ann['category_id']]} {(x + w / 2) / width:.6f} {(y + h / 2) / height:.6f} "
            f"{w / width:.6f} {h / height:.6f}"
        )
    images_out = os.path.join(out_dir, "images", split)
    labels_out = os.path.join(out_dir, "labels", split)
    os.makedirs(images_out, exist_ok=True)
    os.makedirs(labels_out, exist_ok=True)
    for image in coco["images"]:
        name = image["file_name"]
        _link_or_copy(os.path.join(image_dir, name), os.path.join(images_out, os.path.basename(name)))
        stem = os.path.splitext(os.path.basename(name))[0]
        with open(os.path.join(labels_out, stem + ".txt"), "w", encoding="utf-8") as f:
            f.write("".join(line + "\n" for line in lines[image["id"]]))
    return [c["name"] for c in categories]


def write_data_yaml(out_dir: str, names: list[str], splits: Mapping[str, str]) -> str:
    """``out_dir/data.yaml``: the dataset root, one ``split: images/split`` line per split, the names."""
    path = os.path.join(out_dir, "data.yaml")
    body = [f"path: {json.dumps(os.path.abspath(out_dir))}"]
    body += [f"{key}: {json.dumps(value)}" for key, value in splits.items()]
    body.append("names:")
    body += [f"  {i}: {json.dumps(name)}" for i, name in enumerate(names)]
    with open(path, "w", encoding="utf-8") as f:
        f.write("\n".join(body) + "\n")
    return path


def export_yolo(annotation_files: Mapping[str, str], image_dirs: Mapping[str, str], out_dir: str) -> str:
    """Export every split ({split: COCO JSON}, {split: image folder}) to ``out_dir``; returns
    the path of ``data.yaml``."""
    names: list[str] | None = None
    for split, annotation_file in annotation_files.items():
        split_names = export_split(annotation_file, image_dirs[split], out_dir, split)
        if names is not None and split_names != names:
            raise ValueError(f"export_yolo: split {split!r} has classes {split_names}; expected {names}")
        names = split_names
    return write_data_yaml(out_dir, names or [], {split: f"images/{split}" for split in annotation_files})
