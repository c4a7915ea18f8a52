"""The one training loop (icd.engine.loop): hooks of the caller's in icd train and icd pretrain
runs, and the engine's modules importing each other in one direction only."""

from __future__ import annotations

import ast
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from tiny_runs import ON_CPU, THREE_LEVELS, TINY

from icd.cli import build_parser, main
from icd.data.shapes import generate
from icd.detection.models import DetectorSpec, build_detector
from icd.engine.checkpoint import load_checkpoint, save_atomic
from icd.engine.hooks import HealthCheck, PeriodicCheckpoint, TrainMetrics
from icd.engine.loop import EpochEnd, Hook, Loop
from icd.engine.run_config import RunConfig
from icd.errors import ArgumentError

ENGINE = Path(__file__).resolve().parents[1] / "icd" / "engine"


# -- the import graph ------------------------------------------------------------------------------
def engine_imports() -> dict[str, set[str]]:
    """Each icd.engine module's imports of other icd.engine modules, wherever they are written (at
    the top, inside functions, under TYPE_CHECKING): a circle through any of them is one."""
    names = {f"icd.engine.{p.stem}" for p in ENGINE.glob("*.py")}
    graph = {}
    for path in ENGINE.glob("*.py"):
        found = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module == "icd.engine":
                found |= {f"icd.engine.{alias.name}" for alias in node.names}
            elif isinstance(node, ast.ImportFrom) and node.module:
                found.add(node.module)
            elif isinstance(node, ast.Import):
                found |= {alias.name for alias in node.names}
        graph[f"icd.engine.{path.stem}"] = found & names - {f"icd.engine.{path.stem}"}
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One circle of ``graph`` as [a, b, ..., a], or None (depth-first search)."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return path[path.index(nxt):] + [nxt]
            if nxt not in state and (cycle := visit(nxt)) is not None:
                return cycle
        path.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (cycle := visit(node)) is not None:
            return cycle
    return None


def test_the_cycle_finder_finds_the_circle_the_engine_had():
    before = {  # issue 31: pretrain imported trainer, trainer pretrain, hooks trainer (type-only)
        "icd.engine.trainer": {"icd.engine.hooks", "icd.engine.pretrain"},
        "icd.engine.pretrain": {"icd.engine.trainer"},
        "icd.engine.hooks": {"icd.engine.trainer"},
    }
    assert find_cycle(before) in (["icd.engine.hooks", "icd.engine.trainer", "icd.engine.hooks"],
                                  ["icd.engine.pretrain", "icd.engine.trainer", "icd.engine.pretrain"])  # fmt: skip
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": set()}) is None


def test_the_engine_modules_import_each_other_in_one_direction():
    graph = engine_imports()
    assert "icd.engine.loop" in graph["icd.engine.hooks"] and "icd.engine.loop" in graph["icd.engine.pretrain"]
    assert "icd.engine.trainer" not in graph["icd.engine.pretrain"] | graph["icd.engine.hooks"]
    assert find_cycle(graph) is None, " -> ".join(find_cycle(graph))


