"""Checkpoints: atomic writes, RNG state capture, and loading with ``weights_only=True``.

A checkpoint is a plain dict (torchvision's references/detection layout plus what an exact
resume needs)::

    model, optimizer, lr_scheduler, epoch, args            (torchvision's keys; see epoch)
    epoch                the epoch to continue with (= epochs completed when epoch_batches is 0;
                         torchvision stores the last completed epoch instead)
    iteration            optimiser steps done so far (the next step is iteration + 1)
    epoch_batches        batches of ``epoch`` already consumed (the data order position; all of
                         them when written at the epoch's last batch, before its end: a resume
                         then does that epoch's end first, see icd.engine.batches.EpochBatches)
    detector_spec        the architecture: its detector family's spec as a dict, with "family"
                         (icd.detection.adapters; absent in older files: torchvision's DetectorSpec)
    categories           [{"id", "name"}] of the training data's categories in label order: the
                         class names (icd.engine.run_spec.checkpoint_categories reads them;
                         checkpoints written before they were saved have none)
    distiller, teacher_optimizer, teacher_lr_scheduler    (distillation runs)
    scaler               AMP GradScaler state (CUDA float16 runs)
    rng                  python, numpy, torch (and cuda) generator states

Everything is tensors, numbers, strings, lists and dicts, so ``torch.load(weights_only=True)``
reads it back.
"""

from __future__ import annotations

import contextlib
import os
import pickle
import random
import warnings
from typing import Any

import numpy as np
import torch

from icd.errors import CheckpointError, OutputDirError


def save_atomic(obj: Any, path: str) -> None:
    """torch.save to ``path.tmp`` then os.replace: a reader sees the old file or the new one.

    A write that fails (a full disk, a file-size limit, a folder gone) removes its ``.tmp`` and
    raises OutputDirError naming the file; the old file stays as it was.
    """
    folder = os.path.dirname(os.path.abspath(path))
    tmp = f"{path}.tmp"
    writer = _RecordingWriter()
    try:
        os.makedirs(folder, exist_ok=True)
        with open(tmp, "wb") as f:
            writer.file = f
            torch.save(obj, writer)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except (OSError, RuntimeError) as err:  # torch's zip writer turns a failed write into a RuntimeError
        with contextlib.suppress(OSError):
            os.remove(tmp)
        cause = err if isinstance(err, OSError) else writer.error or err
        reason = cause.strerror if isinstance(cause, OSError) and cause.strerror else _first_line(cause)
        raise OutputDirError(
            path, f"could not be written ({reason}); the previous file, if any, is unchanged"
        ) from None


class _RecordingWriter:
    """A file's ``write`` for torch.save that keeps the OSError of a failed write (a full disk, a
    file-size limit), which torch's zip writer reports only as "unexpected pos"."""

    def __init__(self) -> None:
        self.file, self.error = None, None

    def write(self, data) -> int:
        try:
            return self.file.write(data)
        except OSError as err:
            self.error = err
            raise

    def flush(self) -> None:
        self.file.flush()


def _first_line(err: BaseException) -> str:
    text = str(err).strip().splitlines()
    return f"{type(err).__name__}: {text[0]}" if text else type(err).__name__


def load_checkpoint(path: str, flag: str | None = None) -> dict:
    """The dict saved at ``path`` (``weights_only``: tensors, numbers, strings, lists, dicts).

    Whatever the file holds, the only errors are one line naming ``flag`` (e.g. ``"--teacher"``)
    and the file: FileNotFoundError when it is missing, CheckpointError when it is a folder, no
    torch checkpoint (text, random or truncated bytes, an empty file), a pickle of other Python
    objects (never run: ``weights_only``), or no dict.
    """
    where = f"{flag} {path}" if flag else path
    if os.path.isdir(path):
        raise CheckpointError(where, f"is a directory; expected a checkpoint file (e.g. {path}/checkpoint.pth)")
    if not os.path.exists(path):
        raise FileNotFoundError(f"{where}: no checkpoint file {path}")
    try:
        with warnings.catch_warnings():  # garbage read as a pickle of some protocol: the error says it
            warnings.filterwarnings("ignore", message="Detected pickle protocol")
            ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        blocked = "unsupported global" in str(err).lower()  # a real pickle of other objects, not garbage
        raise CheckpointError(
            where,
            "holds Python objects other than tensors, numbers, strings, lists and dicts; they were "
            "not loaded (weights_only). Re-save its state dicts with torch.save"
            if blocked
            else f"is not a readable torch checkpoint ({_first_line(err)})",
        ) from None
    except MemoryError:
        raise CheckpointError(where, "is not a readable torch checkpoint (it asks for more memory than there is)") \
            from None
    except Exception as err:  # noqa: BLE001 - a user's file: any failure of the reader is the file's
        raise CheckpointError(
            where,
            f"is not a readable torch checkpoint ({_first_line(err)}); expected a file written by icd or "
            "torch.save (is it truncated, or another format?)",
        ) from None
    if not isinstance(ckpt, dict):
        raise CheckpointError(where, f"holds a {type(ckpt).__name__}; expected a checkpoint dict or a state dict")
    return ckpt


def state_dict_entry(ckpt: dict, flag: str, path: str, key: str = "model") -> dict:
    """``ckpt[key]`` when it is there (an icd or torchvision checkpoint), else ``ckpt`` itself (a
    bare state dict), checked to map names to tensors: CheckpointError naming the file otherwise."""
    state = ckpt[key] if isinstance(ckpt.get(key), dict) else ckpt
    bad = next(((k, v) for k, v in state.items() if not (isinstance(k, str) and isinstance(v, torch.Tensor))), None)
    if bad is not None:
        what = f"its '{key}' entry" if state is not ckpt else "it"
        raise CheckpointError(
            f"{flag} {path}",
            f"is no state dict: {what} maps {bad[0]!r} to a {type(bad[1]).__name__}; expected tensors "
            "(an icd train checkpoint, or a model's state_dict())",
        )
    return state


def capture_rng_state() -> dict:
    """Python, numpy, torch (and CUDA) RNG states as weights_only-loadable values."""
    py_version, py_state, py_gauss = random.getstate()
    np_name, np_keys, np_pos, np_has_gauss, np_gauss = np.random.get_state()
    state = {
        "python": [py_version, list(py_state), py_gauss],
        "numpy": [
            np_name,
            torch.from_numpy(np_keys.astype(np.int64)),
            int(np_pos),
            int(np_has_gauss),
            float(np_gauss),
        ],
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng_state(state: dict) -> None:
    py_version, py_state, py_gauss = state["python"]
    random.setstate((py_version, tuple(py_state), py_gauss))
    np_name, np_keys, np_pos, np_has_gauss, np_gauss = state["numpy"]
    np.random.set_state(
        (np_name, np_keys.numpy().astype(np.uint32), np_pos, np_has_gauss, np_gauss)
    )
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
