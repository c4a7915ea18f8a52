"""--output-dir safety: a run never lands on another run's files, and two runs never share a folder.

A folder "holds a run" when it has a checkpoint (``checkpoint.pth``, ``model_*.pth``,
``teacher_side.pth``), a ``metrics.jsonl`` or ``--tensorboard``'s event files. Beside them,
``icd_run.json`` holds the run's id and command (written when a run claims the folder; alone, as
a run that failed while setting up leaves it, it holds nothing).

A run *claims* its folder before anything is built (:func:`claim_output_dir`):

1. it takes an exclusive lock on ``OUTPUT_DIR/.icd_lock`` (``flock``, held for the whole run and
   released by the kernel when the process ends, also by SIGKILL): a second run started into the
   same folder at the same moment is refused, whatever the timing;
2. under the lock it checks the folder (:func:`check_output_dir`): a new run stops when the
   folder holds a run, unless it replaces it (``--overwrite``: the old files are removed when
   training starts, so a run that fails while setting up leaves them in place); ``--resume A``
   continues into A's own folder, into an empty one, or into a copy of A's folder (the same run
   id), never into another run's;
3. it removes the ``*.tmp`` files a killed writer left (no live writer can hold them: the lock)
   and writes ``icd_run.json``.
"""

from __future__ import annotations

import glob
import json
import logging
import os
import socket
import time
import uuid
from dataclasses import dataclass

from icd.errors import ConfigError, OutputDirError

try:
    import fcntl
except ImportError:  # pragma: no cover - Windows: no advisory locks; the checks still run
    fcntl = None

log = logging.getLogger(__name__)

RUN_FILES = ("checkpoint.pth", "teacher_side.pth", "metrics.jsonl")
RUN_FILE_PATTERNS = ("model_*.pth", "events.out.tfevents.*")  # the second: --tensorboard's event files
IDENTITY_FILE = "icd_run.json"  # {"run_id", "command", "created"}
LOCK_FILE = ".icd_lock"  # flock'ed by the live run; holds its pid, host and command
TMP_PATTERNS = ("*.pth.tmp", f"{IDENTITY_FILE}.tmp")


def previous_run_files(output_dir: str) -> list[str]:
    """The checkpoints and metrics of a run already in ``output_dir`` (paths, sorted)."""
    found = [os.path.join(output_dir, name) for name in RUN_FILES]
    found = [p for p in found if os.path.isfile(p)]
    for pattern in RUN_FILE_PATTERNS:
        found += [p for p in glob.glob(os.path.join(glob.escape(output_dir), pattern)) if os.path.isfile(p)]
    return sorted(found)


def read_identity(folder: str) -> dict | None:
    """The ``icd_run.json`` of ``folder`` (None without one, or when it is unreadable)."""
    try:
        with open(os.path.join(folder, IDENTITY_FILE), encoding="utf-8") as f:
            identity = json.load(f)
    except (OSError, ValueError):
        return None
    return identity if isinstance(identity, dict) and isinstance(identity.get("run_id"), str) else None


def _same_folder(a: str, b: str) -> bool:
    try:
        return os.path.samefile(a, b)
    except OSError:
        return os.path.abspath(a) == os.path.abspath(b)


def check_output_dir(output_dir: str, resume: str | None, overwrite: bool, command: str = "train") -> list[str]:
    """Whether ``icd <command>`` may write into ``output_dir`` (reads only); returns the files
    ``--overwrite`` is to remove. OutputDirError naming the folder and its files otherwise."""
    if resume and overwrite:
        raise ConfigError("--resume and --overwrite: give one (continue the run, or replace it)")
    files = previous_run_files(output_dir)
    names = ", ".join(os.path.basename(p) for p in files)
    here = read_identity(output_dir) if files else None
    if here is not None and here.get("command", command) != command and not overwrite:
        raise OutputDirError(
            f"--output-dir {output_dir}",
            f"holds an `icd {here['command']}` run ({names}); `icd {command}` needs a folder of its own",
        )
    if resume:
        resumed_dir = os.path.dirname(os.path.abspath(resume))
        if not files or _same_folder(output_dir, resumed_dir):
            return []
        there = read_identity(resumed_dir)
        if here is not None and there is not None and here["run_id"] == there["run_id"]:
            return []  # a copy of the resumed run's folder
        raise OutputDirError(
            f"--output-dir {output_dir}",
            f"holds another run ({names}) than --resume {resume}, which continues the run of "
            f"{resumed_dir}; give --output-dir {resumed_dir} (or an empty folder)",
        )
    if files and not overwrite:
        last = os.path.join(output_dir, RUN_FILES[0])
        hint = f"--resume {last} to continue it, " if last in files else ""
        raise OutputDirError(
            f"--output-dir {output_dir}",
            f"holds another run ({names}); pass {hint}--overwrite to replace it, or another --output-dir",
        )
    return files if overwrite else []


