"""The flags every command shares: the same data flags wherever data is read, every default shown
by --help, `icd --help` / `--version` without the `detection` extra, safe defaults."""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import textwrap

import pytest

from icd.cli import build_parser
from icd.flags import DATA_WORKERS, available_cpus, default_workers

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DATA_COMMANDS = ("train", "pretrain", "eval")
# every flag that says where a command's data is
DATA_FLAGS = {"--data-path", "--val-split", "--val-ann", "--val-images", "--on-bad-data"}
TRAIN_DATA_FLAGS = {"--train-split", "--train-ann", "--train-images"}


def _command_parsers() -> dict[str, argparse.ArgumentParser]:
    """Each command's parser (and ``data shapes``'s), by name."""
    parser = build_parser()
    (sub,) = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    parsers = dict(sub.choices)
    (data_sub,) = [a for a in parsers["data"]._actions if isinstance(a, argparse._SubParsersAction)]
    parsers["data shapes"] = data_sub.choices["shapes"]
    return parsers


def _options(parser: argparse.ArgumentParser) -> set[str]:
    return {option for action in parser._actions for option in action.option_strings}


def test_every_command_that_reads_data_takes_the_same_data_flags():
    parsers = _command_parsers()
    for name in DATA_COMMANDS:
        assert DATA_FLAGS <= _options(parsers[name]), name
    for name in ("train", "pretrain"):  # the commands that train read both splits
        assert TRAIN_DATA_FLAGS <= _options(parsers[name]), name
    # icd pretrain reads a Roboflow export in place like icd train (it refused --train-ann before)
    args = build_parser().parse_args(
        "pretrain --teacher t.pth --train-ann a.json --train-images a --val-ann b.json --val-images b".split()
    )
    assert (args.train_ann, args.train_images, args.val_ann, args.val_images) == ("a.json", "a", "b.json", "b")
    # icd eval's --split is its --val-split
    assert build_parser().parse_args("eval --checkpoint c --split test".split()).val_split == "test"


def test_help_shows_every_default_and_every_flag_has_help():
    for name, parser in _command_parsers().items():
        for action in parser._actions:
            if not action.option_strings or action.help == argparse.SUPPRESS:
                continue
            if isinstance(action, (argparse._HelpAction, argparse._VersionAction)):
                continue
            flag = action.option_strings[0]
            assert action.help, f"icd {name} {flag} has no help"
            shown = parser.formatter_class("icd")._get_help_string(action)
            default = action.default
            if default is None or default is False:
                continue  # nothing to show: unset, or a switch that is off
            assert "(default: " in shown or "default" in action.help, f"icd {name} {flag} hides its default"
    train = _command_parsers()["train"].format_help()
    for flag, default in (("--min-size", "800"), ("--epochs", "12"), ("--batch-size", "2"),
                          ("--momentum", "0.9"), ("--detector", "retinanet")):  # fmt: skip
        block = train.split(f"\n  {flag} ", 1)[1].split("\n  -", 1)[0]  # its entry, not the usage line
        assert f"(default: {default})" in " ".join(block.split()), flag
    pretrain = _command_parsers()["pretrain"].format_help()
    assert "--min-size" in pretrain and "--max-size" in pretrain  # shown, no longer hidden


def test_help_and_version_work_without_the_detection_extra():
    # a finder in front of all others: the detection extra's modules are absent, as after a base install;
    # one interpreter runs the three commands in turn (each of them would import torch again)
    code = textwrap.dedent("""
        import contextlib, io, json, sys

        class Absent:
            def find_spec(self, name, path=None, target=None):
                if name.split(".")[0] in ("torchvision", "PIL", "pycocotools", "matplotlib"):
                    raise ModuleNotFoundError(f"No module named {name!r}", name=name)
                return None

        sys.meta_path.insert(0, Absent())
        from icd.console import main
        results = []
        for argv in json.loads(sys.argv[1]):
            out, err = io.StringIO(), io.StringIO()
            with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
                try:
                    status = main(argv)
                except SystemExit as stop:  # argparse's --help and --version
                    status = stop.code or 0
            results.append((status, out.getvalue(), err.getvalue()))
        print(json.dumps(results))
    """)
    env = {**os.environ, "PYTHONPATH": ROOT}
    commands = [["--help"], ["--version"], ["train", "--help"]]
    run = subprocess.run([sys.executable, "-c", code, json.dumps(commands)], capture_output=True, text=True,
                         env=env, cwd=ROOT, timeout=120)  # fmt: skip
    assert run.returncode == 0 and "Traceback" not in run.stderr, run.stderr
    (help_code, help_out, help_err), (version_code, version_out, version_err), (train_code, _, train_err) = (
        json.loads(run.stdout)
    )
    assert help_code == 0, help_err
    assert all(command in help_out for command in ("train", "pretrain", "eval", "predict", "plot", "demo"))
    assert version_code == 0 and version_out.startswith("icd "), version_err
    # a command needs its extra: one line naming the checkout install
    assert train_code == 2 and "Traceback" not in train_err
    message = train_err.strip()
    assert message.startswith("icd: error: no module named ") and "\n" not in message
    assert message.endswith(
        "; this icd command needs the 'detection' extra: "
        'run pip install --no-build-isolation ".[detection]" in the icd checkout'
    )


def test_workers_default_is_capped_by_the_cpus_available(monkeypatch):
    assert default_workers() == min(DATA_WORKERS, available_cpus())
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 1}, raising=False)
    assert available_cpus() == 2 and default_workers() == 2
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(64)), raising=False)
    assert default_workers() == DATA_WORKERS
    args = build_parser().parse_args("train --data-path d".split())
    assert args.workers == default_workers() and args.epoch_checkpoint_every == 0


@pytest.mark.parametrize("command", ["train", "pretrain"])
def test_epoch_files_are_off_by_default_and_their_size_is_in_help(command):
    help_text = " ".join(_command_parsers()["train"].format_help().split())
    assert "--epoch-checkpoint-every" in help_text and "~260 MB for RetinaNet R50" in help_text
    parser = _command_parsers()[command]
    assert "--drop-empty-categories" in _options(parser)
