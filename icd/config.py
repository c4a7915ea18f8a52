"""TOML presets for ``icd train --config FILE``: flag defaults a command line can override.

A preset is a TOML file whose keys are ``icd train`` flags without the leading dashes (``-`` or
``_`` both work); tables only group keys for the reader and are flattened::

    base = "r50_1x.toml"          # optional: a preset this one extends (path relative to it)
    [model]
    detector = "retinanet"
    min_size = [640, 672, 704, 736, 768, 800]
    [schedule]
    iters = 90000
    lr_steps = [60000, 80000]

Values are checked against the flag they set (type, choices, lists for multi-value flags,
booleans for switches) and an unknown key is an error naming the file and the closest flag.
Flags given on the command line win over the preset; a key of the preset wins over its base.
The flags are known from :class:`FlagRecorder`, which adds them to the parser and records them.
Read with :mod:`tomllib` (standard library; ``tomli`` on Python 3.10).
"""

from __future__ import annotations

import argparse
import difflib
import os
from collections.abc import Callable, Collection, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10: the same parser, published as tomli
    import tomli as tomllib

BASE_KEY = "base"
# configs/ follows the paper: 8 processes x 2 images; the trainer warns when a preset run differs
PRESET_IMAGES_PER_ITERATION = 16


def load_preset(path: str, _seen: tuple[str, ...] = ()) -> dict[str, Any]:
    """The flattened keys of ``path`` (``.toml`` may be left off) after applying its ``base`` chain
    (underscored names)."""
    path = os.path.abspath(path)
    if not os.path.exists(path) and os.path.exists(path + ".toml"):
        path += ".toml"
    if path in _seen:
        raise ValueError(f"preset {path}: 'base' chain loops back to itself ({' -> '.join(_seen)})")
    try:
        with open(path, "rb") as f:
            raw = tomllib.load(f)
    except FileNotFoundError:
        raise FileNotFoundError(f"--config {path}: no such preset file") from None
    except UnicodeDecodeError as err:
        raise ValueError(f"preset {path}: not UTF-8 text (byte {err.start}); a preset is a TOML file") from None
    except tomllib.TOMLDecodeError as err:
        raise ValueError(f"preset {path}: not valid TOML: {err}") from None
    except IsADirectoryError:
        raise ValueError(f"preset {path}: is a directory; expected a TOML file") from None
    values = _flatten(raw, path)
    base = values.pop(BASE_KEY, None)
    if base is None:
        return values
    if not isinstance(base, str):
        raise ValueError(f"preset {path}: base = {base!r}; expected a path string")
    merged = load_preset(os.path.join(os.path.dirname(path), base), (*_seen, path))
    merged.update(values)
    return merged


def _flatten(table: dict[str, Any], path: str) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in table.items():
        items = value.items() if isinstance(value, dict) else [(key, value)]
        for name, item in items:
            if isinstance(item, dict):
                raise ValueError(f"preset {path}: [{key}.{name}] nests too deep; use one level of tables")
            name = name.replace("-", "_")
            if name in out:
                raise ValueError(f"preset {path}: {name!r} is set twice")
            out[name] = item
    return out


@dataclass(frozen=True)
class Flag:
    """One flag as it was added (its ``add_argument`` keywords): what a preset value for it is checked against."""

    dest: str
    switch: bool = False  # action="store_true" or "store_false": the preset gives true or false
    nargs: int | str | None = None
    type: Callable[[Any], Any] | None = None
    choices: Collection[Any] | None = None

    @classmethod
    def added(cls, names: Sequence[str], keywords: Mapping[str, Any]) -> Flag:
        """The flag of ``add_argument(*names, **keywords)``."""
        return cls(
            dest=keywords.get("dest") or dest_of(names),
            switch=keywords.get("action") in ("store_true", "store_false"),
            nargs=keywords.get("nargs"),
            type=keywords.get("type"),
            choices=keywords.get("choices"),
        )


def dest_of(names: Sequence[str]) -> str:
    """The attribute argparse stores a flag under when ``add_argument`` has no ``dest=``: a positional's
    name; else the first long option (else the first short one) without its dashes, ``-`` -> ``_``."""
    options = [n for n in names if n.startswith("-")]
    if not options:
        return names[0]
    name = next((n for n in options if n.startswith("--")), options[0])
    return name.lstrip("-").replace("-", "_")


