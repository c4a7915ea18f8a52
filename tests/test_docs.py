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
