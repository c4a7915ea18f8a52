"""The trainer's GPU paths, run on the CPU at toy size: float16 autocast with GradScaler,
torch.compile, the CUDA-graph flag's refusals, the step that reads nothing on the host, the
resume of a scaled run, and benchmarks/run_training.py."""

from __future__ import annotations

import csv
import os
import sys

import pytest
import torch
from tiny_runs import ON_CPU, THREE_LEVELS, TINY_MODEL
from user_errors import error_line

import icd
from icd.cli import build_parser, main
from icd.detection.models import DetectorSpec, build_detector
from icd.engine import trainer as trainer_module
from icd.engine.checkpoint import load_checkpoint, save_atomic
from icd.engine.run_config import RunConfig
from icd.engine.speed import check_speed_flags
from icd.errors import ConfigError, NonFiniteError

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RUN = f"{TINY_MODEL} {THREE_LEVELS} {ON_CPU} --epoch-checkpoint-every 0 --no-eval --batch-size 2"
ICD_DIR = os.path.dirname(os.path.abspath(icd.__file__))


@pytest.fixture(scope="module")
def teacher(tmp_path_factory) -> str:
    """A RetinaNet R18 with the student's FPN width and levels (random weights: a timing teacher)."""
    spec = DetectorSpec("retinanet", "resnet18", num_classes=7, fpn_channels=32, norm="gn", min_level=3,
                        max_level=5, min_size=(64,), max_size=64)  # fmt: skip
    torch.manual_seed(3)
    path = str(tmp_path_factory.mktemp("teacher") / "teacher.pth")
    save_atomic({"model": build_detector(spec).state_dict(), "detector_spec": spec.to_dict()}, path)
    return path


def _trainer(data: str, out, extra: str = "") -> trainer_module.Trainer:
    argv = f"train --data-path {data} {RUN} --iters 8 --output-dir {out} {extra}".split()
    return trainer_module.Trainer(build_parser(commands=("train",)).parse_args(argv))


def _batch(trainer, first: int = 0):
    images, targets = zip(*(trainer.train_set[i] for i in range(first, first + 2)), strict=True)
    return list(images), list(targets)


# -- float16 + GradScaler -------------------------------------------------------------------------
def test_float16_steps_scale_the_loss_and_a_non_finite_loss_still_stops_the_run(data, teacher, tmp_path, monkeypatch):
    trainer = _trainer(data, tmp_path / "r", f"--amp --amp-dtype float16 --teacher {teacher} --distill icd")
    try:
        assert isinstance(trainer.scaler, torch.amp.GradScaler) and trainer.scaler.is_enabled()
        seen = []
        real_autocast = torch.autocast

        def watched(*args, **kwargs):
            seen.append(kwargs.get("dtype"))
            return real_autocast(*args, **kwargs)

        monkeypatch.setattr(torch, "autocast", watched)
        before = trainer.scaler.state_dict()
        trainer.step(*_batch(trainer))
        monkeypatch.undo()
        assert seen and set(seen) == {torch.float16}
        records = trainer.read_losses()
        assert [it for it, _ in records] == [1]
        assert all(torch.isfinite(torch.tensor(list(r.values()))).all() for _, r in records)
        assert trainer.scaler.state_dict() != before  # the scaler took part in the steps

        real_losses = trainer._losses

        def nan_distill(*args):
            losses = real_losses(*args)
            losses["distill"] = losses["distill"] * float("nan")
            return losses

        monkeypatch.setattr(trainer, "_losses", nan_distill)
        trainer.step(*_batch(trainer, 2))  # nothing read on the host: it goes on ...
        assert trainer.iteration == 2
        with pytest.raises(NonFiniteError, match=r"non-finite loss at iteration 2: loss_distill = nan"):
            trainer.read_losses()  # ... and stops when the losses are read
        # the scaler found the NaN gradients and skipped both optimisers' steps: the weights stay finite
        assert bool(trainer._params_finite)
    finally:
        trainer.close()


