"""``icd study --shapes``: the demo's generated shapes data and teacher, then the study's students.

The preset of results/README.md's studies (which hand-written scripts ran before): the demo's
data (:func:`icd.apps.demo.prepare_data`) in ``OUT/data`` and the demo's teacher (its
``icd train`` run, scheduled with the students and stamped as the demo's, reused when finished
with the same command) in ``OUT/teacher``; the students default to the demo's (ResNet-18, FPN 64, 96 px,
batch 8, lr 0.02, 2 epochs). ``tiny``: the demo's ``--tiny`` sizes, a smoke test of seconds.
"""

from __future__ import annotations

import os
from dataclasses import replace

from icd.apps.demo.plan import Run
from icd.apps.demo.settings import TINY, DemoConfig
from icd.apps.study.pipeline import Preset
from icd.apps.study.settings import StudyConfig

PRESETS = ("full", "tiny")


def demo_config(cfg: StudyConfig, preset: str) -> DemoConfig:
    """The demo settings whose data and teacher the study uses (``OUT/data``, ``OUT/teacher``)."""
    values = dict(TINY) if preset == "tiny" else {}
    return DemoConfig(out_dir=cfg.out_dir, jobs=cfg.jobs, threads=cfg.threads, **values)


def shapes_study(cfg: StudyConfig, preset: str, sizes_given: set[str]) -> StudyConfig:
    """``cfg`` on the demo's data and teacher; the student settings not in ``sizes_given`` (the
    flags given) become the demo's."""
    demo = demo_config(cfg, preset)
    student = {"min_size": demo.image_size, "max_size": demo.image_size, "fpn_channels": demo.student_channels,
               "batch_size": demo.batch_size, "lr": demo.lr, "backbone": demo.student_backbone,
               "detector": demo.detector, "epochs": [demo.student_epochs]}  # fmt: skip
    student = {k: v for k, v in student.items() if k not in sizes_given}
    teacher = os.path.abspath(os.path.join(demo.run_dir("teacher"), "checkpoint.pth"))
    return replace(cfg, data_flags=["--data-path", os.path.abspath(demo.data_dir)], teacher=teacher,
                   folders={**cfg.folders, "teacher": "teacher"}, **student)  # fmt: skip


def preset(cfg: StudyConfig, preset_name: str) -> Preset:
    """The study's :class:`~icd.apps.study.pipeline.Preset`: the demo's data generated (unless
    there with the same settings), and the demo's teacher run, which the study schedules."""
    from icd.apps.demo.pipeline import prepare_data
    from icd.apps.demo.plan import teacher_run

    demo = demo_config(cfg, preset_name)

    def prepare() -> tuple[int, Run]:
        print(f"[study] shapes data: {demo.num_train} + {demo.num_val} images of {demo.image_size} px in "
              f"{demo.data_dir}", flush=True)  # fmt: skip
        prepare_data(demo)
        return demo.num_train, teacher_run(demo)

    return Preset(prepare)
