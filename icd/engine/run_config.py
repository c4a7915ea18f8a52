"""Typed run configs: what the training loop, its data, its hooks, ``icd train``'s model,
optimisers, speed settings and distillation, and ``icd pretrain`` read, built once from the parsed
command line (a --config preset's keys are already its flags' defaults
there), saved in every checkpoint the loop writes and read back from it.

::

    config = RunConfig.from_args(args, "train")        # the flags of icd train / icd pretrain
    ckpt["config"] = config.to_dict()                   # {"schema": 2, "command", "loop", ...}
    RunConfig.from_checkpoint(ckpt, "--resume PATH", "train")

A checkpoint's config is a plain dict (``weights_only``-loadable) with a schema version,
:data:`SCHEMA_VERSION`. Reading one back:

- ``config`` of this schema: its fields; a field an older icd did not write takes its default
  here, a field this icd does not know is refused (a newer icd wrote it);
- ``config`` of a newer schema, or of another command: refused, saying which;
- ``config`` of schema 1 (loop, data, hooks or pretrain only): an ``icd train`` one takes its
  model, optimiser, speed and distillation sections from the checkpoint's ``args``, and is
  refused, saying so, without them;
- no ``config`` but the ``args`` (the flags as a dict) that every checkpoint of ``icd train`` and
  ``icd pretrain`` has held: read as those flags, each missing flag at its default here;
- neither: refused (not a checkpoint of that command).

Each default is stated once, on its field; ``icd pretrain``'s flags take theirs from here.
"""

from __future__ import annotations

import argparse
import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Literal

from icd.data.coco import BAD_DATA_CHOICES
from icd.engine.health import HEALTH_ACTIONS
from icd.engine.optim import TEACHER_SIDE_CLIP, TEACHER_SIDE_LR
from icd.errors import CheckpointError, ConfigError

# 2: icd train's model, optim, speed and distill sections (schema 1 held loop, data, hooks, pretrain)
SCHEMA_VERSION = 2
COMMANDS = ("train", "pretrain")

# icd pretrain's recipe, chosen by measurement on the shapes data (results/README.md): the paper's
# AdamW 1e-4 with a 0.01 norm clip leaves the attention nearly uniform for thousands of iterations;
# 1e-3 with a 1.0 clip and the query projection x4 at the start reached lift > 3, distinctness > 0.3.
PRETRAIN_LR = 1e-3
PRETRAIN_CLIP = 1.0
PRETRAIN_ATTENTION_GAIN = 4.0


def _at_least(flag: str, value: int | float | None, minimum: int) -> None:
    if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < minimum):
        raise ConfigError(f"--{flag} {value}: expected an integer >= {minimum}")


