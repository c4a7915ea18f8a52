"""COCO-format data: contiguous labels, crowd boxes, empty images, flips, bad data, shapes."""

from __future__ import annotations

import io
import json
import os

import numpy as np
import pytest
import torch
from PIL import Image

from icd.data.coco import BadDataError, CocoDetection, collate, split_paths
from icd.data.shapes import CLASSES, ShapesConfig, generate


def _write(tmp_path, annotations, extra_images=()):
    image_dir = tmp_path / "images"
    image_dir.mkdir()
    images = []
    for i, (w, h) in enumerate([(40, 30), (20, 20), (32, 16)], start=1):
        Image.fromarray(np.full((h, w, 3), 10 * i, np.uint8)).save(image_dir / f"{i}.png")
        images.append({"id": i, "file_name": f"{i}.png", "width": w, "height": h})
    for image_id, name, content in extra_images:
        (image_dir / name).write_bytes(content)
        images.append({"id": image_id, "file_name": name, "width": 8, "height": 8})
    coco = {
        "images": images,
        "annotations": annotations,
        "categories": [{"id": 17, "name": "b"}, {"id": 3, "name": "a"}],
    }
    path = tmp_path / "ann.json"
    path.write_text(json.dumps(coco))
    return str(image_dir), str(path)


def _ann(i, image_id, cat, bbox, crowd=0):
    return {
        "id": i,
        "image_id": image_id,
        "category_id": cat,
        "bbox": bbox,
        "iscrowd": crowd,
        "area": 1.0,
    }


def test_labels_crowd_and_empty_images(tmp_path):
    anns = [
        _ann(1, 1, 17, [2, 3, 10, 5]),
        _ann(2, 1, 3, [30, 20, 20, 20]),
        _ann(3, 1, 3, [0, 0, 5, 5], crowd=1),
        _ann(4, 3, 17, [1, 1, 2, 2]),
    ]
    ds = CocoDetection(*_write(tmp_path, anns))
    assert len(ds) == 3 and ds.num_classes == 2 and ds.category_names == ["a", "b"]
    image, target = ds[0]
    assert image.shape == (3, 30, 40) and image.dtype == torch.float32
    assert abs(float(image.max()) - 10 / 255) < 1e-6
    # category 3 -> label 0, 17 -> 1; the crowd box is left out; boxes clipped to the image
    assert target["labels"].tolist() == [1, 0]
    torch.testing.assert_close(target["boxes"], torch.tensor([[2.0, 3, 12, 8], [30, 20, 40, 30]]))
    image, target = ds[1]  # no annotations: kept, with an empty [0, 4] box tensor
    assert target["boxes"].shape == (0, 4) and target["labels"].shape == (0,)
    images, targets = collate([ds[0], None, ds[2]])
    assert len(images) == 2 and [t["image_id"] for t in targets] == [1, 3]


def test_horizontal_flip_mirrors_boxes_and_is_seeded(tmp_path):
    ds = CocoDetection(
        *_write(tmp_path, [_ann(1, 1, 17, [2, 3, 10, 5])]), train=True, flip_prob=1.0
    )
    plain = CocoDetection(ds.image_dir, ds.annotation_file)
    image, target = ds[0]
    torch.testing.assert_close(image, plain[0][0].flip(-1))
    torch.testing.assert_close(target["boxes"], torch.tensor([[28.0, 3, 38, 8]]))
    half = CocoDetection(ds.image_dir, ds.annotation_file, train=True, seed=4)
    flips = [[bool(half._flip(i)) for i in range(64)] for _ in range(2)]
    assert flips[0] == flips[1] and 10 < sum(flips[0]) < 54
    half.set_epoch(1)
    assert [half._flip(i) for i in range(64)] != flips[0]