class FlagRecorder:
    """Adds flags to an argparse parser and keeps its own record of them by dest (``flags``), which a
    ``--config`` preset is checked against (argparse keeps its list of flags private).

    ``preset``: a preset file (:func:`load_preset`; a file that does not load raises here). A required
    flag it sets stops being required on the command line; :meth:`apply_preset` makes its values the
    parser's defaults once every flag is added. Use it where the parser would be used::

        p = FlagRecorder(parser, "configs/fcos/r50_1x.toml")
        p.add_argument("--iters", type=int_at_least(1), default=None)
        g = p.add_argument_group("distillation")        # its flags are recorded too
        p.apply_preset()                                # ValueError: unknown key, wrong type, ...
    """

    def __init__(self, parser: argparse.ArgumentParser, preset: str | None = None) -> None:
        self.parser = parser
        self.flags: dict[str, Flag] = {}
        self.preset_path = preset
        self.preset: dict[str, Any] = load_preset(preset) if preset else {}
        self._target: Any = parser  # the parser, or one of its argument groups

    def add_argument(self, *names: str, **keywords: Any) -> argparse.Action:
        """``add_argument`` of the parser (or group), recording the flag."""
        flag = Flag.added(names, keywords)
        if flag.dest in self.preset and keywords.get("required"):
            keywords["required"] = False
        added = self._target.add_argument(*names, **keywords)
        self.flags[flag.dest] = flag
        return added

    def add_argument_group(self, title: str | None = None, description: str | None = None) -> FlagRecorder:
        """An argument group of the parser, whose flags are recorded here too."""
        group = FlagRecorder(self.parser)
        group.flags, group.preset_path, group.preset = self.flags, self.preset_path, self.preset
        group._target = self.parser.add_argument_group(title, description)
        return group

    def apply_preset(self, ignore: Collection[str] = ()) -> dict[str, Any]:
        """Make the preset's values the defaults of the parser (checked against the recorded flags); returns them.

        Keys in ``ignore`` that no recorded flag has are skipped (``icd eval`` reads a train preset this
        way); any other unknown key is an error naming the closest flag.
        """
        path = self.preset_path
        flags = {dest: flag for dest, flag in self.flags.items() if dest != "config"}
        defaults = {}
        for key, value in self.preset.items():
            flag = flags.get(key)
            if flag is None and key in ignore:
                continue
            if flag is None:
                near = difflib.get_close_matches(key, list(flags), n=1)
                hint = f"; did you mean {near[0]!r}?" if near else ""
                raise ValueError(f"preset {path}: unknown key {key!r} (not an icd train flag){hint}")
            defaults[key] = _checked_value(flag, key, value, path)
        self.parser.set_defaults(**defaults)
        return defaults


def _checked_value(flag: Flag, key: str, value: Any, path: str) -> Any:
    where = f"preset {path}: {key} = {value!r}"
    if flag.switch:
        if not isinstance(value, bool):
            raise ValueError(f"{where}: expected true or false")
        return value
    if flag.nargs in ("+", "*"):
        if not isinstance(value, list) or (flag.nargs == "+" and not value):
            raise ValueError(f"{where}: expected a list of values")
        return [_checked_scalar(flag, item, where) for item in value]
    return _checked_scalar(flag, value, where)


_KIND_NAMES = {int: "an integer", float: "a number", str: "a string"}


def _checked_scalar(flag: Flag, value: Any, where: str) -> Any:
    convert = flag.type or str
    kind = getattr(convert, "base", convert)  # icd.flags.CheckedType: int or float plus a range
    expected = f"{where}: expected {_KIND_NAMES.get(kind, 'a value')}"
    if isinstance(value, (bool, list, dict)) or (kind is str and not isinstance(value, str)):
        raise ValueError(expected)
    if (kind is int and not isinstance(value, int)) or (kind is float and not isinstance(value, (int, float))):
        raise ValueError(expected)
    try:
        value = convert(value)
    except argparse.ArgumentTypeError as err:  # out of range: the flag's own message
        raise ValueError(f"{where}: {str(err).split(': ', 1)[-1]}") from None
    except (TypeError, ValueError) as err:
        raise ValueError(f"{where}: {err}") from None
    if flag.choices is not None and value not in flag.choices:
        raise ValueError(f"{where}: expected one of {list(flag.choices)}")
    return value