def _one_of(flag: str, value: str, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise ConfigError(f"--{flag} {value!r}: expected one of {', '.join(choices)}")


@dataclass(frozen=True)
class DataConfig:
    """Where the training and val splits are and how training images are drawn (both commands)."""

    data_path: str | None = None  # a COCO-layout root (or each split's files below)
    train_split: str = "train"
    train_ann: str | None = None  # the train split's annotation JSON, read in place
    train_images: str | None = None  # the folder its file_names are relative to
    val_split: str = "val"
    val_ann: str | None = None
    val_images: str | None = None
    flip_prob: float = 0.5  # horizontal flip probability of a training image
    drop_empty_categories: bool = False  # leave out the categories no training annotation uses

    def __post_init__(self) -> None:
        if isinstance(self.flip_prob, bool) or not isinstance(self.flip_prob, (int, float)) or not (
            0 <= self.flip_prob <= 1
        ):
            raise ConfigError(f"--flip-prob {self.flip_prob}: expected a number in [0, 1]")


@dataclass(frozen=True)
class LoopConfig:
    """What the one training loop reads (``icd.engine.loop``), for both commands."""

    output_dir: str = "output"  # checkpoints, metrics.jsonl (--output-dir)
    resume: str | None = None  # the checkpoint this run continues (--resume)
    allow_resume_changes: bool = False  # icd train: resume with another lr schedule or data order
    overwrite: bool = False
    seed: int = 0
    batch_size: int = 2  # images per process and step
    workers: int = 0  # data loading processes (the command line's default depends on the CPUs)
    print_freq: int = 20  # iterations per metrics line (and per read of the losses)
    iters: int | None = None  # the schedule's length in steps (icd train: else --epochs)
    epochs: int | None = None  # icd train's length in epochs when --iters is not given
    stop_after_iters: int | None = None  # stop there with a checkpoint (the schedule unchanged)
    on_bad_data: str = "error"
    tensorboard: bool = False
    progress: bool = True  # tqdm bars (--no-progress: False)
    device: str | None = None  # cpu, cuda, cuda:N (None: cuda when available)

    def __post_init__(self) -> None:
        for flag, minimum in (("batch_size", 1), ("workers", 0), ("print_freq", 1), ("iters", 1),
                              ("epochs", 1), ("stop_after_iters", 1)):  # fmt: skip
            _at_least(flag.replace("_", "-"), getattr(self, flag), minimum)
        _one_of("on-bad-data", self.on_bad_data, BAD_DATA_CHOICES)


@dataclass(frozen=True)
class TrainHooksConfig:
    """``icd train``'s periodic work (``icd.engine.hooks``)."""

    health_window: int = 50  # iterations a loss must stay constant to count as stuck
    on_unhealthy: str = "warn"
    checkpoint_every: int = 0  # also checkpoint.pth every N iterations (0: each epoch only)
    epoch_checkpoint_every: int = 0  # also model_{epoch}.pth every N epochs (0: never)
    eval_every: int = 1  # evaluate every N epochs (and at the end; 0: only at the end)
    evaluate: bool = True  # --no-eval: False

    def __post_init__(self) -> None:
        _at_least("health-window", self.health_window, 2)
        for flag in ("checkpoint_every", "epoch_checkpoint_every", "eval_every"):
            _at_least(flag.replace("_", "-"), getattr(self, flag), 0)
        _one_of("on-unhealthy", self.on_unhealthy, HEALTH_ACTIONS)


@dataclass(frozen=True)
class PretrainConfig:
    """``icd pretrain``'s recipe and its attention statistics (``icd.engine.pretrain``)."""

    iters: int = 600  # pre-training iterations
    lr: float = PRETRAIN_LR  # AdamW lr, cosine decay over iters
    clip: float = PRETRAIN_CLIP  # gradient-norm clip
    attention_gain: float = PRETRAIN_ATTENTION_GAIN  # x the decoder's query projection at the start
    eval_every: int = 100  # iterations between attention statistics
    attention_images: int | None = None  # val images for the statistics (None: all)
    attention_detail: bool = False
    cache_gb: float = 2.0  # memory for the teacher's FPN maps (0: recompute)
    min_size: list[int] | None = None  # the students' input sizes (None: the teacher checkpoint's own)
    max_size: int | None = None
    min_level: int | None = None  # the levels of a bare state dict teacher (None: its family's default)
    max_level: int | None = None

    def teacher_flags(self) -> dict[str, Any]:
        """The input sizes and levels as ``run_spec.load_teacher`` reads them."""
        return {"min_size": self.min_size, "max_size": self.max_size, "min_level": self.min_level,
                "max_level": self.max_level}  # fmt: skip

    def __post_init__(self) -> None:
        for flag in ("iters", "eval_every", "attention_images"):
            _at_least(flag.replace("_", "-"), getattr(self, flag), 1)
        for flag in ("lr", "clip", "attention_gain"):
            value = getattr(self, flag)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value < float("inf"):
                raise ConfigError(f"--{flag.replace('_', '-')} {value}: expected a finite number > 0")
        if isinstance(self.cache_gb, bool) or not isinstance(self.cache_gb, (int, float)) or not (
            0 <= self.cache_gb < float("inf")
        ):
            raise ConfigError(f"--cache-gb {self.cache_gb}: expected a finite number >= 0")


PROJECTION_OPTIMIZERS = ("student", "teacher-side")
DEFAULT_DETECTOR = "retinanet"  # --detector's default (and that of saved args without one)
# the flags of every detector family's spec (``DetectorFamily.spec_from_args`` reads them); a
# family's own flags are ``--<family>-*`` (dests ``<family>_*``)
MODEL_FLAGS = ("backbone", "trainable_backbone_layers", "norm", "fpn_channels", "min_level", "max_level",
               "min_size", "max_size", "score_thresh")  # fmt: skip
# the distillation flags DistillConfig holds as fields or in other sections; its ``flags`` holds
# the rest of the flags that need --teacher (the method's own, the bare teacher's)
_DISTILL_TYPED = ("teacher", "distill", "inherit_teacher", "distill_warmup_iters", "icd_init", "icd_backend",
                  "icd_static_shapes", "icd_lr", "icd_clip", "icd_projection_optimizer", "icd_cuda_graphs")  # fmt: skip


def _plain(value: Any) -> Any:
    """A flag's value as a checkpoint stores it (tuples as lists)."""
    return list(value) if isinstance(value, tuple) else value


@dataclass(frozen=True)
class ModelConfig:
    """``icd train``'s student: its detector family's spec is ``spec_from_args(values(), C)``
    (``icd.engine.run_spec.detector_spec_from_args``), C from the training data."""

    detector: str = DEFAULT_DETECTOR
    backbone_weights: str | None = None  # a local ResNet state dict (--backbone-weights)
    flags: dict[str, Any] = dataclasses.field(default_factory=dict)  # MODEL_FLAGS and --<family>-* as given

    def values(self) -> dict[str, Any]:
        """The model's flags as ``DetectorFamily.spec_from_args`` reads them."""
        return {**self.flags, "detector": self.detector, "backbone_weights": self.backbone_weights}


@dataclass(frozen=True)
class OptimConfig:
    """``icd train``'s optimisers (``icd.engine.optim``): SGD over the student, AdamW over ICD's
    teacher side."""

    lr: float | None = None  # SGD lr (None: optim.default_lr of the detector and batch)
    momentum: float = 0.9
    weight_decay: float = 1e-4
    warmup_iters: int | None = None  # linear lr warm-up (None: optim.default_warmup_iters)
    lr_steps: list[int] | None = None  # iterations where the lr drops x0.1 (None: 2/3, 8/9 of the run)
    teacher_lr: float = TEACHER_SIDE_LR  # --icd-lr
    teacher_clip: float = TEACHER_SIDE_CLIP  # --icd-clip
    projection_optimizer: str = "student"  # --icd-projection-optimizer: who trains ICD's value projection
    preset: str | None = None  # the --config preset (its lr is for PRESET_IMAGES_PER_ITERATION images)

    def __post_init__(self) -> None:
        _at_least("warmup-iters", self.warmup_iters, 0)
        _one_of("icd-projection-optimizer", self.projection_optimizer, PROJECTION_OPTIMIZERS)


@dataclass(frozen=True)
class SpeedConfig:
    """How fast a step runs, not what it computes (``icd.engine.speed``): a run may resume with others."""

    amp: bool = False
    amp_dtype: str | None = None  # None: float16 on CUDA, bfloat16 elsewhere
    compile: bool = False
    compile_backend: str | None = None  # None: inductor
    cuda_graphs: bool = False  # --icd-cuda-graphs


@dataclass(frozen=True)
class DistillConfig:
    """``icd train``'s teacher and distillation (``icd.nn.methods``' registry builds the method)."""

    teacher: str | None = None  # the teacher checkpoint (None: no distillation, a baseline)
    method: str = "icd"  # --distill
    inherit_teacher: str = ""  # parts the student copies from the teacher (--inherit-teacher)
    warmup_iters: int | None = None  # --distill-warmup-iters (None: optim.default_warmup_iters)
    icd_init: str | None = None  # ICD's teacher side from icd pretrain's file
    backend: str | None = None  # --icd-backend (None: the device's default)
    static_shapes: bool = False  # --icd-static-shapes
    attention_detail: bool = False  # --attention-detail
    flags: dict[str, Any] = dataclasses.field(default_factory=dict)  # the method's and --teacher-* flags

    def __post_init__(self) -> None:
        _at_least("distill-warmup-iters", self.warmup_iters, 0)

    def settings(self) -> Any:
        """The method's config dataclass (its registry entry's ``config_from_args``)."""
        from icd.nn.methods import get_method

        return get_method(self.method).config_from_args({**self.flags, "distill": self.method,
                                                         "icd_init": self.icd_init})  # fmt: skip

    def values(self) -> dict[str, Any]:
        """The distillation flags as ``run_spec.distiller_kwargs`` and ``load_teacher`` read them."""
        return {**self.flags, "distill": self.method, "teacher": self.teacher, "icd_init": self.icd_init}


def _model_section(values: Mapping[str, Any]) -> ModelConfig:
    from icd.detection.adapters import DETECTOR_FAMILIES

    prefixes = tuple(f"{name}_" for name in DETECTOR_FAMILIES)
    flags = {k: _plain(v) for k, v in values.items() if k in MODEL_FLAGS or k.startswith(prefixes)}
    detector = values.get("detector") or ModelConfig.detector
    return ModelConfig(detector, values.get("backbone_weights"), flags)


def _distill_section(values: Mapping[str, Any]) -> DistillConfig:
    from icd.flags import teacher_only

    typed = _section(DistillConfig, values)
    flags = {k: _plain(v) for k, v in values.items() if teacher_only(k) and k not in _DISTILL_TYPED}
    return dataclasses.replace(typed, flags=flags)


# each section's flag names where they differ from the field (the rest are the field's name)
_FLAG_OF = {
    DataConfig: {},
    LoopConfig: {"progress": ("no_progress", lambda v: not v)},
    TrainHooksConfig: {"evaluate": ("no_eval", lambda v: not v)},
    PretrainConfig: {"min_size": ("min_size", _plain)},
    OptimConfig: {"teacher_lr": ("icd_lr", None), "teacher_clip": ("icd_clip", None),
                  "projection_optimizer": ("icd_projection_optimizer", None), "preset": ("config", None),
                  "lr_steps": ("lr_steps", _plain)},  # fmt: skip
    SpeedConfig: {"cuda_graphs": ("icd_cuda_graphs", None)},
    DistillConfig: {"method": ("distill", None), "warmup_iters": ("distill_warmup_iters", None),
                    "backend": ("icd_backend", None), "static_shapes": ("icd_static_shapes", None),
                    "flags": ("", None)},  # fmt: skip  (flags: _distill_section's)
}


def _section(kind: type, values: Mapping[str, Any]) -> Any:
    """A section built from a command's flags (a missing or None flag: the field's default, except
    where None is the field's own value)."""
    kwargs = {}
    for field in dataclasses.fields(kind):
        flag, convert = _FLAG_OF[kind].get(field.name, (field.name, None))
        if flag not in values:
            continue
        value = values[flag]
        if value is None and field.default is not None:
            continue
        kwargs[field.name] = convert(value) if convert else value
    return kind(**kwargs)


_TRAIN_SECTIONS = ("model", "optim", "speed", "distill")  # icd train's, from schema 2 on
_NEW_SECTIONS = {"train": _TRAIN_SECTIONS, "pretrain": ("distill",)}  # the sections schema 1 lacks
_SECTIONS = {"loop": LoopConfig, "data": DataConfig, "hooks": TrainHooksConfig, "pretrain": PretrainConfig,
             "model": ModelConfig, "optim": OptimConfig, "speed": SpeedConfig, "distill": DistillConfig}  # fmt: skip


@dataclass(frozen=True)
class RunConfig:
    """The typed settings of one ``icd train`` or ``icd pretrain`` run: the loop's, the data's, and
    the periodic work's (``hooks``: icd train) or the pre-training's (``pretrain``: icd pretrain);
    icd train's model, optimisers and speed settings (``model``, ``optim``, ``speed``); the
    teacher and the distillation method (``distill``: both)."""

    command: Literal["train", "pretrain"]
    loop: LoopConfig
    data: DataConfig = dataclasses.field(default_factory=DataConfig)
    hooks: TrainHooksConfig | None = None
    pretrain: PretrainConfig | None = None
    model: ModelConfig | None = None
    optim: OptimConfig | None = None
    speed: SpeedConfig | None = None
    distill: DistillConfig | None = None

    def __post_init__(self) -> None:
        _one_of("command", self.command, COMMANDS)
        train = self.command == "train"
        if (self.hooks is not None) != train or (self.pretrain is not None) != (not train) or (
            not train and any(getattr(self, name) is not None for name in ("model", "optim", "speed"))
        ):
            raise ConfigError(
                "RunConfig: icd train has hooks (and model, optim, speed, distill) sections and no pretrain "
                "section, icd pretrain its pretrain (and distill) sections"
            )
        for name in _NEW_SECTIONS[self.command]:  # a section not given (a step strategy's own config): defaults
            if getattr(self, name) is None:
                object.__setattr__(self, name, _SECTIONS[name]())

    @classmethod
    def from_args(cls, args: argparse.Namespace | Mapping[str, Any], command: str) -> RunConfig:
        """The config of ``command``'s parsed flags (or a checkpoint's saved ``args`` dict)."""
        values = dict(vars(args) if isinstance(args, argparse.Namespace) else args)
        if command == "pretrain":  # its --iters is the pre-training's, which is the loop's length
            pretrain = _section(PretrainConfig, values)
            loop = _section(LoopConfig, {**values, "iters": pretrain.iters, "epochs": None})
            return cls("pretrain", loop, _section(DataConfig, values), pretrain=pretrain,
                       distill=_distill_section(values))  # fmt: skip
        loop = _section(LoopConfig, values)
        return cls(
            "train", loop, _section(DataConfig, values), hooks=_section(TrainHooksConfig, values),
            model=_model_section(values), optim=_section(OptimConfig, values), speed=_section(SpeedConfig, values),
            distill=_distill_section(values),
        )  # fmt: skip

    def sections(self) -> dict[str, Any]:
        """The sections this config has, by name."""
        return {name: getattr(self, name) for name in _SECTIONS if getattr(self, name) is not None}

    def to_dict(self) -> dict:
        """A plain dict of str/int/float/bool/None/list with the schema version (what checkpoints hold)."""
        out: dict[str, Any] = {"schema": SCHEMA_VERSION, "command": self.command}
        out.update({name: dataclasses.asdict(section) for name, section in self.sections().items()})
        return out

    def flag_values(self) -> dict[str, Any]:
        """The config as the flags (argparse dests) that give it: what resume checks compare and
        name (``--lr 0.01 there, 0.02 here``)."""
        out: dict[str, Any] = {}
        for section in self.sections().values():
            if isinstance(section, (ModelConfig, DistillConfig)):
                out.update(section.flags)
            for field in dataclasses.fields(section):
                if field.name == "flags":
                    continue
                flag, _ = _FLAG_OF.get(type(section), {}).get(field.name, (field.name, None))
                value = getattr(section, field.name)
                if flag in ("no_progress", "no_eval"):
                    value = not value
                out[flag] = _plain(value)
        return out

    @classmethod
    def from_dict(cls, saved: Any, where: str, args: Mapping[str, Any] | None = None) -> RunConfig:
        """The config ``to_dict`` wrote; CheckpointError(``where``, why) when this icd cannot read it.
        ``args``: the checkpoint's saved flags, whose icd train sections a schema-1 config lacks."""
        if not isinstance(saved, Mapping):
            raise CheckpointError(where, f"its config is a {type(saved).__name__}, not a dict")
        schema = saved.get("schema")
        if isinstance(schema, bool) or not isinstance(schema, int):
            raise CheckpointError(where, f"its config has no schema version (schema {schema!r})")
        if schema > SCHEMA_VERSION:
            raise CheckpointError(
                where, f"its config is of schema {schema}, written by a newer icd; this one reads schema "
                f"{SCHEMA_VERSION} and older: upgrade icd to read it",
            )  # fmt: skip
        command = saved.get("command")
        if command not in COMMANDS:
            raise CheckpointError(where, f"its config names no command icd knows ({command!r})")
        expected = {"schema", "command", "loop", "data"}
        expected |= {"hooks", *_TRAIN_SECTIONS} if command == "train" else {"pretrain", "distill"}
        older = set()
        if schema < 2:  # the sections schema 1 did not write (the teacher, the distillation...): its args
            older = set(_NEW_SECTIONS[command])
            if not isinstance(args, Mapping):
                raise CheckpointError(
                    where, f"its config is of schema {schema}, without the {', '.join(sorted(older))} settings, and "
                    "it holds no saved args to read them from",
                )  # fmt: skip
        unknown = sorted(set(saved) - (expected - older))
        if unknown:
            raise CheckpointError(where, f"its config has entries this icd does not know: {', '.join(unknown)}")
        built = {}
        for name in sorted(expected - older - {"schema", "command"}):
            kind, values = _SECTIONS[name], saved.get(name, {})
            if not isinstance(values, Mapping):
                raise CheckpointError(where, f"config.{name} is a {type(values).__name__}, not a dict")
            fields = {f.name for f in dataclasses.fields(kind)}
            unknown = sorted(set(values) - fields)
            if unknown:
                raise CheckpointError(
                    where, f"config.{name} has fields this icd does not know: {', '.join(unknown)} (a newer icd?)"
                )
            try:
                built[name] = kind(**values)  # fields an older icd did not write: their defaults
            except (ConfigError, TypeError) as err:
                raise CheckpointError(where, f"config.{name}: {err}") from None
        if older:
            try:
                from_args = cls.from_args(args, command)
            except ConfigError as err:
                raise CheckpointError(where, f"its saved args do not make an icd {command} config: {err}") from None
            built.update({name: getattr(from_args, name) for name in older})
        return cls(command, **built)

    @classmethod
    def from_checkpoint(cls, ckpt: Mapping[str, Any], where: str, command: str) -> RunConfig:
        """The config of a checkpoint of ``command`` (the rules of this module's docstring)."""
        if "config" in ckpt:
            config = cls.from_dict(ckpt["config"], where, ckpt.get("args"))
        elif isinstance(ckpt.get("args"), Mapping):  # written before typed configs: its flags
            try:
                config = cls.from_args(ckpt["args"], command)
            except ConfigError as err:
                raise CheckpointError(where, f"its saved args do not make an icd {command} config: {err}") from None
        else:
            found = "args that are no dict" if "args" in ckpt else f"keys {sorted(map(str, ckpt))[:8]}"
            raise CheckpointError(
                where, f"no run config and no saved flags ({found}): not a checkpoint of icd {command}"
            )
        if config.command != command:
            raise CheckpointError(where, f"is a checkpoint of icd {config.command}, not of icd {command}")
        return config
