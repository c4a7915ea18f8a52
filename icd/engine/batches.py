"""The training batches as one stream over the epochs, resumable at any batch of any epoch.

Each epoch has its own DataLoader: the sampler's order and the dataset's augmentation are fixed
by (seed, epoch), and the loader draws from its own generator (seed + epoch), never from the
global torch RNG, so a resumed run reads the same batches as an unbroken one.
"""

from __future__ import annotations

import math
import time
from collections.abc import Iterator

import torch
from torch.utils.data import DataLoader
from tqdm import tqdm

from icd.data.coco import CocoDetection, collate
from icd.engine.sampler import ResumableSampler

Batch = tuple[list[torch.Tensor], list[dict]]  # images [3, H, W] each, their targets


class EpochBatches:
    """The batches of epoch ``epoch`` from batch ``position`` on, then those of the next epochs.

    ``next()`` gives the current epoch's next batch, or None once its batches are used up (the
    trainer then ends the epoch and calls ``next_epoch()``). An epoch's loader and tqdm bar open
    at its first ``next()``; ``drawn`` counts the batches drawn since then.
    """

    def __init__(
        self,
        dataset: CocoDetection,
        sampler: ResumableSampler,
        batch_size: int,
        workers: int,
        seed: int,
        pin_memory: bool = False,
        progress: bool = True,
    ) -> None:
        self.dataset, self.sampler = dataset, sampler
        self.batch_size, self.workers, self.seed = batch_size, workers, seed
        self.pin_memory, self.progress = pin_memory, progress
        self.per_epoch = math.ceil(sampler.num_samples / batch_size)  # this rank's batches per epoch
        self.epoch = self.position = self.drawn = 0
        self._bar: tqdm | None = None
        self._batches: Iterator[Batch] | None = None
        self._opened_at = 0.0

    def seek(self, epoch: int, position: int) -> None:
        """Continue with batch ``position`` (0-based) of ``epoch``."""
        self.close()
        self.epoch, self.position = epoch, position

    @property
    def used_up(self) -> bool:
        """Every batch of the current epoch has been drawn (in this run or before a resume)."""
        return self.position >= self.per_epoch

    def next(self) -> Batch | None:
        if self._batches is None:
            self._open()
        batch = next(self._batches, None)
        if batch is not None:
            self.position += 1
            self.drawn += 1
        return batch

    def next_epoch(self) -> None:
        self.close()
        self.epoch, self.position = self.epoch + 1, 0

    def seconds_per_batch(self) -> float:
        """Wall time since the epoch's loader opened, per batch drawn from it."""
        return (time.time() - self._opened_at) / max(1, self.drawn)

    def show(self, **values: str) -> None:
        """Values shown after the epoch's progress bar."""
        if self._bar is not None:
            self._bar.set_postfix(**values)

    def close(self) -> None:
        """Close the current epoch's bar and loader (the next ``next()`` reopens it at ``position``)."""
        if self._bar is not None:
            self._bar.close()
        self._bar = self._batches = None

    def _open(self) -> None:
        self.sampler.set_epoch(self.epoch, skip=self.position * self.batch_size)
        self.dataset.set_epoch(self.epoch)
        loader = DataLoader(
            self.dataset,
            batch_size=self.batch_size,
            sampler=self.sampler,
            num_workers=self.workers,
            collate_fn=collate,
            pin_memory=self.pin_memory,
            # its own generator: creating the iterator must not draw from the
            # global torch RNG, or a resumed run would diverge from an unbroken one
            generator=torch.Generator().manual_seed(self.seed + self.epoch),
        )
        self._bar = tqdm(
            loader,
            desc=f"epoch {self.epoch}",
            disable=not self.progress,
            initial=self.position,
            total=self.per_epoch,
            dynamic_ncols=True,
        )
        self._batches = iter(self._bar)
        self.drawn = 0
        self._opened_at = time.time()