def test_hooks_and_pretrain_import_alone_without_the_trainer():
    code = (
        "import sys\n"
        "import icd.engine.loop, icd.engine.hooks, icd.engine.pretrain\n"
        "assert 'icd.engine.trainer' not in sys.modules, 'the trainer was imported'\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr


# -- hooks of the caller's -------------------------------------------------------------------------
class Recorder(Hook):
    """Writes what it is called with into a shared list, under its name."""

    def __init__(self, name: str, calls: list) -> None:
        self.name, self.calls = name, calls

    def after_step(self, loop: Loop) -> None:
        self.calls.append((self.name, "step", loop.iteration))

    def after_losses(self, loop: Loop, iteration: int, record: dict[str, float]) -> None:
        self.calls.append((self.name, "losses", iteration))
        assert all(torch.isfinite(torch.tensor(v)) for v in record.values()) and "loss" in record

    def after_epoch(self, loop: Loop, end: EpochEnd) -> None:
        # the loop's own hooks ran first: at a stop the checkpoint of this very iteration is written
        saved = load_checkpoint(os.path.join(loop.config.loop.output_dir, "checkpoint.pth"))["iteration"]
        self.calls.append((self.name, "epoch", end.epoch, end.finished, end.stopped, saved))


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    out = str(tmp_path_factory.mktemp("loop") / "data")
    generate(out, num_train=4, num_val=2, image_size=64, seed=2)
    return out


def test_a_callers_hooks_run_after_the_trainers_in_the_order_given(data, tmp_path):
    from icd.engine.trainer import Trainer

    calls: list = []
    argv = (f"train --data-path {data} {TINY} {THREE_LEVELS} --batch-size 2 --iters 3 --print-freq 2 --no-eval "
            f"--output-dir {tmp_path / 'run'}")  # fmt: skip
    trainer = Trainer(build_parser(commands=("train",)).parse_args(argv.split()), hooks=[Recorder("a", calls)])
    trainer.register_hook(Recorder("b", calls))
    try:
        trainer.run()
        kinds = [type(h) for h in trainer.hooks]
    finally:
        trainer.close()
    assert kinds == [HealthCheck, TrainMetrics, PeriodicCheckpoint, Recorder, Recorder]
    saved = load_checkpoint(str(tmp_path / "run" / "checkpoint.pth"))  # the loop's settings, typed, saved
    assert RunConfig.from_checkpoint(saved, "run", "train") == trainer.config and not trainer.config.hooks.evaluate
    # 2 batches per epoch; losses read every 2 steps and at the last; epoch 1 stopped after 1 batch
    assert calls == [
        ("a", "step", 1), ("b", "step", 1),
        ("a", "losses", 1), ("b", "losses", 1), ("a", "losses", 2), ("b", "losses", 2),
        ("a", "step", 2), ("b", "step", 2),
        ("a", "epoch", 0, True, False, 2), ("b", "epoch", 0, True, False, 2),
        ("a", "losses", 3), ("b", "losses", 3), ("a", "step", 3), ("b", "step", 3),
        ("a", "epoch", 1, False, True, 3), ("b", "epoch", 1, False, True, 3),
    ]  # fmt: skip


@pytest.fixture(scope="module")
def teacher(tmp_path_factory):
    torch.manual_seed(0)
    spec = DetectorSpec("fcos", "resnet18", num_classes=7, fpn_channels=32, norm="gn",
                        min_level=3, max_level=5, min_size=(64,), max_size=64)  # fmt: skip
    path = str(tmp_path_factory.mktemp("teacher") / "teacher.pth")
    save_atomic({"model": build_detector(spec).state_dict(), "detector_spec": spec.to_dict()}, path)
    return path


def _pretrain_argv(data, teacher, out, iters=3):
    return (f"pretrain --data-path {data} --teacher {teacher} --output-dir {out} {ON_CPU} --min-size 64 "
            f"--max-size 64 --batch-size 2 --iters {iters} --eval-every 2 --print-freq 1 --icd-heads 4 "
            "--attention-images 1").split()  # fmt: skip


def test_a_callers_hook_runs_in_a_pretraining(data, teacher, tmp_path):
    from icd.engine.pretrain import pretrain

    calls: list = []
    argv = _pretrain_argv(data, teacher, tmp_path / "pre")
    stats = pretrain(build_parser(commands=("pretrain",)).parse_args(argv), hooks=[Recorder("a", calls)])
    assert "lift" in stats
    assert calls == [
        ("a", "losses", 1), ("a", "step", 1), ("a", "losses", 2), ("a", "step", 2),
        ("a", "epoch", 0, True, False, 2),  # the evaluation at iteration 2 wrote the checkpoint
        ("a", "losses", 3), ("a", "step", 3), ("a", "epoch", 1, False, True, 3),
    ]  # fmt: skip


def test_a_non_finite_pretraining_loss_stops_the_run_in_one_line_before_any_checkpoint(
    data, teacher, tmp_path, monkeypatch, capsys
):
    from icd.nn.distiller import ICDDistiller

    real = ICDDistiller.auxiliary_losses

    def nan_losses(self, *args, **kwargs):
        return {k: v * float("nan") for k, v in real(self, *args, **kwargs).items()}

    monkeypatch.setattr(ICDDistiller, "auxiliary_losses", nan_losses)
    out = tmp_path / "pre"
    assert main(_pretrain_argv(data, teacher, out)) == 1  # the loop's NonFiniteError, as icd train's
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith("icd: error: non-finite loss at iteration 1: loss_aux_conf") and "lower --lr" in err, err
    assert not (out / "checkpoint.pth").exists()
    assert load_checkpoint(str(out / "teacher_side.pth"))["iteration"] == 0  # the untrained one of the start


class BrightnessFit(Loop):
    """A step strategy of a few lines: one weight fitted to the images' mean brightness, on the
    loop with icd train's own metrics and checkpoint hooks."""

    def __init__(self, data: str, out: str, iters: int, stop_after: int | None = None, resume: str | None = None):
        super().__init__()
        from icd.data.coco import CocoDetection, dataset_paths
        from icd.engine.batches import EpochBatches
        from icd.engine.distributed import DistInfo
        from icd.engine.metrics import MetricsLog
        from icd.engine.run_config import LoopConfig, TrainHooksConfig
        from icd.engine.sampler import ResumableSampler

        loop = LoopConfig(output_dir=out, iters=iters, stop_after_iters=stop_after, print_freq=1, progress=False,
                          resume=resume)  # fmt: skip
        self.config = RunConfig("train", loop, hooks=TrainHooksConfig(evaluate=False))
        self.info, self.overwritten = DistInfo(), []
        image_dir, annotations = dataset_paths(data, "train", None, None)
        dataset = CocoDetection(image_dir, annotations, train=True)
        self.train_annotations = annotations
        self.batches = EpochBatches(dataset, ResumableSampler(dataset, 1, 0, shuffle=True), 2, 0, 0, progress=False)
        self.total_iters, self.num_epochs = iters, 99
        self.weight = torch.nn.Parameter(torch.zeros(()))
        self.trained_params = [self.weight]
        self.optimizer = torch.optim.SGD(self.trained_params, lr=0.5)
        self.metrics = MetricsLog(out)
        if resume:
            ckpt = load_checkpoint(resume)
            self.weight.data.copy_(ckpt["weight"])
            self.iteration = ckpt["iteration"]
            self.batches.seek(ckpt["epoch"], ckpt["epoch_batches"])

    def step(self, images, targets):
        mean = torch.stack([im.mean() for im in images]).mean()
        loss = (self.weight - mean) ** 2
        self.optimizer.zero_grad()
        loss.backward()
        self.optimizer.step()
        self.record_step({"fit": loss}, loss)

    def state(self, epoch, epoch_batches):
        return {"weight": self.weight.detach().clone(), "iteration": self.iteration, "epoch": epoch,
                "epoch_batches": epoch_batches}  # fmt: skip

    def default_hooks(self, stop_at):
        return [TrainMetrics(1, last=stop_at), PeriodicCheckpoint(0, 0)]


def test_a_new_step_strategy_gets_metrics_checkpoints_and_exact_resume_from_the_loop(data, tmp_path):
    straight, paused = str(tmp_path / "straight"), str(tmp_path / "paused")
    BrightnessFit(data, straight, iters=5).run()
    BrightnessFit(data, paused, iters=5, stop_after=3).run()  # stops in epoch 1 (2 batches an epoch)
    assert load_checkpoint(os.path.join(paused, "checkpoint.pth"))["iteration"] == 3
    BrightnessFit(data, paused, iters=5, resume=os.path.join(paused, "checkpoint.pth")).run()
    a, b = (load_checkpoint(os.path.join(d, "checkpoint.pth")) for d in (straight, paused))
    assert a["iteration"] == b["iteration"] == 5 and torch.equal(a["weight"], b["weight"])
    assert a["config"]["loop"]["iters"] == 5  # the loop saves the strategy's config
    with open(os.path.join(straight, "metrics.jsonl")) as f:
        lines = [json.loads(line) for line in f]
    assert [r["iter"] for r in lines] == [1, 2, 3, 4, 5] and all("loss_fit" in r for r in lines)
    assert lines[-1]["loss_fit"] < lines[0]["loss_fit"]  # it learns


def test_a_hook_that_is_no_hook_is_refused_where_it_is_given():
    with pytest.raises(ArgumentError, match=r"register_hook: hook: builtin_function_or_method is no icd.engine"):
        Loop(hooks=[print])
    loop = Loop()
    with pytest.raises(ArgumentError, match=r"register_hook: hook: dict is no"):
        loop.register_hook({})
    loop.register_hook(Hook())  # a Hook that does nothing is fine
