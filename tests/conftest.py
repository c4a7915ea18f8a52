"""Test set-up shared by every test module.

Without a GPU the Triton kernels run under Triton's interpreter on CPU tensors; it must be
switched on before triton is first imported, so this happens here, at collection time.
"""

from __future__ import annotations

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)
