"""TOML presets (icd.config): base chains, checked values, command-line flags win."""

from __future__ import annotations

import argparse
import glob
import os
import re

import pytest

from icd.cli import _train_flags_set, _train_preset_of, build_parser, main
from icd.config import dest_of, load_preset

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PRESETS = sorted(glob.glob(os.path.join(ROOT, "configs", "*", "*.toml")))


def _parse(argv: list[str]):
    return build_parser(_train_preset_of(argv)).parse_args(argv)


def _write(path, text: str) -> str:
    path.write_text(text)
    return str(path)


def test_base_chain_tables_and_overrides(tmp_path):
    _write(tmp_path / "root.toml", '[model]\ndetector = "fcos"\nbackbone = "resnet18"\n[s]\niters = 100\n')
    child = _write(
        tmp_path / "child.toml",
        'base = "root.toml"\nbackbone = "resnet34"\nlr-steps = [50, 80]\noutput_dir = "x"\n',
    )
    assert load_preset(child) == {
        "detector": "fcos",
        "backbone": "resnet34",
        "iters": 100,
        "lr_steps": [50, 80],
        "output_dir": "x",
    }
    args = _parse(["train", "--config", child, "--data-path", "d", "--iters", "7"])
    assert (args.detector, args.backbone, args.iters, args.lr_steps) == ("fcos", "resnet34", 7, [50, 80])
    assert args.epochs == 12 and args.config == child  # untouched defaults stay
    assert load_preset(child.removesuffix(".toml")) == load_preset(child)  # "configs/<name>" works too


def test_preset_may_supply_a_required_flag(tmp_path, monkeypatch):
    preset = _write(tmp_path / "p.toml", 'data_path = "/data/coco"\namp = true\n')
    args = _parse(["train", "--config", preset])
    assert args.data_path == "/data/coco" and args.amp is True
    monkeypatch.chdir(tmp_path)  # the default --output-dir ./output must not hold another run
    with pytest.raises(SystemExit):  # without the preset --data-path (or --train-ann ...) is required again
        main(["train"])


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("detectr = 'fcos'", "unknown key 'detectr'.*did you mean 'detector'"),
        ("detector = 'yolo'", "detector = 'yolo': expected one of"),
        ("iters = '90000'", "iters = '90000': expected an integer"),
        ("iters = 1.5", "iters = 1.5: expected an integer"),
        ("iters = true", "iters = True: expected an integer"),
        ("lr = 'fast'", "lr = 'fast': expected a number"),
        ("min_size = 800", "min_size = 800: expected a list"),
        ("min_size = ['a']", "min_size = \\['a'\\]: expected an integer"),
        ("amp = 1", "amp = 1: expected true or false"),
        ("teacher = 3", "teacher = 3: expected a string"),
        ("[a.b]\nx = 1", "nests too deep"),
        ("[a]\niters = 1\n[b]\niters = 2", "'iters' is set twice"),
        ("iters = ", "not valid TOML"),
        ("base = 'missing.toml'", "no such preset file"),
    ],
)
def test_bad_presets_are_errors_naming_the_key(tmp_path, capsys, text, message):
    preset = _write(tmp_path / "bad.toml", text + "\n")
    with pytest.raises(SystemExit) as exit_info:
        _parse(["train", "--config", preset, "--data-path", "d"])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert "bad.toml" in err or "missing.toml" in err
    assert re.search(message, err), err


def test_eval_preset_may_supply_its_required_checkpoint(tmp_path, capsys):
    preset = _write(tmp_path / "e.toml", 'checkpoint = "runs/x.pth"\nbackbone = "resnet18"\niters = 5\n')
    argv = ["eval", "--config", preset, "--data-path", "d"]
    args = build_parser(None, _train_preset_of(argv, "eval")).parse_args(argv)
    assert (args.checkpoint, args.backbone) == ("runs/x.pth", "resnet18")  # iters: a train key, ignored
    with pytest.raises(SystemExit):  # without the preset --checkpoint is required again
        build_parser().parse_args(["eval", "--data-path", "d"])
    assert "--checkpoint" in capsys.readouterr().err


def test_flags_given_count_also_at_their_default_value(tmp_path):
    preset = _write(tmp_path / "p.toml", "iters = 100\n")
    argv = ["train", "--data-path", "d", "--icd-heads", "8", "-b", "2", "--wd", "1e-4", "--amp", "--config", preset]
    assert _train_flags_set(argv, preset) == {"data_path", "icd_heads", "batch_size", "weight_decay", "amp",
                                              "config", "iters"}  # fmt: skip
    assert _train_flags_set(["train", "--data-path", "d"], None) == {"data_path"}


def test_dest_of_follows_argparse():
    for names in (["--weight-decay", "--wd"], ["-b", "--batch-size"], ["-j"], ["run_dir"], ["--icd-max-labels"]):
        parser = argparse.ArgumentParser()
        parser.add_argument(*names)
        argv = [] if names[0].startswith("-") else ["x"]
        assert list(vars(parser.parse_args(argv))) == [dest_of(names)], names


def test_base_loop_is_an_error(tmp_path):
    _write(tmp_path / "a.toml", 'base = "b.toml"\n')
    _write(tmp_path / "b.toml", 'base = "a.toml"\n')
    with pytest.raises(ValueError, match="loops back"):
        load_preset(str(tmp_path / "a.toml"))


def test_config_flag_only_belongs_to_train():
    assert _train_preset_of(["eval", "--config", "x.toml"]) is None
    assert _train_preset_of(["train", "--data-path", "d", "--config", "y.toml"]) == "y.toml"


def test_shipped_presets_follow_the_paper():
    names = {os.path.relpath(p, os.path.join(ROOT, "configs")) for p in PRESETS}
    for detector in ("retinanet", "fasterrcnn", "fcos", "maskrcnn"):
        assert {f"{detector}/r101_3x.toml", f"{detector}/r50_1x.toml", f"{detector}/r50_1x_icd.toml"} <= names
    for path in PRESETS:
        args = _parse(["train", "--config", path, "--data-path", "d"])
        two_stage = args.detector in ("fasterrcnn", "maskrcnn")
        assert args.batch_size == 2 and args.warmup_iters == 1000 and args.norm == "frozen_bn"
        assert args.lr == (0.02 if two_stage else 0.01)
        if path.endswith("r101_3x.toml"):
            assert (args.backbone, args.iters, args.lr_steps) == ("resnet101", 270000, [210000, 250000])
            assert args.teacher is None
            continue
        assert (args.backbone, args.iters, args.lr_steps) == ("resnet50", 90000, [60000, 80000])
        if path.endswith("_icd.toml"):
            assert args.teacher == f"runs/{args.detector}_r101_3x/checkpoint.pth"
            assert args.distill == "icd" and args.inherit_teacher == "neck,head"
            assert args.distill_weight == (3.0 if two_stage else 8.0)
            assert args.icd_max_labels == (100 if two_stage else 300) and args.icd_neg_ratio == 5.0
            assert args.distill_warmup_iters == 1000
        else:
            assert args.teacher is None
