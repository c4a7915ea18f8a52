"""The docs a user clones are self-contained: references to docs/method.md resolve, nothing points outside."""

from __future__ import annotations

import os
import re
import subprocess

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SOURCES = ("*.py", "*.md", "*.cpp", "*.h", "*.cu", "*.cuh", "*.toml", "Makefile")


def _tracked_files() -> list[str]:
    try:
        out = subprocess.run(["git", "ls-files", *SOURCES], capture_output=True, text=True, cwd=ROOT, check=True)
    except (OSError, subprocess.CalledProcessError):
        pytest.skip("not a git checkout")
    return [os.path.join(ROOT, f) for f in out.stdout.split() if os.path.isfile(os.path.join(ROOT, f))]


def _method_sections() -> set[str]:
    """Section numbers of docs/method.md: "## 3. Ops" -> "3", "### 3.1 ..." -> "3.1"."""
    with open(os.path.join(ROOT, "docs", "method.md")) as f:
        return set(re.findall(r"^#{2,3} (\d+(?:\.\d+)?)\.? ", f.read(), re.M))


def test_method_sections_are_numbered():
    expected = {"1", "2", "3", "3.1", "3.2", "3.3", "3.4", "3.5", "4", "4.1", "4.2", "4.3", "4.4", "5"}
    assert expected <= _method_sections()


def test_every_reference_to_method_md_resolves_and_none_points_outside():
    sections = _method_sections()
    this_file = os.path.abspath(__file__)
    for path in _tracked_files():
        if path == this_file:
            continue
        with open(path, encoding="utf-8", errors="replace") as f:
            text = f.read()
        name = os.path.relpath(path, ROOT)
        # the contract a user can open is docs/method.md, not a file outside the repository
        assert not re.search(r"\bSPEC(\.md)?\b", text), f"{name} cites SPEC; point to docs/method.md instead"
        assert "../shared" not in text, f"{name} links outside the repository"
        for ref in re.findall(r"docs/method\.md,? (?:section )?(\d+(?:\.\d+)?)", text):
            assert ref in sections, f"{name} cites docs/method.md {ref}, which has no such section"


# the README's quick start at test sizes: each value of these flags is replaced
QUICK_START_SIZES = {"--num-train": "4", "--num-val": "2", "--image-size": "64", "--min-size": "64",
                     "--max-size": "64", "--epochs": "1", "--batch-size": "2", "--fpn-channels": "32"}  # fmt: skip


def _quick_start_commands() -> list[list[str]]:
    """The `icd ...` commands of the README's quick start, as argv lists (line continuations joined)."""
    with open(os.path.join(ROOT, "README.md")) as f:
        text = f.read()
    section = text.split("## Quick start", 1)[1].split("\n## ", 1)[0]
    (block,) = re.findall(r"```bash\n(.*?)```", section, re.S)
    lines = block.replace("\\\n", " ").splitlines()
    return [line.split("#", 1)[0].split()[1:] for line in lines if line.startswith("icd ")]


def test_readme_quick_start_runs(tmp_path, monkeypatch):
    from icd.cli import main

    commands = _quick_start_commands()
    assert [c[0] for c in commands] == ["data", "train", "train", "eval", "predict", "plot"]
    monkeypatch.chdir(tmp_path)  # the commands' relative paths land here
    for argv in commands:
        argv = [QUICK_START_SIZES.get(prev, arg) for prev, arg in zip(["", *argv], argv, strict=False)]
        argv += ["--device", "cpu", "--no-progress"] if argv[0] in ("train", "eval", "predict") else []
        argv += ["--workers", "0"] if argv[0] in ("train", "eval") else []
        assert main(argv) == 0, argv
    assert (tmp_path / "runs" / "icd_eval" / "per_class_ap_val.md").exists()
    assert (tmp_path / "runs" / "icd_predictions" / "detections.json").exists()
    assert (tmp_path / "runs" / "curves.png").exists()