@dataclass
class OutputClaim:
    """A run's hold on its folder: the lock (released by :meth:`release` or the process's end)
    and the files ``--overwrite`` is to remove when training starts."""

    output_dir: str
    run_id: str
    overwritten: list[str]
    _lock_fd: int | None = None

    def release(self) -> None:
        if self._lock_fd is not None:
            os.close(self._lock_fd)  # closing the descriptor drops the flock
            self._lock_fd = None


def claim_output_dir(
    output_dir: str, resume: str | None, overwrite: bool, command: str = "train"
) -> OutputClaim:
    """Lock ``output_dir`` for this run, check it (:func:`check_output_dir`), remove stray
    ``*.tmp`` files and write ``icd_run.json``; OutputDirError when it is locked by a live run,
    holds another run, or cannot be written."""
    check_output_dir(output_dir, resume, overwrite, command)  # before creating anything
    fd = _lock(output_dir, command)
    try:
        overwritten = check_output_dir(output_dir, resume, overwrite, command)  # again, under the lock
        _remove_stray_tmp(output_dir)
        resumed = read_identity(os.path.dirname(os.path.abspath(resume))) if resume else None
        run_id = resumed["run_id"] if resumed else uuid.uuid4().hex
        _write_identity(output_dir, {"run_id": run_id, "command": command, "created": round(time.time(), 3)})
    except BaseException:
        os.close(fd)
        raise
    return OutputClaim(output_dir, run_id, overwritten, fd)


def _lock(output_dir: str, command: str) -> int:
    path = os.path.join(output_dir, LOCK_FILE)
    try:
        os.makedirs(output_dir, exist_ok=True)
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    except OSError as err:
        raise OutputDirError(f"--output-dir {output_dir}", f"is not writable: {err.strerror or err}") from None
    if fcntl is None:
        return fd
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        holder = os.read(fd, 4096).decode("utf-8", "replace").strip() or "another process"
        os.close(fd)
        raise OutputDirError(
            f"--output-dir {output_dir}",
            f"is in use by another live icd run ({holder}); wait for it, or choose another --output-dir",
        ) from None
    try:
        os.ftruncate(fd, 0)
        os.write(fd, f"icd {command}, pid {os.getpid()} on {socket.gethostname()}".encode())
    except OSError as err:
        os.close(fd)
        raise OutputDirError(f"--output-dir {output_dir}", f"is not writable: {err.strerror or err}") from None
    return fd


def lock_holder(output_dir: str) -> str | None:
    """Who holds ``output_dir``'s lock (a live run's "icd train, pid ..."), or None when no live
    run does (no lock file, or its flock is free). Reads only; takes the lock for an instant."""
    path = os.path.join(output_dir, LOCK_FILE)
    if fcntl is None or not os.path.isfile(path):
        return None
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        return os.read(fd, 4096).decode("utf-8", "replace").strip() or "another process"
    finally:
        os.close(fd)  # closing drops the flock, if taken
    return None


def _remove_stray_tmp(output_dir: str) -> None:
    """The temporary files of a writer killed before its rename (the lock says none is live)."""
    stray = []
    for pattern in TMP_PATTERNS:
        stray += glob.glob(os.path.join(glob.escape(output_dir), pattern))
    for path in sorted(stray):
        try:
            os.remove(path)
        except FileNotFoundError:
            continue
        log.warning("removed %s, left by a writer that was interrupted", path)


def _write_identity(output_dir: str, identity: dict) -> None:
    path = os.path.join(output_dir, IDENTITY_FILE)
    tmp = f"{path}.tmp"
    try:
        with open(tmp, "w", encoding="utf-8") as f:
            json.dump(identity, f)
        os.replace(tmp, path)
    except OSError as err:
        try:
            os.remove(tmp)
        except OSError:
            pass
        raise OutputDirError(f"--output-dir {output_dir}", f"is not writable: {err.strerror or err}") from None


def probe_writable(output_dir: str) -> None:
    """Create ``output_dir`` and a file in it, then remove both: OutputDirError when that fails.

    Leaves no trace: the folders it had to create are removed again (the writers create them when
    they write), so a command refused later leaves no empty ``output/`` behind.
    """
    created = []
    folder = os.path.abspath(output_dir)
    while not os.path.exists(folder) and os.path.dirname(folder) != folder:
        created.append(folder)
        folder = os.path.dirname(folder)
    path = os.path.join(output_dir, f".icd_write_probe.{os.getpid()}")
    try:
        os.makedirs(output_dir, exist_ok=True)
        with open(path, "wb") as f:
            f.write(b"probe")
        os.remove(path)
    except OSError as err:
        raise OutputDirError(f"--output-dir {output_dir}", f"is not writable: {err.strerror or err}") from None
    finally:
        for folder in created:  # deepest first; one another process filled meanwhile stays
            try:
                os.rmdir(folder)
            except OSError:
                break


def remove_previous_run(files: list[str]) -> None:
    """Delete the files of the run --overwrite replaces (missing ones are fine)."""
    for path in files:
        try:
            os.remove(path)
        except FileNotFoundError:
            pass
