"""--output-dir safety: a new run never lands on another run's files, and the folder is writable.

A folder "holds a run" when it has a checkpoint (``checkpoint.pth``, ``model_*.pth``) or a
``metrics.jsonl``. A new run there stops before anything is built, unless it continues that run
(``--resume``) or replaces it (``--overwrite``: the old files are removed when training starts,
so a run that fails while setting up leaves them in place).
"""

from __future__ import annotations

import glob
import os

from icd.errors import ConfigError, OutputDirError

RUN_FILES = ("checkpoint.pth", "metrics.jsonl")
RUN_FILE_PATTERNS = ("model_*.pth", "events.out.tfevents.*")  # the second: --tensorboard's event files


def previous_run_files(output_dir: str) -> list[str]:
    """The checkpoints and metrics of a run already in ``output_dir`` (paths, sorted)."""
    found = [os.path.join(output_dir, name) for name in RUN_FILES]
    found = [p for p in found if os.path.isfile(p)]
    for pattern in RUN_FILE_PATTERNS:
        found += [p for p in glob.glob(os.path.join(glob.escape(output_dir), pattern)) if os.path.isfile(p)]
    return sorted(found)


def claim_output_dir(output_dir: str, resume: str | None, overwrite: bool, probe: bool = True) -> list[str]:
    """Check ``output_dir`` before a run is built; returns the files --overwrite is to remove.

    Raises OutputDirError when it holds another run and neither ``resume`` nor ``overwrite`` is
    given, or (``probe``) when a file cannot be created in it.
    """
    if resume and overwrite:
        raise ConfigError("--resume and --overwrite: give one (continue the run, or replace it)")
    files = previous_run_files(output_dir)
    if files and not resume and not overwrite:
        names = ", ".join(os.path.basename(p) for p in files)
        last = os.path.join(output_dir, RUN_FILES[0])
        hint = f"--resume {last} to continue it, " if last in files else ""
        raise OutputDirError(
            f"--output-dir {output_dir} holds another run ({names}); pass {hint}--overwrite to replace "
            "it, or another --output-dir"
        )
    if probe:
        probe_writable(output_dir)
    return files if overwrite else []


def probe_writable(output_dir: str) -> None:
    """Create ``output_dir`` and a file in it (then remove it): OutputDirError when that fails."""
    path = os.path.join(output_dir, f".icd_write_probe.{os.getpid()}")
    try:
        os.makedirs(output_dir, exist_ok=True)
        with open(path, "wb") as f:
            f.write(b"probe")
        os.remove(path)
    except OSError as err:
        raise OutputDirError(f"--output-dir {output_dir} is not writable: {err.strerror or err}") from None


def remove_previous_run(files: list[str]) -> None:
    """Delete the files of the run --overwrite replaces (missing ones are fine)."""
    for path in files:
        try:
            os.remove(path)
        except FileNotFoundError:
            pass
