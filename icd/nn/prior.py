"""Class prior of the fake instances: class frequencies and box-size statistics (docs/method.md 4.1).

Fake instances draw their class from the per-class frequency and their width and height
(fractions of the image) from a normal distribution with the class's mean and std. The
statistics come from a COCO-format annotation file, keyed by the contiguous label a
detection dataset uses: label = index of the category id in the sorted list of category
ids (never string-sorted ids). Crowd boxes are ignored.
"""

from __future__ import annotations

import contextlib
import io
import math
import os
from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor, nn

from icd.errors import ArgumentError, DataFileError

DEFAULT_SIZE_MEAN = 0.2  # box width/height mean (fraction of the image) without statistics
DEFAULT_SIZE_STD = 0.2


class ClassPrior(nn.Module):
    """Per-class frequency and box width/height mean and std, as buffers (saved in state_dict).

    Buffers, C = num_classes:
        class_freq [C]: probability of each class (sums to 1).
        size_mean [C, 2]: mean (width / image width, height / image height) of the boxes.
        size_std [C, 2]: their standard deviation (population std).

    Build it with ``ClassPrior.from_coco(path)``, ``ClassPrior.from_yolo_labels(folder, C)``,
    ``ClassPrior.from_boxes(boxes, labels, C)`` or ``ClassPrior.uniform(C)``; a prior
    restored with ``load_state_dict`` needs a module of the same C, e.g. ``uniform(C)``.
    """

    class_freq: Tensor
    size_mean: Tensor
    size_std: Tensor

    def __init__(self, class_freq: Tensor, size_mean: Tensor, size_std: Tensor) -> None:
        super().__init__()
        class_freq = torch.as_tensor(class_freq, dtype=torch.float32)
        size_mean = torch.as_tensor(size_mean, dtype=torch.float32)
        size_std = torch.as_tensor(size_std, dtype=torch.float32)
        if class_freq.dim() != 1 or class_freq.numel() == 0:
            raise ValueError(
                f"ClassPrior: `class_freq` has shape {list(class_freq.shape)}; expected [C], C >= 1"
            )
        c = class_freq.numel()
        for name, t in (("size_mean", size_mean), ("size_std", size_std)):
            if tuple(t.shape) != (c, 2):
                raise ValueError(
                    f"ClassPrior: `{name}` has shape {list(t.shape)}; expected [C, 2] = [{c}, 2]"
                )
            if not bool(torch.isfinite(t).all()) or bool((t < 0).any()):
                raise ValueError(
                    f"ClassPrior: `{name}` has negative or non-finite entries; expected >= 0"
                )
        if (
            not bool(torch.isfinite(class_freq).all())
            or bool((class_freq < 0).any())
            or class_freq.sum() <= 0
        ):
            raise ValueError(
                "ClassPrior: `class_freq` must be finite, >= 0 and sum to a positive number"
            )
        self.register_buffer("class_freq", class_freq / class_freq.sum())
        self.register_buffer("size_mean", size_mean.clone())
        self.register_buffer("size_std", size_std.clone())

    @property
    def num_classes(self) -> int:
        return self.class_freq.numel()

    @classmethod
    def uniform(cls, num_classes: int) -> ClassPrior:
        """Uniform classes; mean 0.2 and std 0.2 for every width and height."""
        if num_classes < 1:
            raise ValueError(f"ClassPrior.uniform: num_classes = {num_classes}; expected >= 1")
        return cls(
            torch.ones(num_classes),
            torch.full((num_classes, 2), DEFAULT_SIZE_MEAN),
            torch.full((num_classes, 2), DEFAULT_SIZE_STD),
        )

    @classmethod
    def from_coco(
        cls, annotations: str | os.PathLike[str] | Mapping[str, Any], num_classes: int | None = None
    ) -> ClassPrior:
        """Statistics of a COCO-format annotation file (or its loaded dict), via pycocotools.

        Args:
            annotations: path of the JSON file, or the already loaded dict.
            num_classes: if given, must equal the number of categories in the file.

        Contiguous label = index of the category id in the sorted category ids. Boxes are
        measured as fractions of their own image's width and height; crowd boxes are
        ignored. A class without boxes gets frequency 0 and the default size statistics
        (mean 0.2, std 0.2); a file without any box gives uniform frequencies.
        """
        coco = _load_coco(annotations)
        category_ids = sorted(coco.getCatIds())
        if not category_ids:
            raise ValueError("ClassPrior.from_coco: the annotation file has no categories")
        if num_classes is not None and num_classes != len(category_ids):
            raise ValueError(
                f"ClassPrior.from_coco: num_classes = {num_classes} but the annotation file has "
                f"{len(category_ids)} categories; expected them to match"
            )
        label_of = {cat_id: i for i, cat_id in enumerate(category_ids)}
        fractions: list[list[tuple[float, float]]] = [[] for _ in category_ids]
        for ann in coco.dataset.get("annotations", []):
            if ann.get("iscrowd", 0):
                continue
            image = coco.imgs.get(ann["image_id"])
            if image is None or "width" not in image or "height" not in image:
                raise ValueError(
                    f"ClassPrior.from_coco: annotation {ann.get('id')} refers to image "
                    f"{ann['image_id']}, "
                    "which has no width/height entry; expected every image to state its size"
                )
            _, _, box_w, box_h = ann["bbox"]
            fractions[label_of[ann["category_id"]]].append(
                (box_w / image["width"], box_h / image["height"])
            )
        return cls._from_fractions(fractions)

    @classmethod
    def from_boxes(
        cls,
        boxes: Tensor,
        labels: Tensor,
        num_classes: int,
        image_sizes: Tensor | None = None,
    ) -> ClassPrior:
        """Statistics of plain boxes and labels.

        Args:
            boxes: float [M, 4] (x1, y1, x2, y2), as fractions of their image when
                ``image_sizes`` is None, else in pixels.
            labels: integer [M], 0 <= label < num_classes.
            num_classes: C.
            image_sizes: optional [M, 2] (h, w) of each box's image, in pixels.

        Classes without boxes and a set without boxes are handled as in ``from_coco``.
        """
        if num_classes < 1:
            raise ValueError(f"ClassPrior.from_boxes: num_classes = {num_classes}; expected >= 1")
        boxes = torch.as_tensor(boxes, dtype=torch.float64)
        labels = torch.as_tensor(labels)
        if boxes.dim() != 2 or boxes.shape[1] != 4:
            raise ValueError(
                f"ClassPrior.from_boxes: `boxes` has shape {list(boxes.shape)}; expected [M, 4] (x1, y1, x2, y2)"
            )
        m = boxes.shape[0]
        if labels.shape != (m,) or labels.is_floating_point():
            raise ValueError(
                f"ClassPrior.from_boxes: `labels` is {labels.dtype} {list(labels.shape)}; "
                f"expected integer [M] = [{m}]"
            )
        if m and (int(labels.min()) < 0 or int(labels.max()) >= num_classes):
            raise ValueError(
                f"ClassPrior.from_boxes: `labels` has values in [{int(labels.min())}, {int(labels.max())}]; "
                f"expected 0 <= label < num_classes = {num_classes}"
            )
        sizes = boxes[:, 2:] - boxes[:, :2]  # (w, h)
        if image_sizes is not None:
            image_sizes = torch.as_tensor(image_sizes, dtype=torch.float64)
            if image_sizes.shape != (m, 2) or bool((image_sizes <= 0).any()):
                raise ValueError(
                    f"ClassPrior.from_boxes: `image_sizes` has shape {list(image_sizes.shape)}; "
                    f"expected [M, 2] = [{m}, 2] positive (h, w) of each box's image"
                )
            sizes = sizes / image_sizes.flip(-1)
        if m and (not bool(torch.isfinite(sizes).all()) or bool((sizes < 0).any())):
            raise ValueError("ClassPrior.from_boxes: `boxes` has x2 < x1, y2 < y1 or non-finite values")
        fractions: list[list[tuple[float, float]]] = [[] for _ in range(num_classes)]
        for (w, h), label in zip(sizes.tolist(), labels.tolist(), strict=True):
            fractions[label].append((w, h))
        return cls._from_fractions(fractions)

    @classmethod
    def from_yolo_labels(cls, folder: str | os.PathLike[str], num_classes: int) -> ClassPrior:
        """Statistics of a YOLO label folder: one ``.txt`` per image (searched recursively), read
        as ultralytics reads it: one line per box, ``class cx cy w h`` as fractions of the image;
        or, in a file where a line has more than 6 fields, one polygon per line, ``class x1 y1 x2
        y2 ...``, whose bounding box is the instance's box.

        Raises DataFileError naming the file and line for a line that is not UTF-8 text or not
        numbers, a class id outside 0..num_classes-1, a coordinate outside [0, 1] (ultralytics'
        1% tolerance; pixels are not fractions), a box of zero or negative width or height, or
        a file that mixes boxes and polygons.
        """
        root = os.fspath(folder)
        if not os.path.isdir(root):
            raise ArgumentError("ClassPrior.from_yolo_labels", f"`folder` = {root!r} is not a directory")
        if num_classes < 1:
            raise ArgumentError("ClassPrior.from_yolo_labels", f"num_classes = {num_classes}; expected >= 1")
        fractions: list[list[tuple[float, float]]] = [[] for _ in range(num_classes)]
        for path in sorted(_label_files(root)):
            for label, w, h in _read_yolo_file(path, num_classes):
                fractions[label].append((w, h))
        return cls._from_fractions(fractions)

    @classmethod
    def _from_fractions(cls, fractions: list[list[tuple[float, float]]]) -> ClassPrior:
        num_classes = len(fractions)
        counts = torch.tensor([len(f) for f in fractions], dtype=torch.float64)
        mean = torch.full((num_classes, 2), DEFAULT_SIZE_MEAN, dtype=torch.float64)
        std = torch.full((num_classes, 2), DEFAULT_SIZE_STD, dtype=torch.float64)
        for label, sizes in enumerate(fractions):
            if sizes:
                values = torch.tensor(sizes, dtype=torch.float64)
                mean[label] = values.mean(dim=0)
                std[label] = values.std(dim=0, unbiased=False)
        freq = counts if counts.sum() > 0 else torch.ones(num_classes, dtype=torch.float64)
        return cls(freq.float(), mean.float(), std.float())

    def extra_repr(self) -> str:
        return f"num_classes={self.num_classes}"


