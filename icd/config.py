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
Read with :mod:`tomllib` (standard library; ``tomli`` on Python 3.10).
"""

from __future__ import annotations

import argparse
import difflib
import os
from collections.abc import Collection
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
    except tomllib.TOMLDecodeError as err:
        raise ValueError(f"preset {path}: not valid TOML: {err}") from None
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


def apply_preset(parser: argparse.ArgumentParser, path: str, ignore: Collection[str] = ()) -> dict[str, Any]:
    """Make the preset's values the defaults of ``parser`` (checked); returns them.

    A required flag the preset sets stops being required on the command line. Keys in ``ignore``
    that ``parser`` has no flag for are skipped (``icd eval`` reads a train preset this way).
    """
    values = load_preset(path)
    actions = {a.dest: a for a in parser._actions if a.dest not in ("help", "config")}
    defaults = {}
    for key, value in values.items():
        action = actions.get(key)
        if action is None and key in ignore:
            continue
        if action is None:
            near = difflib.get_close_matches(key, list(actions), n=1)
            hint = f"; did you mean {near[0]!r}?" if near else ""
            raise ValueError(f"preset {path}: unknown key {key!r} (not an icd train flag){hint}")
        defaults[key] = _checked_value(action, key, value, path)
        action.required = False
    parser.set_defaults(**defaults)
    return defaults


def _checked_value(action: argparse.Action, key: str, value: Any, path: str) -> Any:
    where = f"preset {path}: {key} = {value!r}"
    if isinstance(action, (argparse._StoreTrueAction, argparse._StoreFalseAction)):
        if not isinstance(value, bool):
            raise ValueError(f"{where}: expected true or false")
        return value
    if action.nargs in ("+", "*"):
        if not isinstance(value, list) or (action.nargs == "+" and not value):
            raise ValueError(f"{where}: expected a list of values")
        return [_checked_scalar(action, item, where) for item in value]
    return _checked_scalar(action, value, where)


_KIND_NAMES = {int: "an integer", float: "a number", str: "a string"}


def _checked_scalar(action: argparse.Action, value: Any, where: str) -> Any:
    convert = action.type or str
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
    if action.choices is not None and value not in action.choices:
        raise ValueError(f"{where}: expected one of {list(action.choices)}")
    return value