def test_a_non_finite_loss_stops_the_loop_at_the_next_read_without_a_checkpoint(data, tmp_path, monkeypatch, capsys):
    real_losses = trainer_module.Trainer._losses

    def nan_at_two(self, *args):
        losses = real_losses(self, *args)
        if self.iteration == 1:  # the second step
            losses["classification"] = losses["classification"] * float("inf")
        return losses

    monkeypatch.setattr(trainer_module.Trainer, "_losses", nan_at_two)
    out = tmp_path / "r"
    argv = f"train --data-path {data} {RUN} --iters 6 --print-freq 3 --checkpoint-every 3 --output-dir {out}"
    assert main(argv.split()) == 1
    line = capsys.readouterr().err.strip().splitlines()[-1]
    assert "non-finite loss at iteration 2: loss_classification = inf" in line
    assert not os.path.exists(out / "checkpoint.pth")


def test_amp_dtype_and_compile_backend_need_their_switch(data, tmp_path, capsys):
    assert main(f"train --data-path {data} {RUN} --amp-dtype float16 --output-dir {tmp_path / 'r'}".split()) == 2
    assert error_line(capsys) == "icd: error: --amp-dtype float16: needs --amp (without it the run is in float32)"
    assert main(f"train --data-path {data} {RUN} --compile-backend eager --output-dir {tmp_path / 'r'}".split()) == 2
    assert error_line(capsys) == "icd: error: --compile-backend eager: needs --compile"
    trainer = _trainer(data, tmp_path / "b", "--amp --amp-dtype bfloat16")
    try:
        assert trainer.scaler is None  # bfloat16 needs no loss scaling
    finally:
        trainer.close()


# -- torch.compile and CUDA graphs ----------------------------------------------------------------
def test_compile_trains_two_steps(data, teacher, tmp_path):
    # aot_eager traces forward and backward as inductor does, without generating C++: inductor took
    # minutes on 2 shared cores for these graphs (docs/training.md, On a GPU)
    trainer = _trainer(data, tmp_path / "r", "--compile --compile-backend aot_eager")
    try:
        assert trainer.model.backbone.body._compiled_call_impl is not None
        assert trainer.model.backbone.fpn._compiled_call_impl is not None
        keys = set(trainer.model.state_dict())
        trainer.step(*_batch(trainer))
        trainer.step(*_batch(trainer, 2))
        assert [it for it, _ in trainer.read_losses()] == [1, 2]
        assert set(trainer.model.state_dict()) == keys  # checkpoints keep their keys
    finally:
        trainer.close()
    extra = f"--compile --compile-backend aot_eager --teacher {teacher} --distill icd --icd-static-shapes"
    trainer = _trainer(data, tmp_path / "d", extra)  # with distillation: the teacher and the distiller too
    try:
        assert trainer.teacher.backbone.body._compiled_call_impl is not None
        assert trainer.distiller._compiled_call_impl is not None  # its compiled steps: tests/test_nn_static.py
    finally:
        trainer.close()


def test_a_code_generation_failure_is_one_line_naming_compile(data, tmp_path, monkeypatch):
    from torch._dynamo.exc import BackendCompilerFailed

    trainer = _trainer(data, tmp_path / "r", "--compile --compile-backend eager")
    try:
        def failing(*args):
            raise BackendCompilerFailed(lambda *a: None, RuntimeError("cc1plus: out of memory\nmore"), None)

        monkeypatch.setattr(trainer, "_losses", failing)
        with pytest.raises(ConfigError, match=r"^--compile \(--compile-backend eager\): torch.compile failed to "
                                              r"compile the model: RuntimeError: cc1plus: out of memory; run "
                                              r"without --compile"):  # fmt: skip
            trainer.step(*_batch(trainer))
    finally:
        trainer.close()


def _check_speed_flags(args, device: torch.device) -> None:
    config = RunConfig.from_args(args, "train")
    check_speed_flags(config.speed, config.distill, device)


