"""Helpers of the bad-input tests: the one line ``icd: error: ...`` every refusal prints, and the
tiny data and run they refuse things around."""

from __future__ import annotations

import pytest
from tiny_runs import TINY

from icd.cli import main

RUN = f"{TINY} --iters 1 --no-eval"  # one iteration, no evaluation, no epoch snapshot


def error_line(capsys) -> str:
    """The one line a user's error prints (nothing else on stderr)."""
    (line,) = capsys.readouterr().err.strip().splitlines()
    assert line.startswith("icd: error: "), line
    return line


def parse_error(argv: list[str], capsys) -> str:
    """The line of an ``icd`` command line refused by the parser (exit status 2)."""
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    assert exit_info.value.code == 2
    return error_line(capsys)


def tiny_shapes(out) -> str:
    """A shapes dataset of 4 + 2 images of 64 px in ``out``."""
    assert main(f"data shapes --out {out} --num-train 4 --num-val 2 --image-size 64 --seed 1".split()) == 0
    return str(out)


def one_iteration_run(data: str, out) -> str:
    """A plain run of one iteration in ``out``: its checkpoint and metrics."""
    assert main(f"train --data-path {data} {RUN} --output-dir {out}".split()) == 0
    return str(out)
