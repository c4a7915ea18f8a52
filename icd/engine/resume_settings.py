"""--resume checks: the checkpoint is an ``icd train`` one, of the same model and distillation.

Loading another run's optimiser state fails deep inside torch ("loaded state dict contains a
parameter group that doesn't match the size of optimizer's group"); this names the flags that
differ instead, before anything is loaded.
"""

from __future__ import annotations

import argparse
from typing import Any

from icd.errors import ConfigError
from icd.flags import teacher_only

REQUIRED_KEYS = ("model", "optimizer", "lr_scheduler", "epoch", "iteration", "rng")
# the architecture: another value here is another model (min_size, max_size, score_thresh may change)
SPEC_FIELDS = ("detector", "backbone", "num_classes", "fpn_channels", "min_level", "max_level", "norm")
# may differ on resume: where the ICD ops run (a GPU run continued on CPU)
RESUMABLE_CHANGES = ("icd_backend",)


def check_resume_compatible(ckpt: Any, path: str, args: argparse.Namespace, spec: dict) -> None:
    """ConfigError naming what differs between the checkpoint's run and this one."""
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
    saved_args = ckpt.get("args") or {}
    if "teacher" in saved_args:
        before, now = bool(saved_args["teacher"]), bool(getattr(args, "teacher", None))
        if before != now:
            differences.append(("teacher", "given" if before else "none", "given" if now else "none"))
        for dest, value in sorted(vars(args).items()):
            if dest in RESUMABLE_CHANGES or not teacher_only(dest) or dest not in saved_args or not (before or now):
                continue
            if saved_args[dest] != value:
                differences.append((dest.replace("_", "-"), saved_args[dest], value))
    if differences:
        text = "; ".join(f"--{flag} {_shown(old)} there, {_shown(new)} here" for flag, old, new in differences)
        raise ConfigError(
            f"--resume {path} was another run: {text}. Resume with its flags, or start a new run"
        )


def _shown(value: Any) -> str:
    if isinstance(value, (list, tuple)):
        return " ".join(map(str, value))
    return repr(value) if isinstance(value, str) and not value else str(value)