def _label_files(root: str) -> list[str]:
    out = []
    for directory, _, names in os.walk(root):
        out.extend(os.path.join(directory, n) for n in names if n.endswith(".txt"))
    return out


YOLO_TOLERANCE = 0.01  # ultralytics accepts coordinates up to 1.01 (and down to -0.01 for centres)


def _read_yolo_file(path: str, num_classes: int) -> list[tuple[int, float, float]]:
    """(class, w, h) of each line of one YOLO label file (see ``ClassPrior.from_yolo_labels``)."""
    with open(path, "rb") as f:
        data = f.read()
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as err:
        line_no = data[: err.start].count(b"\n") + 1
        raise DataFileError(f"{path}:{line_no}", "not UTF-8 text; expected a YOLO label file") from None
    rows = [(n, line.split()) for n, line in enumerate(text.splitlines(), start=1) if line.split()]
    polygons = any(len(fields) > 6 for _, fields in rows)
    out = []
    for line_no, fields in rows:
        where = f"{path}:{line_no}"
        try:
            values = [float(v) for v in fields]
        except ValueError:
            raise DataFileError(where, f"{' '.join(fields)!r} is not numbers; expected 'class cx cy w h'") from None
        if not all(math.isfinite(v) for v in values):
            raise DataFileError(where, f"{' '.join(fields)!r} has a non-finite value")
        label, coords = values[0], values[1:]
        if label != int(label) or not 0 <= label < num_classes:
            raise DataFileError(
                where, f"class id {fields[0]}; expected an integer 0 <= class < num_classes = {num_classes}"
            )
        if polygons:
            if len(coords) < 6 or len(coords) % 2:
                raise DataFileError(
                    where, f"{len(fields)} fields in a file of polygons; expected 'class x1 y1 x2 y2 x3 y3 ...' "
                    "(a file holds boxes or polygons, not both)",
                )  # fmt: skip
            xs, ys = coords[0::2], coords[1::2]
            box = [(min(xs) + max(xs)) / 2, (min(ys) + max(ys)) / 2, max(xs) - min(xs), max(ys) - min(ys)]
        elif len(coords) != 4:
            raise DataFileError(where, f"{len(fields)} fields; expected 'class cx cy w h' (5)")
        else:
            box = coords
        if box[2] <= 0 or box[3] <= 0:
            raise DataFileError(where, f"a box of width {box[2]:g} and height {box[3]:g}; expected both > 0")
        if max(coords) > 1 + YOLO_TOLERANCE or min(coords) < -YOLO_TOLERANCE:
            raise DataFileError(
                where, f"coordinates {' '.join(fields[1:5])}{' ...' if len(fields) > 5 else ''} outside "
                "[0, 1]; expected fractions of the image's width and height (are these pixels?)",
            )  # fmt: skip
        out.append((int(label), box[2], box[3]))
    return out


def _load_coco(annotations: str | os.PathLike[str] | Mapping[str, Any]) -> Any:
    try:
        from pycocotools.coco import COCO
    except ImportError as exc:  # pragma: no cover - depends on the installation
        raise ImportError(
            "ClassPrior.from_coco needs pycocotools: `pip install pycocotools` (or icd[detection])"
        ) from exc
    with contextlib.redirect_stdout(io.StringIO()):  # pycocotools prints progress lines
        if isinstance(annotations, Mapping):
            coco = COCO()
            coco.dataset = dict(annotations)
            coco.createIndex()
        else:
            coco = COCO(os.fspath(annotations))
    return coco
