"""The settings of one ``icd study``: :class:`StudyConfig` and the methods it compares."""

from __future__ import annotations

import os
from dataclasses import dataclass, field

from icd.nn.methods import METHODS as DISTILL_METHODS
from icd.nn.methods import distilling_methods

# method -> the `icd train` flags it adds to the student's (TEACHER: the teacher checkpoint;
# "+inherit" after a distilling method adds --inherit-teacher, see StudyConfig.inherit_parts)
METHODS: dict[str, str] = {
    "baseline": "the student alone (no teacher)",
    "fpn-mse": "FPN feature imitation, per-channel standardised (PKD-style)",
    "icd": "ICD, the paper's recipe (teacher side trained with the student)",
    "icd-pre": "ICD from a pre-trained teacher side (icd pretrain, then --icd-init)",
    "inherit": "inheritance only: the student's neck and head start from the teacher's, no distillation loss",
}
# every other distilling method of the registry (icd.nn.methods), in its words, runs as --distill NAME
METHODS.update({m: DISTILL_METHODS[m].summary for m in distilling_methods() if m not in METHODS})
DISTILLING = tuple(m for m in METHODS if m in distilling_methods())  # the registry's, in the study's order
INHERITING = (*DISTILLING, "icd-pre")  # the methods that take a "+inherit" variant
DEFAULT_PRETRAIN_ITERS = 600  # icd-pre's teacher-side pre-training (results/README.md section 0)
# the teacher check: the teacher's val AP must be at least this times the student's (the
# demo's teacher is held to 1.5x its baseline, results/README.md; a teacher barely above its
# students gave nothing there)
TEACHER_MARGIN = 1.5


def base_method(method: str) -> str:
    """``icd+inherit`` -> ``icd``."""
    return method.removesuffix("+inherit")


def known_methods() -> list[str]:
    return [*METHODS, *(f"{m}+inherit" for m in INHERITING)]


@dataclass
class StudyConfig:
    """Everything a study's result depends on; paths as given (the runs read them from the cwd)."""

    out_dir: str = "study"
    # the shared data flags of icd train (--data-path ... --on-bad-data), as argv
    data_flags: list[str] = field(default_factory=list)
    teacher: str | None = None
    detector: str = "fcos"
    backbone: str = "resnet18"
    fpn_channels: int = 64
    min_size: int | None = None
    max_size: int | None = None
    batch_size: int = 8
    lr: float = 0.02
    methods: list[str] = field(default_factory=lambda: ["baseline", "fpn-mse", "icd"])
    seeds: list[int] = field(default_factory=lambda: [0, 1, 2])
    epochs: list[int] = field(default_factory=lambda: [2])  # one or two schedules
    weights: dict[str, float] = field(default_factory=dict)  # base method -> --distill-weight
    inherit_parts: str = "neck,head"
    pretrain_iters: int = DEFAULT_PRETRAIN_ITERS
    teacher_margin: float = TEACHER_MARGIN
    match_fraction: float = 5.75  # --calibrate match: the weighted distillation loss / the detection loss
    student_ap: float | None = None  # what the student reaches, if known: the teacher check's yardstick
    device: str = "cpu"
    jobs: int = 1
    threads: int = 1
    gpus: int = 0  # > 0: one run per GPU (CUDA_VISIBLE_DEVICES = the slot)
    train_flags: list[str] = field(default_factory=list)  # more icd train flags, after the study's
    pretrain_flags: list[str] = field(default_factory=list)  # more icd pretrain flags (icd-pre), after the study's
    label: str = "study"  # the scheduler's name for it in messages
    # a preset's names for the study's runs (icd demo: baseline_e2_s0 -> baseline, ...): each run's
    # name, in the plan, stamps and study.md; and its folder relative to out_dir when not runs/NAME
    # (icd demo's and --shapes' teacher: OUT/teacher)
    names: dict[str, str] = field(default_factory=dict)
    folders: dict[str, str] = field(default_factory=dict)

    @property
    def runs_dir(self) -> str:
        return os.path.join(self.out_dir, "runs")

    def named(self, name: str) -> str:
        """The name of the study's run ``name`` (``run_name``, ``pretrain_name``): the preset's, or itself."""
        return self.names.get(name, name)

    def run_dir(self, name: str) -> str:
        folder = self.folders.get(name)
        return os.path.join(self.out_dir, folder) if folder else os.path.join(self.runs_dir, name)

    def data_settings(self) -> dict:
        """What a run's identity holds beside its command (which has the data flags): the teacher
        file's size and modification time, so that a teacher trained again at the same path is
        not taken for the one the finished runs learned from."""
        try:
            info = os.stat(self.teacher) if self.teacher else None
        except OSError:
            info = None
        return {"teacher": None if info is None else [info.st_size, info.st_mtime_ns]}

    def slot_env(self, slot: int) -> dict[str, str]:
        """The environment of a run in job slot ``slot``: its GPU on a GPU machine."""
        return {"CUDA_VISIBLE_DEVICES": str(slot)} if self.gpus else {}

    def weight(self, method: str) -> float | None:
        """The --distill-weight of ``method`` (icd-pre takes icd's); None: icd train's default."""
        base = base_method(method)
        return self.weights.get("icd" if base == "icd-pre" else base)
