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
    detector_spec        the architecture (icd.detection.DetectorSpec as a dict)
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

import os
import pickle
import random
from typing import Any

import numpy as np
import torch

from icd.errors import ConfigError


def save_atomic(obj: Any, path: str) -> None:
    """torch.save to ``path.tmp`` then os.replace: a reader sees the old file or the new one."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = f"{path}.tmp"
    with open(tmp, "wb") as f:
        torch.save(obj, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def load_checkpoint(path: str) -> dict:
    """The dict saved at ``path`` (weights_only); ConfigError when the file is no torch checkpoint."""
    if os.path.isdir(path):
        raise ConfigError(f"{path} is a directory; expected a checkpoint file (e.g. {path}/checkpoint.pth)")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise FileNotFoundError(f"no checkpoint file {path}") from None
    except (pickle.UnpicklingError, RuntimeError, EOFError, ValueError) as err:
        raise ConfigError(
            f"{path} is not a readable torch checkpoint ({type(err).__name__}); expected a file written by "
            "icd train or torch.save (tensors, numbers, strings, lists, dicts)"
        ) from None
    if not isinstance(ckpt, dict):
        raise ConfigError(f"{path} holds a {type(ckpt).__name__}; expected a checkpoint dict or a state dict")
    return ckpt


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
