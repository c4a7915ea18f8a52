"""Typed run configs (icd.engine.run_config): built from the flags, saved in checkpoints, read
back, and old or foreign checkpoints loaded or refused with the reason."""

from __future__ import annotations

import dataclasses
import os

import pytest
import torch
from tiny_runs import ON_CPU

from icd.cli import build_parser, main
from icd.data.shapes import generate
from icd.detection.models import DetectorSpec, build_detector
from icd.engine.checkpoint import load_checkpoint, save_atomic
from icd.engine.run_config import SCHEMA_VERSION, DataConfig, LoopConfig, PretrainConfig, RunConfig, TrainHooksConfig
from icd.errors import CheckpointError, ConfigError

DATA = os.path.join(os.path.dirname(__file__), "data")
BEFORE = os.path.join(DATA, "distillers_before_registry.pth")  # train runs' checkpoints before typed configs


def _args(command: str, flags: str):
    return build_parser(commands=(command,)).parse_args(f"{command} --data-path d {flags}".split())


def test_a_train_config_holds_its_flags_and_goes_through_a_checkpoint(tmp_path):
    args = _args("train", "--iters 30 --print-freq 5 --seed 3 --no-eval --no-progress --health-window 7 "
                          "--on-unhealthy stop --checkpoint-every 4 --on-bad-data skip --output-dir o")  # fmt: skip
    config = RunConfig.from_args(args, "train")
    assert config.loop == LoopConfig(output_dir="o", seed=3, batch_size=2, workers=args.workers, print_freq=5,
                                     iters=30, epochs=12, on_bad_data="skip", progress=False)  # fmt: skip
    assert config.hooks == TrainHooksConfig(health_window=7, on_unhealthy="stop", checkpoint_every=4, evaluate=False)
    assert config.pretrain is None and config.data == DataConfig(data_path="d")
    path = str(tmp_path / "c.pth")
    save_atomic({"config": config.to_dict()}, path)  # plain values: weights_only loads it
    saved = load_checkpoint(path)
    assert saved["config"]["schema"] == SCHEMA_VERSION
    assert RunConfig.from_checkpoint(saved, "c.pth", "train") == config


def test_a_pretrain_config_takes_its_length_from_its_iters():
    config = RunConfig.from_args(_args("pretrain", "--teacher t.pth --iters 9 --eval-every 3 --lr 0.01"), "pretrain")
    assert config.pretrain == PretrainConfig(iters=9, eval_every=3, lr=0.01)
    assert config.loop.iters == 9 and config.loop.epochs is None and config.hooks is None
    assert config.data == DataConfig(data_path="d", flip_prob=0.5)
    assert RunConfig.from_dict(config.to_dict(), "x") == config


def test_pretrains_flag_defaults_are_its_configs():
    args = _args("pretrain", "--teacher t.pth")
    for field in dataclasses.fields(PretrainConfig):
        assert getattr(args, field.name) == field.default, field.name


def test_trains_loop_and_hook_flag_defaults_are_its_configs():
    config = RunConfig.from_args(_args("train", ""), "train")
    assert config.hooks == TrainHooksConfig()
    assert config.loop.print_freq == LoopConfig().print_freq


def test_old_checkpoints_load_through_their_saved_args():
    old = load_checkpoint(BEFORE)
    for method, ckpt in old.items():
        assert "config" not in ckpt
        config = RunConfig.from_checkpoint(ckpt, BEFORE, "train")
        args = ckpt["args"]
        assert config.loop.print_freq == args["print_freq"] and config.loop.seed == args["seed"], method
        assert config.hooks.eval_every == args["eval_every"] and config.loop.epochs == args["epochs"], method


