"""Detections drawn on their image: a box per detection in its class's colour, with a filled tag
"name 0.87" (class name and score) at the box's top-left corner, readable at any image size.

Images whose shorter side is under ``MIN_DRAWN_SIDE`` pixels are drawn enlarged by a whole factor
(nearest neighbour: the pixels stay the model's input), so that a 64 px image still gets legible
labels; boxes are scaled with it.
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence

from PIL import Image, ImageDraw, ImageFont

MIN_DRAWN_SIDE = 480  # pixels: smaller images are enlarged by a whole factor before drawing
# 20 colours far apart (matplotlib's tab10 then its lighter tab20 partners), one per class id modulo 20
PALETTE = (
    (31, 119, 180), (255, 127, 14), (44, 160, 44), (214, 39, 40), (148, 103, 189),
    (140, 86, 75), (227, 119, 194), (127, 127, 127), (188, 189, 34), (23, 190, 207),
    (174, 199, 232), (255, 187, 120), (152, 223, 138), (255, 152, 150), (197, 176, 213),
    (196, 156, 148), (247, 182, 210), (199, 199, 199), (219, 219, 141), (158, 218, 229),
)  # fmt: skip


def class_colour(label: int) -> tuple[int, int, int]:
    """The RGB colour of class ``label`` (0-based) in drawings."""
    return PALETTE[int(label) % len(PALETTE)]


def _text_colour(background: tuple[int, int, int]) -> tuple[int, int, int]:
    """Black on light tags, white on dark ones (relative luminance, sRGB weights)."""
    r, g, b = background
    return (0, 0, 0) if 0.2126 * r + 0.7152 * g + 0.0722 * b > 140 else (255, 255, 255)


def draw_detections(
    image: Image.Image,
    boxes: Sequence[Sequence[float]],
    labels: Sequence[int],
    scores: Sequence[float],
    class_names: Sequence[str],
) -> Image.Image:
    """A copy of ``image`` (RGB, enlarged when small, see the module docstring) with the detections.

    Args:
        image: the image the boxes are in (any PIL mode; drawn as RGB).
        boxes: [n] (x1, y1, x2, y2) in pixels of ``image``.
        labels: [n] class indices 0..C-1 (index ``class_names`` and pick the colour).
        scores: [n] detection scores in [0, 1].
        class_names: C names; a label beyond them is shown as its number.
    """
    scale = max(1, math.ceil(MIN_DRAWN_SIDE / max(1, min(image.size))))
    canvas = image.convert("RGB")
    if scale > 1:
        canvas = canvas.resize((canvas.width * scale, canvas.height * scale), Image.NEAREST)
    draw = ImageDraw.Draw(canvas)
    side = min(canvas.size)
    width = max(2, round(side / 240))
    font = ImageFont.load_default(size=max(12, round(side / 34)))
    # lowest score first: the most confident boxes and tags end up on top
    order = sorted(range(len(scores)), key=lambda i: float(scores[i]))
    for i in order:
        x1, y1, x2, y2 = (float(v) * scale for v in boxes[i])
        label = int(labels[i])
        colour = class_colour(label)
        draw.rectangle((x1, y1, x2, y2), outline=colour, width=width)
        name = class_names[label] if 0 <= label < len(class_names) else str(label)
        text = f"{name} {float(scores[i]):.2f}"
        left, top, right, bottom = draw.textbbox((0, 0), text, font=font)
        tag_w, tag_h = right - left + 2 * width, bottom - top + 2 * width
        tag_x = min(max(0.0, x1), max(0.0, canvas.width - tag_w))
        tag_y = y1 - tag_h if y1 - tag_h >= 0 else min(y1, canvas.height - tag_h)  # above the box, else inside
        draw.rectangle((tag_x, tag_y, tag_x + tag_w, tag_y + tag_h), fill=colour)
        draw.text((tag_x + width - left, tag_y + width - top), text, fill=_text_colour(colour), font=font)
    return canvas


def save_png(image: Image.Image, path: str) -> None:
    """Write ``image`` as a PNG atomically (temporary file + os.replace)."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = f"{path}.tmp"
    image.save(tmp, format="PNG")
    os.replace(tmp, path)
