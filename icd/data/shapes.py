"""A seeded generator of a COCO-format detection dataset of coloured shapes.

Layout written under ``out_dir``::

    train/000000.png ...            val/000000.png ...
    annotations/instances_train.json annotations/instances_val.json

Each image holds several shapes of ``CLASSES`` in colours drawn independently of the class,
at COCO's three scales (small: area < 32^2, medium: < 96^2, large: above, in pixels of the
image), placed so that later shapes occlude earlier ones. Boxes and areas are those of the
visible pixels; a shape left with less than a quarter of its pixels visible is dropped from the
image. The background is a noisy gradient with distractor strokes and blobs in the same
palette, so colour alone never gives the class: the detector has to learn shape. Each
annotation's ``segmentation`` is the instance's visible mask as COCO compressed RLE (for
Mask R-CNN and segm evaluation).
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageDraw

from icd.data.coco import encode_rle
from icd.errors import OutputDirError

CLASSES: tuple[str, ...] = ("circle", "square", "triangle", "ring", "cross", "diamond", "star")
PALETTE: tuple[tuple[int, int, int], ...] = (
    (220, 50, 47),
    (38, 139, 210),
    (133, 153, 0),
    (181, 137, 0),
    (211, 54, 130),
    (42, 161, 152),
    (240, 240, 240),
    (30, 30, 30),
)
# Side (pixels) of a shape's bounding square per COCO scale; capped at 0.9 of the image side.
_SCALE_RANGES = {"small": (12.0, 30.0), "medium": (34.0, 90.0), "large": (100.0, 200.0)}
_MIN_VISIBLE = 0.25
SCENES: tuple[str, ...] = ("sparse", "dense")
# dense scenes: side range (pixels) of a shape's bounding square, drawn log-uniformly
_DENSE_SIDES = (3.0, 20.0)


@dataclass(frozen=True)
class ShapesConfig:
    """What the generator draws; the defaults give a task a small detector finds hard."""

    image_size: int = 256
    min_shapes: int = 2
    max_shapes: int = 8
    num_strokes: int = 6
    noise_std: float = 12.0
    scene: str = "sparse"
    min_area: int = 16  # pixels: smaller (or less visible) shapes are not annotated

    @classmethod
    def for_scene(cls, scene: str, image_size: int = 256) -> ShapesConfig:
        """The configuration of ``scene`` ("sparse": the defaults; "dense": see the module
        docstring) at ``image_size``."""
        if scene not in SCENES:
            raise ValueError(f"scene = {scene!r}; expected one of {', '.join(SCENES)}")
        if scene == "sparse":
            return cls(image_size=image_size)
        return cls(image_size=image_size, min_shapes=20, max_shapes=40, num_strokes=4, noise_std=10.0,
                   scene="dense", min_area=5)  # fmt: skip


def _polygon(kind: str, cx: float, cy: float, r: float, angle: float) -> list[tuple[float, float]]:
    if kind == "triangle":
        n, radii = 3, [r]
    elif kind == "square":
        n, radii, angle = 4, [r], angle + math.pi / 4
    elif kind == "diamond":
        n, radii = 4, [r, 0.55 * r]
    elif kind == "star":
        n, radii = 10, [r, 0.45 * r]
    else:
        raise ValueError(f"no polygon for {kind!r}")
    return [
        (
            cx + radii[i % len(radii)] * math.cos(angle + 2 * math.pi * i / n),
            cy + radii[i % len(radii)] * math.sin(angle + 2 * math.pi * i / n),
        )
        for i in range(n)
    ]


def _draw_shape(
    draw: ImageDraw.ImageDraw, kind: str, cx: float, cy: float, r: float, angle: float, fill
) -> None:
    """Draw one shape of radius r (half its bounding square) centred at (cx, cy)."""
    if kind == "circle":
        draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=fill)
    elif kind == "ring":
        width = max(2, int(round(0.3 * r)))
        draw.ellipse([cx - r, cy - r, cx + r, cy + r], outline=fill, width=width)
    elif kind == "cross":
        t = max(1.5, 0.3 * r)
        draw.rectangle([cx - r, cy - t, cx + r, cy + t], fill=fill)
        draw.rectangle([cx - t, cy - r, cx + t, cy + r], fill=fill)
    else:
        draw.polygon(_polygon(kind, cx, cy, r, angle), fill=fill)


def _background(rng: np.random.Generator, size: int, cfg: ShapesConfig) -> Image.Image:
    c0, c1 = rng.uniform(40, 200, size=3), rng.uniform(40, 200, size=3)
    ramp = np.linspace(0.0, 1.0, size)[None, :, None]
    if rng.random() < 0.5:
        ramp = ramp.transpose(1, 0, 2)
    img = c0 * (1 - ramp) + c1 * ramp
    img = np.broadcast_to(img, (size, size, 3)).copy()
    if cfg.scene == "dense":
        img += _texture(rng, size)[:, :, None] * rng.uniform(0.5, 1.0, size=3)
    image = Image.fromarray(np.clip(img, 0, 255).astype(np.uint8))
    draw = ImageDraw.Draw(image)
    for _ in range(cfg.num_strokes):  # distractor strokes: lines and arcs in the shapes' palette
        colour = PALETTE[rng.integers(len(PALETTE))]
        x0, y0, x1, y1 = (float(v) for v in rng.uniform(0, size, size=4))
        if rng.random() < 0.6:
            draw.line([x0, y0, x1, y1], fill=colour, width=int(rng.integers(1, 4)))
        else:
            box = [min(x0, x1), min(y0, y1), max(x0, x1) + 1, max(y0, y1) + 1]
            draw.arc(
                box,
                float(rng.uniform(0, 360)),
                float(rng.uniform(0, 360)),
                fill=colour,
                width=int(rng.integers(1, 4)),
            )
    for _ in range(int(rng.integers(0, 3))):  # blobs: irregular filled polygons of no class
        cx, cy, r = rng.uniform(0, size), rng.uniform(0, size), rng.uniform(6, size / 6)
        pts = [
            (
                cx + r * rng.uniform(0.4, 1.0) * math.cos(a),
                cy + r * rng.uniform(0.4, 1.0) * math.sin(a),
            )
            for a in np.sort(rng.uniform(0, 2 * math.pi, size=int(rng.integers(5, 9))))
        ]
        draw.polygon(pts, fill=PALETTE[rng.integers(len(PALETTE))])
    return image


def _texture(rng: np.random.Generator, size: int) -> np.ndarray:
    """float [size, size], roughly +-40: two oriented gratings of 4-16 px period plus blotchy
    noise (coarse noise upsampled), the clutter of a textured ground under dense objects."""
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float64)
    out = np.zeros((size, size))
    for _ in range(2):
        angle, period = rng.uniform(0, math.pi), rng.uniform(4.0, 16.0)
        phase = (xx * math.cos(angle) + yy * math.sin(angle)) * 2 * math.pi / period
        out += rng.uniform(5.0, 15.0) * np.sin(phase + rng.uniform(0, 2 * math.pi))
    cells = max(2, size // 12)
    coarse = rng.normal(0.0, 15.0, size=(cells, cells))
    blotches = Image.fromarray(coarse.astype(np.float32), mode="F").resize((size, size), Image.BILINEAR)
    return out + np.asarray(blotches, dtype=np.float64)


def _clusters(rng: np.random.Generator, cfg: ShapesConfig) -> np.ndarray | None:
    """Dense scenes: [c, 3] (x, y, spread) of 2-5 clusters the shapes gather in; sparse: None
    (and no draw from ``rng``, so sparse datasets stay what their seed always gave)."""
    if cfg.scene != "dense":
        return None
    size = cfg.image_size
    count = int(rng.integers(2, 6))
    centres = rng.uniform(0.15 * size, 0.85 * size, size=(count, 2))
    spread = rng.uniform(0.06, 0.14, size=(count, 1)) * size
    return np.concatenate([centres, spread], axis=1)


def _placement(rng: np.random.Generator, cfg: ShapesConfig, clusters: np.ndarray | None) -> tuple[float, float, float]:
    """(cx, cy, side) of one shape: sparse scenes at COCO's three scales anywhere in the image;
    dense scenes small (log-uniform side) around one of ``clusters``, so neighbours touch and
    overlap."""
    size = cfg.image_size
    if clusters is not None:
        lo, hi = _DENSE_SIDES
        side = float(math.exp(rng.uniform(math.log(lo), math.log(hi))))
        cx, cy, spread = clusters[int(rng.integers(len(clusters)))]
        x, y = np.clip(rng.normal((cx, cy), spread), side / 4, size - side / 4)
        return float(x), float(y), side
    scale = ("small", "medium", "large")[int(rng.choice(3, p=(0.4, 0.4, 0.2)))]
    lo, hi = _SCALE_RANGES[scale]
    side = min(float(rng.uniform(lo, hi)), 0.9 * size)
    r = side / 2
    cx, cy = rng.uniform(r * 0.5, size - r * 0.5, size=2)
    return float(cx), float(cy), side


def render_image(rng: np.random.Generator, cfg: ShapesConfig) -> tuple[Image.Image, list[dict]]:
    """One image and its instances: ``category``, ``bbox`` [x, y, w, h], ``area``, ``segmentation``.

    ``segmentation`` is the visible mask as COCO compressed RLE ({"size": [h, w], "counts": str}).
    """
    size = cfg.image_size
    image = _background(rng, size, cfg)
    owner = np.full((size, size), -1, dtype=np.int32)  # which shape each pixel shows
    shapes = []
    clusters = _clusters(rng, cfg)
    for idx in range(int(rng.integers(cfg.min_shapes, cfg.max_shapes + 1))):
        kind_id = int(rng.integers(len(CLASSES)))
        cx, cy, side = _placement(rng, cfg, clusters)
        r = side / 2
        angle = float(rng.uniform(0, 2 * math.pi))
        colour = PALETTE[rng.integers(len(PALETTE))]
        mask_img = Image.new("L", (size, size), 0)
        _draw_shape(ImageDraw.Draw(mask_img), CLASSES[kind_id], cx, cy, r, angle, 255)
        mask = np.asarray(mask_img) > 127
        if mask.sum() < cfg.min_area:
            continue
        _draw_shape(ImageDraw.Draw(image), CLASSES[kind_id], cx, cy, r, angle, colour)
        owner[mask] = idx
        shapes.append((idx, kind_id, int(mask.sum())))
    instances = []
    for idx, kind_id, full_area in shapes:
        visible = owner == idx
        area = int(visible.sum())
        if area < _MIN_VISIBLE * full_area or area < cfg.min_area:
            continue
        ys, xs = np.nonzero(visible)
        x0, y0, x1, y1 = int(xs.min()), int(ys.min()), int(xs.max()) + 1, int(ys.max()) + 1
        instances.append(
            {
                "category": kind_id,
                "bbox": [x0, y0, x1 - x0, y1 - y0],
                "area": area,
                "segmentation": encode_rle(visible[None])[0],
            }
        )
    pixels = np.asarray(image).astype(np.float32)
    pixels += rng.normal(0.0, cfg.noise_std, size=pixels.shape)
    image = Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8))
    return image, instances


def write_split(out_dir: str, split: str, num_images: int, seed: int, cfg: ShapesConfig) -> str:
    """Write ``num_images`` PNGs in ``out_dir/split`` and their COCO JSON; returns the JSON path."""
    image_dir = os.path.join(out_dir, split)
    os.makedirs(image_dir, exist_ok=True)
    os.makedirs(os.path.join(out_dir, "annotations"), exist_ok=True)
    rng = np.random.default_rng([seed, 0 if split == "train" else 1])
    images, annotations = [], []
    for i in range(num_images):
        image, instances = render_image(rng, cfg)
        file_name = f"{i:06d}.png"
        image.save(os.path.join(image_dir, file_name))
        image_id = i + 1
        images.append(
            {
                "id": image_id,
                "file_name": file_name,
                "width": cfg.image_size,
                "height": cfg.image_size,
            }
        )
        for inst in instances:
            annotations.append(
                {
                    "id": len(annotations) + 1,
                    "image_id": image_id,
                    "category_id": inst["category"] + 1,
                    "bbox": inst["bbox"],
                    "area": inst["area"],
                    "segmentation": inst["segmentation"],
                    "iscrowd": 0,
                }
            )
    coco = {
        "info": {"description": f"icd shapes ({split}, seed {seed})"},
        "images": images,
        "annotations": annotations,
        "categories": [
            {"id": i + 1, "name": n, "supercategory": "shape"} for i, n in enumerate(CLASSES)
        ],
    }
    path = os.path.join(out_dir, "annotations", f"instances_{split}.json")
    with open(path, "w") as f:
        json.dump(coco, f)
    return path


def existing_dataset_files(out_dir: str) -> list[str]:
    """What ``generate`` would overwrite in ``out_dir``: its annotation files and non-empty split
    folders (paths relative to ``out_dir``)."""
    found = []
    for split in ("train", "val"):
        ann = os.path.join("annotations", f"instances_{split}.json")
        if os.path.exists(os.path.join(out_dir, ann)):
            found.append(ann)
        for folder in (split, os.path.join("yolo", "labels", split)):
            path = os.path.join(out_dir, folder)
            if os.path.isdir(path) and os.listdir(path):
                found.append(folder + "/")
    return found


def generate(
    out_dir: str, num_train: int = 2000, num_val: int = 500, image_size: int = 256, seed: int = 0,
    overwrite: bool = False, scene: str = "sparse",
) -> dict[str, str]:  # fmt: skip
    """Write the train and val splits; returns {split: annotation file}. A dataset already in
    ``out_dir`` is an OutputDirError unless ``overwrite`` (then its files are replaced).
    ``scene``: "sparse" (the default) or "dense" (crowded small shapes, module docstring)."""
    cfg = ShapesConfig.for_scene(scene, image_size)
    existing = existing_dataset_files(out_dir)
    if existing and not overwrite:
        raise OutputDirError(
            f"--out {out_dir}",
            f"holds a dataset ({', '.join(existing)}); pass --overwrite to replace it, or another --out",
        )
    return {
        "train": write_split(out_dir, "train", num_train, seed, cfg),
        "val": write_split(out_dir, "val", num_val, seed, cfg),
    }