def test_malformed_annotation_is_reported_then_skipped_or_fatal(tmp_path, caplog):
    anns = [
        _ann(1, 1, 17, [2, 3, 10, 5]),
        _ann(7, 1, 17, [2, 3, -1, 5]),
        _ann(8, 2, 99, [1, 1, 2, 2]),
        _ann(9, 2, 3, [1, "x", 2, 2]),
    ]
    paths = _write(tmp_path, anns)
    with pytest.raises(BadDataError, match="annotation id 7"):
        CocoDetection(*paths)
    ds = CocoDetection(*paths, on_bad_data="skip")
    assert ds[0][1]["labels"].tolist() == [1] and ds[1][1]["labels"].numel() == 0
    log = caplog.text
    assert "annotation id 7" in log and "annotation id 8" in log and "annotation id 9" in log


def test_corrupt_image_is_reported_with_its_file_name(tmp_path, caplog):
    paths = _write(tmp_path, [], extra_images=[(4, "broken.png", b"\x89PNG not really")])
    with pytest.raises(BadDataError, match="broken.png"):
        CocoDetection(*paths)[3]
    ds = CocoDetection(*paths, on_bad_data="skip")
    assert ds[3] is None and "broken.png" in caplog.text


def test_shapes_generator_is_seeded_and_coco_valid(tmp_path):
    a = generate(str(tmp_path / "a"), num_train=6, num_val=2, image_size=96, seed=11)
    b = generate(str(tmp_path / "b"), num_train=6, num_val=2, image_size=96, seed=11)
    assert open(a["train"]).read() == open(b["train"]).read()
    assert (
        open(tmp_path / "a/train/000003.png", "rb").read()
        == open(tmp_path / "b/train/000003.png", "rb").read()
    )
    c = generate(str(tmp_path / "c"), num_train=6, num_val=2, image_size=96, seed=12)
    assert open(a["train"]).read() != open(c["train"]).read()
    image_dir, ann = split_paths(str(tmp_path / "a"), "train")
    ds = CocoDetection(image_dir, ann)
    assert ds.num_classes == len(CLASSES) and len(ds) == 6
    assert os.path.exists(split_paths(str(tmp_path / "a"), "val")[1])
    boxes = torch.cat([ds[i][1]["boxes"] for i in range(len(ds))])
    assert len(boxes) >= 6 and bool((boxes[:, 2:] > boxes[:, :2]).all())
    assert float(boxes.max()) <= 96


def test_shapes_cover_coco_scales(tmp_path):
    ann = generate(str(tmp_path), num_train=40, num_val=1, image_size=256, seed=0)["train"]
    areas = [a["area"] for a in json.load(open(ann))["annotations"]]
    small = sum(a < 32**2 for a in areas)
    large = sum(a > 96**2 for a in areas)
    assert small > 0.15 * len(areas) and large > 0.02 * len(areas)
    labels = {a["category_id"] for a in json.load(open(ann))["annotations"]}
    assert labels == set(range(1, len(CLASSES) + 1))


def _box_of(mask) -> list[float]:
    """[x1, y1, x2, y2] around a [H, W] mask's pixels."""
    ys, xs = torch.nonzero(mask, as_tuple=True)
    return [float(xs.min()), float(ys.min()), float(xs.max() + 1), float(ys.max() + 1)]


def _segmented(i, image_id, cat, segmentation, height, width, crowd=0, bbox=None):
    """An annotation whose bbox is the box around its decoded segmentation (unless given)."""
    from pycocotools import mask as mask_utils

    if bbox is None:
        rle = segmentation
        if isinstance(segmentation, list):
            rle = mask_utils.merge(mask_utils.frPyObjects(segmentation, height, width))
        elif isinstance(segmentation["counts"], list):
            rle = mask_utils.frPyObjects(segmentation, height, width)
        x1, y1, x2, y2 = _box_of(torch.from_numpy(mask_utils.decode(rle)))
        bbox = [x1, y1, x2 - x1, y2 - y1]
    ann = _ann(i, image_id, cat, bbox, crowd)
    ann["segmentation"] = segmentation
    return ann


