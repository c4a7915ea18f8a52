"""The settings of one ``icd demo``: :class:`DemoConfig` and the seconds-long ``TINY`` variant."""

from __future__ import annotations

import os
from dataclasses import dataclass, field


@dataclass
class DemoConfig:
    """Everything the demo's result depends on (a reused run must match its part of it)."""

    out_dir: str = "demo_output"
    seed: int = 0
    student_seed: int | None = None  # None: ``seed``; another value varies only the students
    image_size: int = 96
    num_train: int = 800
    num_val: int = 200
    # Less clutter than `icd data shapes` (2-8 shapes, 6 strokes, noise 12): what a detector
    # learns in a few CPU minutes from scratch is then more than noise.
    max_shapes: int = 4
    num_strokes: int = 2
    noise_std: float = 8.0
    detector: str = "fcos"
    # the teacher: a wider FPN and head (128 channels against 64) trained twice as long, at a
    # constant lr (results/README.md section 1: 9.1 AP, 1.6x the seed-0 baseline, in ~5 min)
    teacher_backbone: str = "resnet18"
    teacher_channels: int = 128
    student_backbone: str = "resnet18"
    student_channels: int = 64
    batch_size: int = 8
    lr: float = 0.02
    teacher_epochs: int = 4  # its AP at least 1.5x the baseline student's (results/README.md)
    # False: the teacher keeps its lr to the end (its --lr-steps at its last iteration): a model
    # trained from scratch for 400 iterations is far from converged, and the x0.1 decays at 2/3
    # and 8/9 cost it AP (results/README.md section 1)
    teacher_lr_decay: bool = False
    student_epochs: int = 2
    distill_warmup_iters: int | None = None
    icd_weight: float | None = None
    fpn_mse_weight: float | None = None
    # ICD's teacher side pre-trained on the finished teacher before the ICD student starts
    # (`icd pretrain`, then `icd train --icd-init`); 0 (the default, what measured best in AP,
    # results/README.md): the paper's recipe, no pre-training
    pretrain_iters: int = 0
    jobs: int = 2
    threads: int = 1
    attention_images: int = 4
    extra_train_flags: list[str] = field(default_factory=list)

    @property
    def data_dir(self) -> str:
        return os.path.join(self.out_dir, "data")

    def run_dir(self, name: str) -> str:
        return os.path.join(self.out_dir, name)

    @property
    def teacher_checkpoint(self) -> str:
        return os.path.join(self.run_dir("teacher"), "checkpoint.pth")

    def data_settings(self) -> dict:
        keys = ("seed", "image_size", "num_train", "num_val", "max_shapes", "num_strokes", "noise_std")
        return {k: getattr(self, k) for k in keys}


TINY = {  # seconds-long settings for the smoke test (`--tiny`)
    "image_size": 64,
    "num_train": 8,
    "num_val": 4,
    "teacher_backbone": "resnet18",
    "teacher_channels": 64,
    "student_channels": 32,
    "batch_size": 4,
    "teacher_epochs": 1,
    "student_epochs": 1,
    "pretrain_iters": 4,
    "attention_images": 2,
}
