"""The ``icd`` console script: ``icd.cli.main``, with a clear message when an optional extra is missing.

``pip install icd`` brings torch, numpy and tqdm: enough for ``icd.ops`` and ``icd.nn``. The command
line also needs torchvision, Pillow, pycocotools and matplotlib (the ``detection`` extra); without
them ``icd --help`` and ``icd --version`` still work (each command imports what it needs when it
runs), and a command says which extra to install and exits with status 2 instead of a traceback.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence

# top-level module -> the extra of pyproject.toml that installs it
EXTRA_OF_MODULE = {
    "torchvision": "detection",
    "PIL": "detection",
    "pycocotools": "detection",
    "matplotlib": "detection",
    "tomli": "detection",
}


def missing_extra_message(err: ModuleNotFoundError) -> str | None:
    """``icd: error: ...`` naming the extra that provides ``err``'s module; None if no extra does."""
    module = (err.name or "").split(".")[0]
    extra = EXTRA_OF_MODULE.get(module)
    if extra is None:
        return None
    return (
        f"icd: error: no module named {module!r}; this icd command needs the '{extra}' extra: "
        f"{install_hint(extra)}"
    )


def install_hint(extra: str) -> str:
    """How to install ``extra`` into an installation from the icd checkout (icd is not on a package index)."""
    return f'run pip install --no-build-isolation ".[{extra}]" in the icd checkout'


def main(argv: Sequence[str] | None = None) -> int:
    try:
        from icd.cli import main as cli_main

        return cli_main(argv)
    except ModuleNotFoundError as err:
        message = missing_extra_message(err)
        if message is None:
            raise
        print(message, file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