def _rles(height, width):
    """A compressed (str counts) and an uncompressed (run lengths) RLE of two blobs."""
    from pycocotools import mask as mask_utils

    blob = np.zeros((height, width), np.uint8)
    blob[4:9, 21:36] = 1
    blob[9:20, 30:33] = 1
    compressed = mask_utils.encode(np.asfortranarray(blob))
    compressed = {"size": [height, width], "counts": compressed["counts"].decode("ascii")}
    bar = np.zeros((height, width), np.uint8)
    bar[22:27, 3:17] = 1
    flat = bar.flatten(order="F")  # COCO runs go down columns, starting with a run of zeros
    changes = np.flatnonzero(np.diff(flat)) + 1
    runs = np.diff(np.concatenate([[0], changes, [flat.size]])).tolist()
    return compressed, {"size": [height, width], "counts": runs}, blob, bar


def test_masks_line_up_with_boxes_for_polygons_and_rle_also_flipped(tmp_path):
    compressed, uncompressed, blob, bar = _rles(30, 40)
    triangle = [[2.0, 2.0, 14.5, 3.0, 6.0, 15.5]]
    anns = [
        _segmented(1, 1, 17, triangle, 30, 40),
        _segmented(2, 1, 3, compressed, 30, 40),
        _segmented(3, 1, 3, uncompressed, 30, 40, crowd=1),  # crowd: left out
        _segmented(4, 1, 17, [[50, 5, 60, 5, 55, 9]], 30, 40, bbox=[50, 5, 10, 4]),  # off image
        _segmented(5, 1, 3, uncompressed, 30, 40),
        _segmented(6, 3, 17, [[1, 1, 30, 2, 20, 15, 3, 12], [25, 1, 31, 1, 31, 4]], 16, 32),
    ]
    paths = _write(tmp_path, anns)
    plain = CocoDetection(*paths, with_masks=True)
    flipped = CocoDetection(*paths, with_masks=True, train=True, flip_prob=1.0)
    _, target = plain[0]
    masks = target["masks"]
    assert masks.dtype == torch.uint8 and masks.shape == (3, 30, 40)
    assert target["labels"].tolist() == [1, 0, 0]  # annotations 1, 2, 5
    torch.testing.assert_close(masks[1], torch.from_numpy(blob))
    torch.testing.assert_close(masks[2], torch.from_numpy(bar))
    assert int(masks[0].sum()) > 40  # the triangle is drawn, not a box or nothing
    for ds in (plain, flipped):
        for index in (0, 2):
            _, target = ds[index]
            assert len(target["masks"]) == len(target["boxes"]) > 0
            for mask, box in zip(target["masks"], target["boxes"].tolist(), strict=True):
                assert _box_of(mask) == box
    torch.testing.assert_close(flipped[0][1]["masks"], masks.flip(-1))
    _, empty = plain[1]
    assert empty["masks"].shape == (0, 20, 20)
    assert "masks" not in CocoDetection(*paths)[0][1]  # masks only when asked for


def test_annotation_without_usable_segmentation_is_bad_data_with_masks(tmp_path, caplog):
    compressed, _, _, _ = _rles(30, 40)
    good = _segmented(1, 1, 17, compressed, 30, 40)
    missing = _ann(2, 1, 3, [1, 1, 5, 5])
    short = {**_ann(3, 1, 3, [1, 1, 5, 5]), "segmentation": [[1, 1, 6, 1]]}
    wrong_size = {**_ann(4, 2, 3, [1, 1, 5, 5]), "segmentation": compressed}  # a 30x40 RLE, 20x20 image
    crowd = _ann(5, 2, 3, [1, 1, 5, 5], crowd=1)  # never decoded: needs no segmentation
    png = io.BytesIO()
    Image.fromarray(np.zeros((6, 8, 3), np.uint8)).save(png, format="PNG")
    odd = _segmented(6, 4, 3, [[1, 1, 6, 1, 6, 7]], 8, 8)  # the JSON says 8x8, the file is 8x6
    paths = _write(tmp_path, [good, missing, short, wrong_size, crowd, odd],
                   extra_images=[(4, "odd.png", png.getvalue())])
    assert CocoDetection(*paths)[0][1]["labels"].tolist() == [1, 0, 0]  # boxes alone: all fine
    with pytest.raises(BadDataError, match=r"ann\.json: annotation id 2 .*no 'segmentation'"):
        CocoDetection(*paths, with_masks=True)
    ds = CocoDetection(*paths, with_masks=True, on_bad_data="skip")
    _, target = ds[0]
    assert target["labels"].tolist() == [1] and target["masks"].shape == (1, 30, 40)
    assert ds[1][1]["boxes"].shape == (0, 4)
    assert ds[3] is None and "odd.png" in caplog.text and "8x6" in caplog.text
    log = caplog.text
    assert "annotation id 3" in log and "not 3 or more finite (x, y) points" in log
    assert "annotation id 4" in log and "size [30, 40] is not the image's [height, width] [20, 20]" in log


