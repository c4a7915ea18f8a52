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
from icd.engine.resume_settings import check_resume_compatible
from icd.engine.run_config import (
    SCHEMA_VERSION,
    DataConfig,
    DistillConfig,
    LoopConfig,
    ModelConfig,
    OptimConfig,
    PretrainConfig,
    RunConfig,
    SpeedConfig,
    TrainHooksConfig,
)
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
    assert (config.distill.teacher, config.distill.method, config.model) == ("t.pth", "icd", None)
    assert RunConfig.from_dict(config.to_dict(), "x") == config


def test_a_pretrain_config_holds_its_teacher_sizes_and_icd_settings():
    flags = "--teacher t.pth --min-size 64 96 --max-size 128 --min-level 3 --icd-heads 2 --icd-static-shapes"
    config = RunConfig.from_args(_args("pretrain", flags), "pretrain")
    assert config.pretrain.teacher_flags() == {"min_size": [64, 96], "max_size": 128, "min_level": 3, "max_level": None}
    assert config.distill.static_shapes and config.distill.settings().heads == 2
    schema_1 = {k: v for k, v in config.to_dict().items() if k != "distill"} | {"schema": 1}
    saved = {"config": schema_1, "args": vars(_args("pretrain", flags))}
    assert RunConfig.from_checkpoint(saved, "p", "pretrain") == config


def test_pretrains_flag_defaults_are_its_configs():
    args = _args("pretrain", "--teacher t.pth")
    for field in dataclasses.fields(PretrainConfig):
        assert getattr(args, field.name) == field.default, field.name


def test_trains_loop_and_hook_flag_defaults_are_its_configs():
    config = RunConfig.from_args(_args("train", ""), "train")
    assert config.hooks == TrainHooksConfig()
    assert config.loop.print_freq == LoopConfig().print_freq


def test_a_train_config_holds_its_model_optimisers_speed_and_distillation(tmp_path):
    args = _args("train", "--detector fcos --backbone resnet18 --fpn-channels 32 --min-size 64 96 --lr 0.02 "
                          "--lr-steps 5 8 --warmup-iters 2 --icd-lr 0.001 --icd-clip 0.5 --amp --compile "
                          "--teacher t.pth --distill icd --icd-heads 4 --icd-static-shapes --inherit-teacher neck "
                          "--distill-warmup-iters 3 --icd-backend reference --teacher-detector retinanet")  # fmt: skip
    config = RunConfig.from_args(args, "train")
    assert (config.model.detector, config.model.backbone_weights) == ("fcos", None)
    assert config.model.flags["backbone"] == "resnet18" and config.model.flags["min_size"] == [64, 96]
    assert config.optim == OptimConfig(lr=0.02, lr_steps=[5, 8], warmup_iters=2, teacher_lr=0.001, teacher_clip=0.5)
    assert config.speed == SpeedConfig(amp=True, compile=True)
    assert dataclasses.replace(config.distill, flags={}) == DistillConfig(
        teacher="t.pth", inherit_teacher="neck", warmup_iters=3, backend="reference", static_shapes=True
    )
    assert config.distill.flags["teacher_detector"] == "retinanet" and config.distill.settings().heads == 4
    path = str(tmp_path / "c.pth")
    save_atomic({"config": config.to_dict()}, path)
    assert RunConfig.from_checkpoint(load_checkpoint(path), "c.pth", "train") == config
    assert config.flag_values()["icd_lr"] == 0.001 and config.flag_values()["lr_steps"] == [5, 8]


def test_trains_model_optimiser_speed_and_distillation_flag_defaults_are_its_configs():
    config = RunConfig.from_args(_args("train", ""), "train")
    assert config.optim == OptimConfig() and config.speed == SpeedConfig()
    assert dataclasses.replace(config.distill, flags={}) == DistillConfig()
    assert config.model.detector == ModelConfig().detector


def test_a_schema_1_config_takes_its_missing_sections_from_the_checkpoints_args():
    args = _args("train", "--teacher t.pth --distill fpn-mse --lr 0.03 --amp")
    now = RunConfig.from_args(args, "train")
    schema_1 = {k: v for k, v in now.to_dict().items() if k not in ("model", "optim", "speed", "distill")}
    schema_1["schema"] = 1
    config = RunConfig.from_checkpoint({"config": schema_1, "args": vars(args)}, "c.pth", "train")
    assert config == now and config.distill.method == "fpn-mse" and config.optim.lr == 0.03
    with pytest.raises(CheckpointError, match=r"^c.pth: its config is of schema 1, without the distill, model, "
                                              r"optim, speed settings, and it holds no saved args"):  # fmt: skip
        RunConfig.from_checkpoint({"config": schema_1}, "c.pth", "train")


def test_resume_compares_the_checkpoints_config_not_its_args():
    saved = RunConfig.from_args(_args("train", "--teacher t.pth --icd-heads 4 --lr 0.01"), "train")
    ckpt = {k: {} for k in ("model", "optimizer", "lr_scheduler", "rng")} | {"epoch": 0, "iteration": 1}
    ckpt |= {"config": saved.to_dict(), "args": vars(_args("train", "--teacher t.pth --icd-heads 2 --lr 0.05"))}
    check_resume_compatible(ckpt, "c.pth", saved, {}, 1, 4)  # the config's settings: accepted
    with pytest.raises(ConfigError, match=r"^--resume c.pth was another run: --icd-heads 4 there, 2 here"):
        check_resume_compatible(ckpt, "c.pth", RunConfig.from_args(_args("train", "--teacher t.pth --icd-heads 2"),
                                                                   "train"), {}, 1, 4)  # fmt: skip


def test_old_checkpoints_load_through_their_saved_args():
    old = load_checkpoint(BEFORE)
    for method, ckpt in old.items():
        assert "config" not in ckpt
        config = RunConfig.from_checkpoint(ckpt, BEFORE, "train")
        args = ckpt["args"]
        assert config.loop.print_freq == args["print_freq"] and config.loop.seed == args["seed"], method
        assert config.hooks.eval_every == args["eval_every"] and config.loop.epochs == args["epochs"], method
        assert config.model.detector == args["detector"] and config.distill.method == args["distill"], method
        assert config.distill.teacher == args["teacher"] and config.optim.momentum == args["momentum"], method


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
