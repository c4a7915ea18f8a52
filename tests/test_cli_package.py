"""The package around the command line: declared dependencies, the console script without its extra,
``icd --version`` and ``icd eval --config``."""

from __future__ import annotations

import ast
import json
import os
import re
import subprocess
import sys
import textwrap

import pytest
import torch
from tiny_runs import ON_CPU

import icd
from icd.cli import icd_version, main
from icd.console import EXTRA_OF_MODULE
from icd.detection.models import DetectorSpec, build_detector

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    import tomli as tomllib

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# import name -> distribution name, where they differ
DISTRIBUTION_OF = {"PIL": "Pillow"}


def _pyproject() -> dict:
    with open(os.path.join(ROOT, "pyproject.toml"), "rb") as f:
        return tomllib.load(f)["project"]


def _third_party_imports() -> set[str]:
    """Top-level modules imported anywhere in icd/ and kernels/ (also inside functions)."""
    local = {"icd", "kernels", "tiny_runs"}
    found = set()
    for folder in ("icd", "kernels"):
        for dirpath, _, files in os.walk(os.path.join(ROOT, folder)):
            for name in files:
                if not name.endswith(".py"):
                    continue
                with open(os.path.join(dirpath, name)) as f:
                    tree = ast.parse(f.read())
                for node in ast.walk(tree):
                    if isinstance(node, ast.Import):
                        found |= {a.name.split(".")[0] for a in node.names}
                    elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                        found.add(node.module.split(".")[0])
    return {m for m in found - local if m not in sys.stdlib_module_names}


def _requirement_name(requirement: str) -> str:
    return re.split(r"[\s<>=!~;\[]", requirement, maxsplit=1)[0].lower()


def test_every_runtime_import_is_declared():
    project = _pyproject()
    declared = {_requirement_name(r) for r in project["dependencies"]}
    for requirements in project["optional-dependencies"].values():
        declared |= {_requirement_name(r) for r in requirements}
    imports = _third_party_imports()
    assert {"torch", "torchvision", "PIL", "pycocotools"} <= imports  # the scan sees them
    missing = {m for m in imports if DISTRIBUTION_OF.get(m, m).lower() not in declared}
    assert not missing, f"imported but declared nowhere in pyproject.toml: {sorted(missing)}"
    # what the console script names for a missing module is what that extra really installs
    extras = project["optional-dependencies"]
    for module, extra in EXTRA_OF_MODULE.items():
        assert DISTRIBUTION_OF.get(module, module).lower() in {_requirement_name(r) for r in extras[extra]}
    assert project["scripts"]["icd"] == "icd.console:main"


# each module of the extra, and a command that reaches it: parsing train's flags (torchvision), drawing the
# shapes (PIL), reading the annotations (pycocotools)
NEEDS = {"torchvision": "train --help", "PIL": "data shapes --num-train 1", "pycocotools": "train --no-eval"}


@pytest.mark.parametrize("module", sorted(NEEDS))
def test_console_script_without_the_extra_says_what_to_install(module, tmp_path):
    # a finder in front of all others: `module` is absent, as after `pip install icd` without [detection]
    code = textwrap.dedent(f"""
        import sys

        class Absent:
            def find_spec(self, name, path=None, target=None):
                if name.split(".")[0] == {module!r}:
                    raise ModuleNotFoundError(f"No module named {{name!r}}", name=name)
                return None

        sys.meta_path.insert(0, Absent())
        from icd.console import main
        sys.exit(main(sys.argv[1:]))
    """)
    env = {**os.environ, "PYTHONPATH": ROOT}
    data = tmp_path / "shapes"
    if module == "pycocotools":  # a dataset to read (written here, where every module is present)
        assert main(f"data shapes --out {data} --num-train 1 --num-val 1 --image-size 64".split()) == 0
    where = f"--out {data}" if module == "PIL" else f"--data-path {data} --output-dir {tmp_path / 'run'} {ON_CPU}"
    command = [sys.executable, "-c", code, *NEEDS[module].split(), *where.split()]
    out = subprocess.run(command, capture_output=True, text=True, env=env, cwd=tmp_path, timeout=120)
    assert out.returncode == 2, out.stderr
    assert out.stderr.strip() == (
        f"icd: error: no module named {module!r}; this icd command needs the 'detection' extra: "
        'run pip install --no-build-isolation ".[detection]" in the icd checkout'
    )
    assert "Traceback" not in out.stderr


def test_console_script_reraises_other_import_errors(monkeypatch):
    import icd.console as console

    def broken(argv=None):
        raise ModuleNotFoundError("No module named 'not_an_extra'", name="not_an_extra")

    monkeypatch.setattr("icd.cli.main", broken)
    with pytest.raises(ModuleNotFoundError, match="not_an_extra"):
        console.main([])


def test_version_from_metadata_or_the_package(capsys, monkeypatch):
    with pytest.raises(SystemExit) as exit_info:
        main(["--version"])
    assert exit_info.value.code == 0
    assert capsys.readouterr().out.strip() == f"icd {icd_version()}"
    assert re.fullmatch(r"\d+\.\d+\.\d+.*", icd_version())

    import importlib.metadata

    def not_installed(name):
        raise importlib.metadata.PackageNotFoundError(name)

    monkeypatch.setattr(importlib.metadata, "version", not_installed)
    assert icd_version() == icd.__version__


def test_eval_config_supplies_the_model_of_a_bare_state_dict(tmp_path, capsys):
    out = tmp_path / "shapes"
    assert main(f"data shapes --out {out} --num-train 1 --num-val 2 --image-size 64 --seed 2".split()) == 0
    spec = DetectorSpec("fcos", "resnet18", num_classes=7, fpn_channels=32, norm="gn", min_level=3, max_level=5,
                        min_size=(64,), max_size=64, score_thresh=0.0)
    torch.manual_seed(0)
    bare = tmp_path / "bare.pth"
    torch.save(build_detector(spec).state_dict(), bare)
    # an icd train preset: model keys (used), data path (used), training-only keys (ignored by eval)
    preset = tmp_path / "tiny.toml"
    preset.write_text(textwrap.dedent(f"""
        data_path = "{out}"
        [model]
        detector = "fcos"
        backbone = "resnet18"
        fpn_channels = 32
        norm = "gn"
        min_level = 3
        max_level = 5
        min_size = [64]
        max_size = 64
        score_thresh = 0.0
        [schedule]
        iters = 90000
        lr = 0.01
        [distillation]
        teacher = "runs/teacher/checkpoint.pth"
        distill_weight = 8.0
    """))
    run = tmp_path / "eval"
    main(["eval", "--config", str(preset), "--checkpoint", str(bare), *ON_CPU.split(), "--output-dir", str(run)])
    with open(run / "metrics.jsonl") as f:
        (record,) = [json.loads(line) for line in f]
    assert record["type"] == "eval" and 0 <= record["AP"] <= 100
    with open(run / "detections_val.json") as f:
        assert {d["image_id"] for d in json.load(f)} <= {1, 2}

    # without the preset the bare state dict has no architecture
    capsys.readouterr()
    assert main(["eval", "--data-path", str(out), "--checkpoint", str(bare), *ON_CPU.split(),
                 "--output-dir", str(tmp_path / "eval2")]) == 2
    assert "holds no detector_spec" in capsys.readouterr().err
    # a key neither command knows is still an error naming it
    preset.write_text('detectr = "fcos"\n')
    with pytest.raises(SystemExit) as exit_info:
        main(["eval", "--config", str(preset), "--checkpoint", str(bare)])
    assert exit_info.value.code == 2 and "unknown key 'detectr'" in capsys.readouterr().err
