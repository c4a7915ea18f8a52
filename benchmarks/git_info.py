"""The commit the benchmarks run from, for their CSVs and reports (no torch import: the GPU check's
driver uses it before it knows whether torch works)."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path


def git_commit() -> str:
    """The short commit of the checkout these benchmarks run from ('+dirty' with local changes), or
    'unknown' outside a git checkout; ICD_COMMIT when set (a copy of the tree without .git, as
    on a lent GPU machine)."""
    if os.environ.get("ICD_COMMIT"):
        return os.environ["ICD_COMMIT"]
    here = Path(__file__).resolve().parent
    try:
        head = subprocess.run(["git", "rev-parse", "--short=12", "HEAD"], cwd=here, capture_output=True,
                              text=True, timeout=10, check=True).stdout.strip()  # fmt: skip
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=here,
                               capture_output=True, text=True, timeout=10).stdout.strip()  # fmt: skip
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return (head + ("+dirty" if dirty else "")) if head else "unknown"
