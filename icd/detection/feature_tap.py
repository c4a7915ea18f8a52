"""Read a torchvision detector's FPN maps and input frame through forward hooks.

The detector runs unchanged; the hook on ``model.transform`` sees the batched input (padded
tensor [N, 3, Hp, Wp], each image's resized size (h_i, w_i), the targets with boxes rescaled to
that frame) and the hook on ``model.backbone`` sees the FPN maps [N, C, H_l, W_l]. ICD and the
FPN-MSE peer read these after the detector's forward.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn


@dataclass
class TappedBatch:
    """What one detector forward saw.

    features: L maps [N, C, H_l, W_l] in the backbone's order (P_min first).
    images: the padded input [N, 3, Hp, Wp] (normalised as the detector normalises).
    image_sizes: int64 [N, 2], (h_i, w_i) after resizing, before padding.
    boxes: N tensors [n_i, 4] (x1, y1, x2, y2) in the resized frame; None in eval mode.
    labels: N int64 tensors [n_i], the detector's labels less the tap's ``label_offset`` (0..C-1
        when it is the detector's, ``DetectorSpec.label_offset``); None in eval mode.
    """

    features: list[Tensor]
    images: Tensor
    image_sizes: Tensor
    boxes: list[Tensor] | None
    labels: list[Tensor] | None

    @property
    def padded_size(self) -> tuple[int, int]:
        return int(self.images.shape[-2]), int(self.images.shape[-1])


class FeatureTap:
    """Forward hooks on ``model.transform`` and ``model.backbone``; ``.batch`` after a forward.

    ``label_offset``: subtracted from the detector's labels in ``.batch`` (1 for the two-stage
    detectors, whose label 0 is the background: ``.batch`` then has the dataset's 0..C-1).

    Use as a context manager or call ``remove()``; the hooks keep references to the last
    forward's tensors (with their graph), which ``clear()`` drops.
    """

    def __init__(self, model: nn.Module, label_offset: int = 0) -> None:
        self.label_offset = label_offset
        self._transform_out = None
        self._features = None
        self._handles = [
            model.transform.register_forward_hook(self._on_transform),
            model.backbone.register_forward_hook(self._on_backbone),
        ]

    def _on_transform(self, module, inputs, output) -> None:
        self._transform_out = output

    def _on_backbone(self, module, inputs, output) -> None:
        self._features = list(output.values()) if isinstance(output, dict) else list(output)

    @property
    def batch(self) -> TappedBatch:
        if self._transform_out is None or self._features is None:
            raise RuntimeError("FeatureTap: no forward pass of the detector was seen yet")
        image_list, targets = self._transform_out
        sizes = torch.tensor([list(s) for s in image_list.image_sizes], dtype=torch.long)
        boxes = labels = None
        if targets is not None:
            boxes = [t["boxes"] for t in targets]
            labels = [t["labels"] - self.label_offset if self.label_offset else t["labels"] for t in targets]
        return TappedBatch(self._features, image_list.tensors, sizes, boxes, labels)

    def clear(self) -> None:
        self._transform_out = None
        self._features = None

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []
        self.clear()

    def __enter__(self) -> FeatureTap:
        return self

    def __exit__(self, *exc) -> None:
        self.remove()
