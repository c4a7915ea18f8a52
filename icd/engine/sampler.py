"""A DistributedSampler that can start an epoch part-way through (for an exact resume)."""

from __future__ import annotations

import itertools
from collections.abc import Iterator

from torch.utils.data import Dataset, DistributedSampler


class ResumableSampler(DistributedSampler):
    """torch's DistributedSampler (order fixed by seed and epoch), minus the first samples.

    Works without a process group (num_replicas=1, rank=0). ``set_epoch(epoch, skip)`` makes
    the next iteration start after ``skip`` of this rank's samples of that epoch.
    """

    def __init__(
        self,
        dataset: Dataset,
        num_replicas: int = 1,
        rank: int = 0,
        shuffle: bool = True,
        seed: int = 0,
    ) -> None:
        super().__init__(
            dataset,
            num_replicas=num_replicas,
            rank=rank,
            shuffle=shuffle,
            seed=seed,
            drop_last=False,
        )
        self.skip = 0

    def set_epoch(self, epoch: int, skip: int = 0) -> None:
        super().set_epoch(epoch)
        self.skip = skip

    def __iter__(self) -> Iterator[int]:
        return itertools.islice(super().__iter__(), self.skip, None)

    def __len__(self) -> int:
        return max(0, self.num_samples - self.skip)