def test_shapes_segmentations_are_the_visible_masks(tmp_path):
    from pycocotools import mask as mask_utils

    ann = generate(str(tmp_path), num_train=5, num_val=1, image_size=96, seed=2)["train"]
    annotations = json.load(open(ann))["annotations"]
    for a in annotations:
        rle = a["segmentation"]
        assert rle["size"] == [96, 96] and isinstance(rle["counts"], str)
        assert int(mask_utils.area(rle)) == a["area"]
        assert mask_utils.toBbox(rle).tolist() == a["bbox"]
    ds = CocoDetection(*split_paths(str(tmp_path), "train"), with_masks=True)
    masks = [m for i in range(len(ds)) for m in ds[i][1]["masks"]]
    assert len(masks) == len(annotations)
    assert [int(m.sum()) for m in masks] == [a["area"] for a in annotations]
    # later shapes occlude earlier ones: the visible masks of an image never overlap
    for i in range(len(ds)):
        assert int(ds[i][1]["masks"].sum(0).max()) <= 1


def test_dense_shapes_are_many_small_touching_objects(tmp_path):
    ann = generate(str(tmp_path), num_train=6, num_val=1, image_size=128, seed=3, scene="dense")["train"]
    coco = json.load(open(ann))
    per_image: dict[int, list] = {}
    for a in coco["annotations"]:
        per_image.setdefault(a["image_id"], []).append(a["bbox"])
    assert len(per_image) == 6 and min(len(b) for b in per_image.values()) >= 15
    sides = [max(w, h) for boxes in per_image.values() for _, _, w, h in boxes]
    assert max(sides) <= 21 and sorted(sides)[len(sides) // 2] <= 12  # a few to ~20 px, mostly small
    touching = total = 0
    for boxes in per_image.values():
        b = torch.tensor(boxes, dtype=torch.float32)
        b[:, 2:] += b[:, :2]
        lo, hi = torch.maximum(b[:, None, :2], b[None, :, :2]), torch.minimum(b[:, None, 2:], b[None, :, 2:])
        contact = ((hi - lo) >= 0).all(dim=-1) & ~torch.eye(len(b), dtype=torch.bool)  # boxes meet or overlap
        touching += int(contact.any(dim=1).sum())
        total += len(b)
    assert touching > 0.5 * total
    sparse = generate(str(tmp_path / "sparse"), num_train=6, num_val=1, image_size=128, seed=3)["train"]
    assert len(json.load(open(sparse))["annotations"]) < 0.5 * len(coco["annotations"])


def test_unknown_scene_is_refused():
    with pytest.raises(ValueError, match="scene = 'crowded'"):
        ShapesConfig.for_scene("crowded")


def test_cli_writes_a_dense_scene_dataset(tmp_path):
    from icd.cli import main

    assert main(f"data shapes --out {tmp_path} --num-train 2 --num-val 1 --image-size 96 --scene dense".split()) == 0
    annotations = json.load(open(tmp_path / "annotations" / "instances_train.json"))["annotations"]
    assert len(annotations) >= 2 * 15
