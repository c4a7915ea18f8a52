"""Test set-up shared by every test module.

Without a GPU the Triton kernels run under Triton's interpreter on CPU tensors; it must be
switched on before triton is first imported, so this happens here, at collection time. Under
pytest-xdist each worker uses its share of the cores. Compile caches (TorchInductor, Triton) and
the temporary files of the processes tests start (torchrun's among them) go to one folder per
run, removed at its end.
"""

from __future__ import annotations

import os
import shutil
import tempfile

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

# under pytest-xdist the workers share the cores: each takes its part for torch's intra-op threads
# (and the processes its tests start inherit it), rather than all of them each
_workers = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
if _workers > 1:
    _threads = str(max(1, (os.cpu_count() or 1) // _workers))
    os.environ.setdefault("OMP_NUM_THREADS", _threads)
    torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))

import pytest  # noqa: E402

_RUN_FOLDER = "ICD_TEST_RUN_TMP"


def pytest_configure(config) -> None:
    if os.environ.get(_RUN_FOLDER):  # an xdist worker: its controller made the folder
        return
    tempfile.gettempdir()  # this process (pytest's tmp_path, kept for failed tests) stays where it was
    folder = tempfile.mkdtemp(prefix="icd-tests-")
    config._icd_run_folder = folder
    os.environ[_RUN_FOLDER] = folder
    # TorchInductor's default is <tmp>/torchinductor_<user> and Triton's ~/.triton/cache: both outlive
    # the run (100s of MB); children (xdist workers, torchrun, icd subprocesses) put their temp files here
    os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", os.path.join(folder, "torchinductor"))
    os.environ.setdefault("TRITON_CACHE_DIR", os.path.join(folder, "triton"))
    os.environ["TMPDIR"] = folder


def pytest_unconfigure(config) -> None:
    folder = getattr(config, "_icd_run_folder", None)
    if folder:
        shutil.rmtree(folder, ignore_errors=True)


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> str:
    """A shapes dataset of 4 + 2 images of 64 px, one per test module that asks for it (a module's
    own ``data`` fixture wins)."""
    from user_errors import tiny_shapes

    return tiny_shapes(tmp_path_factory.mktemp("shapes"))


@pytest.fixture(scope="module")
def finished_run(data, tmp_path_factory) -> str:
    """A plain one-iteration run on ``data``: its checkpoint and metrics (also a teacher)."""
    from user_errors import one_iteration_run

    return one_iteration_run(data, tmp_path_factory.mktemp("run"))