def test_a_config_missing_fields_of_a_later_icd_takes_their_defaults():
    saved = RunConfig.from_args(_args("train", "--print-freq 3"), "train").to_dict()
    del saved["loop"]["tensorboard"], saved["hooks"]["health_window"]
    config = RunConfig.from_dict(saved, "x")
    assert config.loop.tensorboard is False and config.hooks.health_window == 50 and config.loop.print_freq == 3


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (lambda c: c.update(schema=SCHEMA_VERSION + 1), f"schema {SCHEMA_VERSION + 1}, written by a newer icd"),
        (lambda c: c.pop("schema"), "no schema version"),
        (lambda c: c["loop"].update(warp_speed=9), "config.loop has fields this icd does not know: warp_speed"),
        (lambda c: c.update(optimiser={}), "entries this icd does not know: optimiser"),
        (lambda c: c["loop"].update(print_freq=0), "config.loop: --print-freq 0: expected an integer >= 1"),
        (lambda c: c.update(hooks=[1]), "config.hooks is a list, not a dict"),
        (lambda c: c.update(command="predict"), "names no command icd knows ('predict')"),
    ],
)
def test_a_config_this_icd_cannot_read_is_refused_saying_why(change, message):
    saved = RunConfig.from_args(_args("train", ""), "train").to_dict()
    change(saved)
    with pytest.raises(CheckpointError, match=r"^ckpt.pth: .*" + message.replace("(", r"\(").replace(")", r"\)")):
        RunConfig.from_checkpoint({"config": saved}, "ckpt.pth", "train")


def test_a_checkpoint_of_another_command_or_without_flags_is_refused():
    pretrain = RunConfig.from_args(_args("pretrain", "--teacher t.pth"), "pretrain").to_dict()
    with pytest.raises(CheckpointError, match="is a checkpoint of icd pretrain, not of icd train"):
        RunConfig.from_checkpoint({"config": pretrain}, "--resume p.pth", "train")
    with pytest.raises(CheckpointError, match=r"no run config and no saved flags \(keys \['model'\]\)"):
        RunConfig.from_checkpoint({"model": {}}, "--resume m.pth", "train")
    with pytest.raises(CheckpointError, match="saved args do not make an icd train config: --batch-size 0"):
        RunConfig.from_checkpoint({"args": {"batch_size": 0}}, "--resume m.pth", "train")


def test_settings_out_of_range_are_refused_naming_the_flag():
    with pytest.raises(ConfigError, match="--health-window 1: expected an integer >= 2"):
        TrainHooksConfig(health_window=1)
    with pytest.raises(ConfigError, match="--clip nan: expected a finite number > 0"):
        PretrainConfig(clip=float("nan"))
    with pytest.raises(ConfigError, match="--on-bad-data 'ignore': expected one of skip, error"):
        LoopConfig(on_bad_data="ignore")


def test_resume_refuses_a_checkpoint_of_a_newer_config_schema(tmp_path, capsys):
    data = str(tmp_path / "data")
    generate(data, num_train=2, num_val=1, image_size=64, seed=5)
    torch.manual_seed(0)
    spec = DetectorSpec("fcos", "resnet18", num_classes=7, fpn_channels=32, norm="gn",
                        min_level=3, max_level=5, min_size=(64,), max_size=64)  # fmt: skip
    teacher = str(tmp_path / "teacher.pth")
    save_atomic({"model": build_detector(spec).state_dict(), "detector_spec": spec.to_dict()}, teacher)
    out = tmp_path / "pre"
    argv = (f"pretrain --data-path {data} --teacher {teacher} --output-dir {out} {ON_CPU} --min-size 64 "
            f"--max-size 64 --batch-size 2 --iters 2 --eval-every 2 --icd-heads 4 --attention-images 1")  # fmt: skip
    assert main([*argv.split(), "--stop-after-iters", "1"]) == 0
    ckpt = load_checkpoint(str(out / "checkpoint.pth"))
    assert RunConfig.from_checkpoint(ckpt, "x", "pretrain").pretrain.iters == 2
    ckpt["config"]["schema"] = SCHEMA_VERSION + 1
    save_atomic(ckpt, str(out / "checkpoint.pth"))
    capsys.readouterr()
    assert main([*argv.split(), "--resume", str(out / "checkpoint.pth")]) == 2
    err = capsys.readouterr().err
    assert f"--resume {out / 'checkpoint.pth'}: its config is of schema {SCHEMA_VERSION + 1}" in err, err
