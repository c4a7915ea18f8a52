"""Atomic checkpoint writes, RNG capture/restore, weights_only loading."""

from __future__ import annotations

import os
import random

import numpy as np
import torch

from icd.engine.checkpoint import capture_rng_state, load_checkpoint, restore_rng_state, save_atomic


def test_rng_states_round_trip_through_a_weights_only_checkpoint(tmp_path):
    random.seed(1)
    np.random.seed(2)
    torch.manual_seed(3)
    np.random.normal()  # leaves a cached gaussian in numpy's state
    path = str(tmp_path / "ck.pth")
    save_atomic({"rng": capture_rng_state(), "args": {"lr": 0.1, "min_size": [800]}}, path)
    want = (random.random(), float(np.random.normal()), np.random.rand(3).tolist(), torch.rand(4))
    random.seed(9)
    np.random.seed(9)
    torch.manual_seed(9)
    ckpt = load_checkpoint(path)  # weights_only=True
    restore_rng_state(ckpt["rng"])
    got = (random.random(), float(np.random.normal()), np.random.rand(3).tolist(), torch.rand(4))
    assert got[:3] == want[:3] and torch.equal(got[3], want[3])
    assert ckpt["args"] == {"lr": 0.1, "min_size": [800]}


def test_save_is_atomic(tmp_path, monkeypatch):
    path = str(tmp_path / "ck.pth")
    save_atomic({"iteration": 1}, path)

    def broken_save(obj, f):
        f.write(b"half a checkpoint")
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", broken_save)
    try:
        save_atomic({"iteration": 2}, path)
    except OSError:
        pass
    assert load_checkpoint(path)["iteration"] == 1  # the old file is intact
    assert sorted(os.listdir(tmp_path)) == ["ck.pth"]  # the failed write's .tmp is removed
