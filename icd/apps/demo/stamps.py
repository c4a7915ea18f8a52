"""Stamps: the settings a finished step ran with (``demo_run.json``), so a later demo or study reuses the step.

A run's stamp is written in its folder when it finishes (its arguments, the data settings, its
run identity and its wall time); the data folder's holds the data settings. The run identity
(:func:`run_id`) is a hash of the command and the data settings: a step is reused only when its
identity is the one the new plan would run, so a changed plan is never taken for a finished run.
"""

from __future__ import annotations

import hashlib
import json
import os

from icd.apps.demo.plan import Run
from icd.apps.demo.settings import DemoConfig

STAMP_FILE = "demo_run.json"  # per run dir: the settings and wall time of a finished run
OWNER_FILE = ".icd_demo"  # in every folder the demo writes, before it writes anything there


def mark_owned(folder: str) -> None:
    """Say that the demo created ``folder`` (so a later demo may replace what is in it)."""
    os.makedirs(folder, exist_ok=True)
    with open(os.path.join(folder, OWNER_FILE), "w") as f:
        f.write("written by icd demo\n")


def foreign_files(folder: str) -> list[str]:
    """The files of ``folder`` when the demo did not create it (no marker, no stamp); [] when it
    did, or when the folder is missing or empty."""
    if not os.path.isdir(folder):
        return []
    names = sorted(os.listdir(folder))
    if OWNER_FILE in names or STAMP_FILE in names:
        return []
    return names


def finished_stamp(run_dir: str) -> dict | None:
    """The stamp of a finished run (None without one or without its checkpoint.pth)."""
    path = os.path.join(run_dir, STAMP_FILE)
    if not os.path.exists(path) or not os.path.exists(os.path.join(run_dir, "checkpoint.pth")):
        return None
    with open(path) as f:
        return json.load(f)


def run_id(stamp: dict) -> str:
    """The identity of a run: a hash of its stamp's command and data settings (16 hex digits)."""
    text = json.dumps({"argv": stamp["argv"], "data": stamp["data"]}, sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def write_run_stamp(run: Run, cfg: DemoConfig) -> None:
    """Mark ``run`` finished: its stamp, identity and wall time in its folder (written atomically:
    a run killed while stamping is not finished)."""
    stamp = run.stamp(cfg)
    path = os.path.join(cfg.run_dir(run.name), STAMP_FILE)
    with open(f"{path}.tmp", "w") as f:
        json.dump({**stamp, "run_id": run_id(stamp), "seconds": run.seconds}, f, indent=1)
    os.replace(f"{path}.tmp", path)


def reuse_if_finished(run: Run, cfg: DemoConfig) -> bool:
    """Mark ``run`` reused (with its earlier wall time) when its folder holds it finished with the
    same identity (:func:`run_id`: the same command and data)."""
    stamp = finished_stamp(cfg.run_dir(run.name))
    if stamp is None or run_id(stamp) != run_id(run.stamp(cfg)):
        return False
    run.reused, run.seconds = True, float(stamp["seconds"])
    return True


def data_is_current(cfg: DemoConfig) -> bool:
    """Whether ``cfg.data_dir`` holds data generated with ``cfg``'s data settings."""
    stamp = os.path.join(cfg.data_dir, STAMP_FILE)
    if not os.path.exists(stamp):
        return False
    with open(stamp) as f:
        return json.load(f) == cfg.data_settings()


def write_data_stamp(cfg: DemoConfig) -> None:
    with open(os.path.join(cfg.data_dir, STAMP_FILE), "w") as f:
        json.dump(cfg.data_settings(), f)