def test_cuda_graphs_are_refused_with_one_line(data, teacher, tmp_path, capsys):
    base = f"train --data-path {data} {RUN} --teacher {teacher} --output-dir {tmp_path / 'r'}"
    assert main(f"{base} --icd-static-shapes --icd-cuda-graphs".split()) == 2
    assert error_line(capsys) == ("icd: error: --icd-cuda-graphs: CUDA graphs need a CUDA --device; "
                                  "this run is on cpu")  # fmt: skip
    args = build_parser(commands=("train",)).parse_args(f"{base} --icd-cuda-graphs".split())
    with pytest.raises(ConfigError, match=r"^--icd-cuda-graphs: needs --icd-static-shapes"):
        _check_speed_flags(args, torch.device("cuda"))  # the order of the checks on a GPU machine
    args = build_parser(commands=("train",)).parse_args(f"{base} --distill fpn-mse --icd-cuda-graphs".split())
    with pytest.raises(ConfigError, match=r"^--icd-cuda-graphs: graphs ICD's distiller; --distill is fpn-mse"):
        _check_speed_flags(args, torch.device("cuda"))


def test_compile_without_a_compiler_is_refused_with_one_line(data, tmp_path, capsys, monkeypatch):
    monkeypatch.setattr("shutil.which", lambda name: None)
    assert main(f"train --data-path {data} {RUN} --compile --output-dir {tmp_path / 'r'}".split()) == 2
    line = error_line(capsys)
    assert line.startswith("icd: error: --compile (--compile-backend inductor): inductor needs a C++ compiler")


# -- no host synchronisation inside a step --------------------------------------------------------
HOST_READS = ("item", "tolist", "cpu", "numpy", "__bool__", "__float__", "__int__", "__index__")


def test_a_step_reads_nothing_on_the_host_from_icds_code(data, teacher, tmp_path, monkeypatch):
    """What torch.cuda.set_sync_debug_mode("error") checks on a GPU, counted on the CPU: the reads
    of tensor values on the host (each one a synchronisation on CUDA) made by icd's code during
    steps, with value checks off as they are for CUDA tensors; the losses' read is the one."""
    monkeypatch.setenv("ICD_CHECKS", "off")
    trainer = _trainer(data, tmp_path / "r", f"--teacher {teacher} --distill icd")
    calls: list[str] = []
    try:
        trainer.step(*_batch(trainer))  # the first step builds lazily; counted below are the next

        def counting(name):
            real = getattr(torch.Tensor, name)

            def read(self, *args, **kwargs):
                caller = sys._getframe(1).f_code.co_filename
                if os.path.abspath(caller).startswith(ICD_DIR):
                    calls.append(f"{name} at {os.path.relpath(caller, ICD_DIR)}:{sys._getframe(1).f_lineno}")
                return real(self, *args, **kwargs)

            return read

        for name in HOST_READS:
            monkeypatch.setattr(torch.Tensor, name, counting(name))
        for first in (2, 0):
            trainer.step(*_batch(trainer, first))
        assert calls == []
        records = trainer.read_losses()  # the read every --print-freq steps
        assert len(calls) >= 1 and all("loop.py" in c for c in calls)  # Loop.read_losses
        monkeypatch.undo()
        assert [it for it, _ in records] == [1, 2, 3]
    finally:
        trainer.close()


# -- resume of a float16 run ----------------------------------------------------------------------
def test_resume_restores_the_grad_scaler(data, tmp_path):
    out = tmp_path / "r"
    argv = f"train --data-path {data} {RUN} --amp --amp-dtype float16 --iters 3 --output-dir {out}".split()
    assert main([*argv, "--stop-after-iters", "1"]) == 0
    saved = load_checkpoint(out / "checkpoint.pth")["scaler"]
    fresh = torch.amp.GradScaler("cpu").state_dict()
    assert saved != fresh  # a step changed it (growth tracker or scale)
    resumed = trainer_module.Trainer(
        build_parser(commands=("train",)).parse_args([*argv, "--resume", str(out / "checkpoint.pth")])
    )
    try:
        assert resumed.scaler.state_dict() == saved
    finally:
        resumed.close()
    # a resumed run may change the autocast type: bfloat16 has no scaler to restore
    resumed = trainer_module.Trainer(
        build_parser(commands=("train",)).parse_args(
            [*argv, "--amp-dtype", "bfloat16", "--resume", str(out / "checkpoint.pth")]
        )
    )
    try:
        assert resumed.scaler is None and resumed.iteration == 1
    finally:
        resumed.close()


