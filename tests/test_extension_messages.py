"""The C++ extension's error messages are built without writing numbers to a std::ostream.

TORCH_CHECK joins its message arguments with ``operator<<``. With torch 2.11 built by GCC 13.3
(Ubuntu 24.04) an integer written to a std::ostream from an extension was measured to kill the
process (SIGSEGV) instead of raising, so every argument must already be text: a string
literal, a ``const char*`` parameter, or text_of / shape_of / shape_text / std::string(...).
"""

from __future__ import annotations

import re
from pathlib import Path

CSRC = Path(__file__).resolve().parent.parent / "csrc"
TEXT_PARAMETERS = {"op", "name", "dims", "ref_name"}  # const char* in every check
TEXT_CALLS = re.compile(r"^(text_of|shape_of|shape_text|std::string)\(.*\)$", re.S)


def _split_top_level(args: str) -> list[str]:
    parts, depth, current, quoted = [], 0, "", False
    for i, ch in enumerate(args):
        if ch == '"' and (i == 0 or args[i - 1] != "\\"):
            quoted = not quoted
        if not quoted:
            depth += ch in "([{"
            depth -= ch in ")]}"
            if ch == "," and depth == 0:
                parts.append(current.strip())
                current = ""
                continue
        current += ch
    parts.append(current.strip())
    return parts


def _checks(source: str) -> list[str]:
    """The argument text of every TORCH_CHECK(...) in ``source``."""
    found = []
    for match in re.finditer(r"\bTORCH_CHECK\(", source):
        start = i = match.end()
        depth, quoted = 1, False
        while depth:
            ch = source[i]
            if ch == '"' and source[i - 1] != "\\":
                quoted = not quoted
            elif not quoted:
                depth += (ch == "(") - (ch == ")")
            i += 1
        found.append(source[start : i - 1])
    return found


def _is_text(arg: str) -> bool:
    literal = re.fullmatch(r'("([^"\\]|\\.)*"\s*)+', arg)
    return bool(literal) or arg in TEXT_PARAMETERS or bool(TEXT_CALLS.match(arg))


def test_every_message_argument_is_text():
    sources = [p for p in CSRC.rglob("*") if p.suffix in (".h", ".cpp", ".cu", ".cuh")]
    checked, bad = 0, []
    for path in sources:
        for args in _checks(path.read_text()):
            checked += 1
            for arg in _split_top_level(args)[1:]:  # the first is the condition
                if not _is_text(arg):
                    bad.append(f"{path.relative_to(CSRC)}: {arg!r}")
    assert checked > 20, f"found only {checked} TORCH_CHECKs under {CSRC}"
    assert not bad, "message arguments that are not text yet:\n" + "\n".join(bad)


def test_the_rule_catches_a_number():
    args = _split_top_level('d <= 128, op, ": head dim D = ", d, "; at most ", text_of(d)')
    assert [_is_text(a) for a in args[1:]] == [True, True, False, True, True]
