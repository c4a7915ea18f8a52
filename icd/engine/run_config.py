"""Typed run configs: what the training loop, its data, its hooks and ``icd pretrain`` read,
built once from the parsed command line (a --config preset's keys are already its flags' defaults
there), saved in every checkpoint the loop writes and read back from it.

::

    config = RunConfig.from_args(args, "train")        # the flags of icd train / icd pretrain
    ckpt["config"] = config.to_dict()                   # {"schema": 1, "command", "loop", ...}
    RunConfig.from_checkpoint(ckpt, "--resume PATH", "train")

A checkpoint's config is a plain dict (``weights_only``-loadable) with a schema version,
:data:`SCHEMA_VERSION`. Reading one back:

- ``config`` of this schema: its fields; a field an older icd did not write takes its default
  here, a field this icd does not know is refused (a newer icd wrote it);
- ``config`` of a newer schema, or of another command: refused, saying which;
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
from icd.errors import CheckpointError, ConfigError

SCHEMA_VERSION = 1
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


# each section's flag names where they differ from the field (the rest are the field's name)
_FLAG_OF = {
    DataConfig: {},
    LoopConfig: {"progress": ("no_progress", lambda v: not v)},
    TrainHooksConfig: {"evaluate": ("no_eval", lambda v: not v)},
    PretrainConfig: {},
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


@dataclass(frozen=True)
class RunConfig:
    """The typed settings of one ``icd train`` or ``icd pretrain`` run: the loop's, the data's, and
    the periodic work's (``hooks``: icd train) or the pre-training's (``pretrain``: icd pretrain)."""

    command: Literal["train", "pretrain"]
    loop: LoopConfig
    data: DataConfig = dataclasses.field(default_factory=DataConfig)
    hooks: TrainHooksConfig | None = None
    pretrain: PretrainConfig | None = None

    def __post_init__(self) -> None:
        _one_of("command", self.command, COMMANDS)
        if (self.hooks is not None) != (self.command == "train") or (self.pretrain is not None) != (
            self.command == "pretrain"
        ):
            raise ConfigError("RunConfig: icd train has hooks and no pretrain section, icd pretrain the reverse")

    @classmethod
    def from_args(cls, args: argparse.Namespace | Mapping[str, Any], command: str) -> RunConfig:
        """The config of ``command``'s parsed flags (or a checkpoint's saved ``args`` dict)."""
        values = dict(vars(args) if isinstance(args, argparse.Namespace) else args)
        if command == "pretrain":  # its --iters is the pre-training's, which is the loop's length
            pretrain = _section(PretrainConfig, values)
            loop = _section(LoopConfig, {**values, "iters": pretrain.iters, "epochs": None})
            return cls("pretrain", loop, _section(DataConfig, values), pretrain=pretrain)
        loop = _section(LoopConfig, values)
        return cls("train", loop, _section(DataConfig, values), hooks=_section(TrainHooksConfig, values))

    def to_dict(self) -> dict:
        """A plain dict of str/int/float/bool/None with the schema version (what checkpoints hold)."""
        out: dict[str, Any] = {"schema": SCHEMA_VERSION, "command": self.command}
        out.update(loop=dataclasses.asdict(self.loop), data=dataclasses.asdict(self.data))
        if self.hooks is not None:
            out["hooks"] = dataclasses.asdict(self.hooks)
        if self.pretrain is not None:
            out["pretrain"] = dataclasses.asdict(self.pretrain)
        return out

    @classmethod
    def from_dict(cls, saved: Any, where: str) -> RunConfig:
        """The config ``to_dict`` wrote; CheckpointError(``where``, why) when this icd cannot read it."""
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
        sections = {"loop": LoopConfig, "data": DataConfig, "hooks": TrainHooksConfig, "pretrain": PretrainConfig}
        expected = {"schema", "command", "loop", "data", "hooks" if command == "train" else "pretrain"}
        unknown = sorted(set(saved) - expected)
        if unknown:
            raise CheckpointError(where, f"its config has entries this icd does not know: {', '.join(unknown)}")
        built = {}
        for name in sorted(expected - {"schema", "command"}):
            kind, values = sections[name], saved.get(name, {})
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
            except ConfigError as err:
                raise CheckpointError(where, f"config.{name}: {err}") from None
        return cls(command, **built)

    @classmethod
    def from_checkpoint(cls, ckpt: Mapping[str, Any], where: str, command: str) -> RunConfig:
        """The config of a checkpoint of ``command`` (the rules of this module's docstring)."""
        if "config" in ckpt:
            config = cls.from_dict(ckpt["config"], where)
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
