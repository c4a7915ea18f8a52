"""An image file as float RGB [3, H, W] in [0, 1], whatever its PIL mode.

- 8-bit modes (``RGB``, ``L``, ``P``, ``1``, ``CMYK``, ``YCbCr``, ...): PIL's conversion to RGB,
  divided by 255;
- 16-bit grey (``I;16``, ``I;16B``, ...; 16-bit PNGs and TIFFs) and 32-bit integer grey (``I``)
  with values in 0..65535: divided by 65535 (not clipped to 255 as PIL's own conversion does);
  ``I`` values outside 0..65535 have no known scale and are refused;
- 32-bit float grey (``F``): taken as it is when its values lie in [0, 1], else refused;
- modes with transparency (``RGBA``, ``LA``, ``PA``, ``P`` or ``RGB`` with a transparent colour):
  composited over black (each colour times its alpha), so what lies under a transparent pixel,
  which the file does not define, never shows.

Anything else raises ValueError saying what the mode and values are (the dataset names the file).
"""

from __future__ import annotations

import numpy as np
import torch
from PIL import Image
from torch import Tensor

SIXTEEN_BIT_MODES = ("I;16", "I;16L", "I;16B", "I;16N")
ALPHA_MODES = ("RGBA", "RGBa", "LA", "La", "PA")
EIGHT_BIT_MODES = ("RGB", "RGBX", "L", "P", "1", "CMYK", "YCbCr", "HSV")


def read_rgb(path: str) -> Tensor:
    """The image at ``path`` as float32 [3, H, W] in [0, 1] (see the module docstring)."""
    with Image.open(path) as image:
        return to_rgb(image)


def to_rgb(image: Image.Image) -> Tensor:
    """A PIL image as float32 [3, H, W] in [0, 1]; ValueError for a mode or range it cannot scale."""
    mode = image.mode
    if mode in SIXTEEN_BIT_MODES or mode == "I":
        values = np.asarray(image).astype(np.int64)
        low, high = (int(values.min()), int(values.max())) if values.size else (0, 0)
        if low < 0 or high > 65535:
            raise ValueError(f"mode {mode} pixels range over {low}..{high}; expected 0..65535 (16-bit grey)")
        return _grey(values.astype(np.float32) / 65535.0)
    if mode == "F":
        values = np.asarray(image, dtype=np.float32)
        if values.size and not (np.isfinite(values).all() and values.min() >= 0.0 and values.max() <= 1.0):
            raise ValueError(
                f"mode F (32-bit float) pixels range over {values.min():g}..{values.max():g}; expected "
                "finite values in [0, 1] (convert the image to 8 or 16 bits)"
            )
        return _grey(values)
    if mode in ALPHA_MODES or "transparency" in image.info:
        rgba = np.asarray(image.convert("RGBA"), dtype=np.float32) / 255.0
        return torch.from_numpy(np.ascontiguousarray(rgba[..., :3] * rgba[..., 3:])).permute(2, 0, 1)
    if mode in EIGHT_BIT_MODES:
        rgb = np.asarray(image.convert("RGB"), dtype=np.uint8)
        return torch.from_numpy(rgb.copy()).permute(2, 0, 1).float().div_(255.0)
    raise ValueError(f"PIL mode {mode!r} is not one icd reads; convert the image to RGB")


def _grey(values: np.ndarray) -> Tensor:
    """float [H, W] -> [3, H, W]."""
    return torch.from_numpy(np.ascontiguousarray(values)).unsqueeze(0).expand(3, -1, -1).contiguous()
