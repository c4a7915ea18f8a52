"""--resume checks: the checkpoint is an ``icd train`` one, of the same model, distillation,
schedule and data order: its run config (``RunConfig.from_checkpoint``: its ``config``, or its
saved ``args`` for a checkpoint written before typed configs) against this run's, compared and
named as the flags that give them (``RunConfig.flag_values``).

Loading another run's optimiser state fails deep inside torch ("loaded state dict contains a
parameter group that doesn't match the size of optimizer's group"); this names the flags that
differ instead, before anything is loaded.

Flags that change the lr schedule (``--lr``, ``--epochs``, ...) or what the saved data position
means (``--batch-size``, the number of processes, ``--seed``, the training images) are refused
too: the optimiser state would keep the old lr and the position would be re-read in batches of
another size, skipping images. ``--allow-resume-changes`` accepts them, and the run then goes on
with the new settings from the checkpoint's iteration (:func:`resumed_position`): the lr
schedule of the new flags (the lr, momentum and weight decay of the optimiser replaced), the
interrupted epoch continued after the images already seen (whole batches of the new size: at
most one batch of images is read twice, none skipped), or, with another seed or other training
images, restarted from its first batch.
"""

from __future__ import annotations

from typing import Any

from icd.engine.run_config import RunConfig
from icd.errors import ConfigError
from icd.flags import teacher_only

REQUIRED_KEYS = ("model", "optimizer", "lr_scheduler", "epoch", "iteration", "rng")
# the architecture: another value here is another model (min_size, max_size, score_thresh may change)
SPEC_FIELDS = ("detector", "backbone", "num_classes", "fpn_channels", "min_level", "max_level", "norm")
# how fast a step runs, not what it computes: a run may resume with others (a GPU run continued
# on the CPU without CUDA graphs; the GradScaler's state is restored when both runs use float16)
SPEED_FLAGS = ("amp", "amp_dtype", "compile", "compile_backend", "icd_cuda_graphs")
# may differ on resume: where the ICD ops run, and the speed settings (the distillation flags among
# them would otherwise be compared)
RESUMABLE_CHANGES = ("icd_backend", *SPEED_FLAGS)
# change the lr schedule of the student (the teacher side's flags are compared as distillation flags)
SCHEDULE_FLAGS = ("lr", "momentum", "weight_decay", "warmup_iters", "lr_steps", "iters", "epochs")
# change which images the saved position (batches of the epoch) stands for
DATA_ORDER_FLAGS = ("batch_size", "seed")
ALLOW_FLAG = "--allow-resume-changes"


def saved_config(ckpt: Any, path: str) -> RunConfig:
    """The run config of the checkpoint ``--resume path`` (its ``config``, or the one its saved
    ``args`` give: ``RunConfig.from_checkpoint``)."""
    return RunConfig.from_checkpoint(ckpt, f"--resume {path}", "train")


def check_resume_compatible(
    ckpt: Any, path: str, config: RunConfig, spec: dict, world_size: int, train_images: int
) -> None:
    """ConfigError naming what differs between the checkpoint's run and this one (``config``: this
    run's; ``world_size``: its processes; ``train_images``: its training images)."""
    if not isinstance(ckpt, dict):
        raise ConfigError(f"--resume {path} is not an icd train checkpoint (a {type(ckpt).__name__})")
    missing = [k for k in REQUIRED_KEYS if k not in ckpt]
    if missing:
        raise ConfigError(
            f"--resume {path} is not an icd train checkpoint (no {', '.join(missing)}); to start from a "
            "model's weights use --teacher (distillation) or --backbone-weights"
        )
    differences = []
    saved_spec = ckpt.get("detector_spec") or {}
    for field in SPEC_FIELDS:
        if field in saved_spec and field in spec and saved_spec[field] != spec[field]:
            differences.append((field.replace("_", "-"), saved_spec[field], spec[field]))
    saved, now = saved_config(ckpt, path).flag_values(), config.flag_values()
    before, given = bool(saved["teacher"]), bool(now["teacher"])
    if before != given:
        differences.append(("teacher", "given" if before else "none", "given" if given else "none"))
    for dest, value in sorted(now.items()):
        if dest in RESUMABLE_CHANGES or not teacher_only(dest) or dest not in saved or not (before or given):
            continue
        if saved[dest] != value:
            differences.append((dest.replace("_", "-"), saved[dest], value))
    if differences:
        text = "; ".join(f"--{flag} {_shown(old)} there, {_shown(new)} here" for flag, old, new in differences)
        raise ConfigError(
            f"--resume {path} was another run: {text}. Resume with its flags, or start a new run"
        )
    changes = schedule_changes(ckpt, config, world_size, train_images)
    if changes and not config.loop.allow_resume_changes:
        text = "; ".join(f"{flag} {_shown(old)} there, {_shown(new)} here" for flag, old, new in changes)
        raise ConfigError(
            f"--resume {path}",
            f"{text}: these change the lr schedule or where the saved data position points. Resume with "
            f"the run's flags, or pass {ALLOW_FLAG} to go on with the new ones from iteration "
            f"{ckpt['iteration']}",
        )


def schedule_changes(ckpt: dict, config: RunConfig, world_size: int, train_images: int) -> list[tuple[str, Any, Any]]:
    """(flag, the checkpoint's value, this run's) of each schedule or data-order setting that differs."""
    saved, now = saved_config(ckpt, "").flag_values(), config.flag_values()
    changes = [
        (f"--{dest.replace('_', '-')}", saved[dest], now[dest])
        for dest in (*SCHEDULE_FLAGS, *DATA_ORDER_FLAGS)
        if saved[dest] != now[dest]
    ]
    if int(ckpt.get("world_size", world_size)) != world_size:
        changes.append(("processes (torchrun)", ckpt["world_size"], world_size))
    if int(ckpt.get("train_images", train_images)) != train_images:
        changes.append(("training images", ckpt["train_images"], train_images))
    return changes


def resumed_position(ckpt: dict, batch_size: int, world_size: int, train_images: int, seed: int) -> tuple[int, str]:
    """The batch of the saved epoch to continue with under ``--allow-resume-changes``, and what was
    done (empty when the position is unchanged)."""
    position = int(ckpt.get("epoch_batches", 0))
    if position == 0:
        return 0, ""
    loop = saved_config(ckpt, "").loop
    if loop.seed != seed or int(ckpt.get("train_images", train_images)) != train_images:
        return 0, f"another order of epoch {ckpt['epoch']}: it restarts from its first batch"
    old_batch = loop.batch_size * int(ckpt.get("world_size", world_size))
    new_batch = batch_size * world_size
    if old_batch == new_batch:
        return position, ""
    new_position = position * old_batch // new_batch  # images seen, in whole batches of the new size
    return new_position, (
        f"epoch {ckpt['epoch']} goes on after {new_position * new_batch} of the {position * old_batch} "
        f"images it had read ({position} batches of {old_batch} -> {new_position} of {new_batch})"
    )


def _shown(value: Any) -> str:
    if isinstance(value, (list, tuple)):
        return " ".join(map(str, value))
    return repr(value) if isinstance(value, str) and not value else str(value)
