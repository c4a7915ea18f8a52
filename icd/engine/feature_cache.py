"""The frozen teacher's FPN maps of each image, computed once and reused.

A frozen teacher gives the same maps for the same input every time, so a run that shows it the
same images again and again (``icd pretrain``'s epochs, and its attention evaluations on the val
split) needs its forward pass only once per distinct input.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable

import torch

from icd.detection.adapters import InputFrame


class TeacherFeatureCache:
    """The frozen teacher's FPN maps per input image, up to a memory budget.

    Keyed by the input's content (after any flip) and its resized size, so a flipped image is
    its own entry and an image seen at two sizes has two. Only batches without padding are
    cached: there an image's maps do not depend on the other images of its batch, but for the
    rounding of another batch size (a padded batch's maps are recomputed every time). Entries
    are added until ``budget_bytes`` is reached; a budget of 0 turns the cache off.
    """

    def __init__(self, budget_bytes: int) -> None:
        self.budget_bytes = budget_bytes
        self.bytes = 0
        self.entries: dict[tuple, list[torch.Tensor]] = {}

    @staticmethod
    def key(image: torch.Tensor, size: tuple[int, int]) -> tuple:
        digest = hashlib.blake2b(image.detach().cpu().contiguous().numpy().tobytes(), digest_size=16)
        return digest.hexdigest(), tuple(size)

    def features(
        self, compute: Callable[[torch.Tensor], list[torch.Tensor]], images: list[torch.Tensor], frame: InputFrame
    ) -> list[torch.Tensor]:
        """L maps [N, C, H_l, W_l] of the batch, from the cache when every image is in it.

        Args:
            compute: the frozen teacher's maps of a batch in its input frame [N, 3, Hp, Wp] (its
                family's ``features``).
            images: the N input images [3, H_i, W_i] before the teacher's transform.
            frame: their input frame (the family's ``frame``: resized, normalised, batched).

        A batch with any image not cached runs whole: convolution rounds differently at
        another batch size (a batch of 1 differs from the same image in a batch of 8 by
        ~1e-5), so forwarding only the new images would make the maps, and a resumed run,
        depend on what happened to be cached.
        """
        padded = frame.padded_size
        sizes = [tuple(s) for s in frame.image_sizes.tolist()]
        if self.budget_bytes <= 0 or any(s != padded for s in sizes):
            return compute(frame.images)
        keys = [self.key(im, s) for im, s in zip(images, sizes, strict=True)]
        cached = [self.entries.get(k) for k in keys]
        if all(c is not None for c in cached):
            return [torch.stack(level) for level in zip(*cached, strict=True)]
        maps = compute(frame.images)
        for i, k in enumerate(keys):
            entry = [m[i].clone() for m in maps]  # a row, not a view keeping the whole batch alive
            size = sum(t.numel() * t.element_size() for t in entry)
            if k not in self.entries and self.bytes + size <= self.budget_bytes:
                self.entries[k] = entry
                self.bytes += size
        return maps