def test_speed_flags_may_change_on_resume_and_distillation_flags_may_not(data, teacher, tmp_path):
    from icd.engine.resume_settings import check_resume_compatible

    base = f"train --data-path {data} {RUN} --teacher {teacher} --output-dir {tmp_path}"
    saved = build_parser(commands=("train",)).parse_args(
        f"{base} --amp --amp-dtype float16 --compile --icd-static-shapes --icd-cuda-graphs".split()
    )
    ckpt = {k: {} for k in ("model", "optimizer", "lr_scheduler", "rng")} | {"epoch": 0, "iteration": 1}
    ckpt["args"] = vars(saved)
    now = build_parser(commands=("train",)).parse_args(f"{base} --icd-static-shapes".split())
    # no --amp, --compile, CUDA graphs: accepted
    check_resume_compatible(ckpt, "c.pth", RunConfig.from_args(now, "train"), {}, 1, 4)
    now = build_parser(commands=("train",)).parse_args(base.split())
    with pytest.raises(ConfigError, match=r"--icd-static-shapes True there, False here"):
        check_resume_compatible(ckpt, "c.pth", RunConfig.from_args(now, "train"), {}, 1, 4)


def test_torchrun_of_one_process_joins_the_process_group(monkeypatch):
    """torchrun --nproc_per_node 1 runs the path of a larger job (nccl on CUDA, gloo here)."""
    import socket

    import torch.distributed as dist

    from icd.engine.distributed import cleanup, init_distributed

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {"TORCHELASTIC_RUN_ID": "t", "RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "1",
           "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)}  # fmt: skip
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    info = init_distributed("cpu")
    try:
        assert info.distributed and info.world_size == 1 and dist.get_backend() == "gloo"
    finally:
        cleanup(info)
    monkeypatch.delenv("TORCHELASTIC_RUN_ID")  # a plain process with WORLD_SIZE=1: no group
    assert not init_distributed("cpu").distributed and not dist.is_initialized()


# -- benchmarks/run_training.py -------------------------------------------------------------------
def _run_training():
    sys.path.insert(0, os.path.join(ROOT, "benchmarks"))
    try:
        import run_training
    finally:
        sys.path.pop(0)
    return run_training


def test_run_training_tiny_writes_its_table(tmp_path):
    run_training = _run_training()
    out = tmp_path / "bench"
    # one configuration (each is a process that builds its trainer): the sweep's machinery, not timings
    assert run_training.main(["--device", "cpu", "--tiny", "--out", str(out), "--only", "icd fp32"]) == 0
    with open(out / "training.csv") as f:
        rows = list(csv.DictReader(f))
    assert [r["config"] for r in rows] == ["icd fp32"]
    assert rows[0]["status"] == "ok" and float(rows[0]["median_ms"]) > 0 and float(rows[0]["images_per_s"]) > 0
    assert rows[0]["icd_ratio"] == ""  # no student-only run to divide by
    table = (out / "training.md").read_text()
    assert "| icd fp32 | ok |" in table
    assert not [p for p in os.listdir(out) if p.startswith("work-")]  # its data and runs are removed


def test_run_training_runs_the_wanted_configurations_first_and_keeps_to_its_budget(tmp_path):
    run_training = _run_training()
    names = [c.name for c in run_training.configurations()]
    assert len(names) == len(set(names)) == 11
    # what a short GPU stage must get: ICD's ratio to the student in bf16, then its CUDA-graph path
    assert names[:3] == ["none bf16", "icd bf16", "icd bf16 static+graphs"] and names[-1] == "icd bf16 compile"
    out = tmp_path / "bench"
    # a budget below one configuration's minimum starts none of them, and says so in the table
    assert run_training.main(["--device", "cpu", "--tiny", "--out", str(out), "--only", "icd fp32,none fp32",
                              "--budget", "1"]) == 1  # fmt: skip
    with open(out / "training.csv") as f:
        rows = list(csv.DictReader(f))
    assert [(r["config"], r["status"]) for r in rows] == [("none fp32", "skipped"), ("icd fp32", "skipped")]
