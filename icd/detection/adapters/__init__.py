"""The registry of detector families: one ``DetectorFamily`` (``base.py``) per family.

``DETECTOR_FAMILIES`` maps a family's name to its adapter; ``family_of(detector)`` finds the
family of a ``--detector`` name, ``family_of_spec(saved)`` the family of a checkpoint's
``detector_spec`` dict (torchvision when it names none). A new family is one module with its
``DetectorFamily`` subclass and one line: its instance in ``_BUILTIN`` below, or
``register_family(family)`` from outside icd before the command line is parsed.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from icd.detection.adapters.base import (
    DEFAULT_FAMILY,
    FAMILY_KEY,
    DetectorFamily,
    FeatureLayout,
    InputFrame,
    Tap,
    check_teacher_frame,
)
from icd.errors import ConfigError

DETECTOR_FAMILIES: dict[str, DetectorFamily] = {}


def register_family(family: DetectorFamily) -> DetectorFamily:
    """Add ``family`` to ``DETECTOR_FAMILIES`` (``--detector`` offers its detectors from the next
    parser built); a ValueError when its name, or one of its detectors, is registered already."""
    if family.name in DETECTOR_FAMILIES:
        raise ValueError(f"register_family: a detector family {family.name!r} is registered already")
    taken = {d: f.name for f in DETECTOR_FAMILIES.values() for d in f.detectors}
    clash = [d for d in family.detectors if d in taken]
    if clash:
        raise ValueError(f"register_family: {family.name!r}'s detectors {clash} belong to {taken[clash[0]]!r}")
    DETECTOR_FAMILIES[family.name] = family
    return family


def unregister_family(name: str) -> None:
    """Remove a family registered from outside (tests); the built-in ones stay."""
    if name in _BUILTIN_NAMES:
        raise ValueError(f"unregister_family: {name!r} is built in")
    DETECTOR_FAMILIES.pop(name, None)


def get_family(name: str, where: str = "detector family") -> DetectorFamily:
    """The family called ``name``; a ConfigError naming ``where`` and the registered names if none."""
    family = DETECTOR_FAMILIES.get(name)
    if family is None:
        raise ConfigError(f"{where} {name}", f"no such detector family; expected one of {list(DETECTOR_FAMILIES)}")
    return family


def family_of(detector: str, where: str = "--detector") -> DetectorFamily:
    """The family that builds ``detector``; a ConfigError naming ``where`` if none does."""
    for family in DETECTOR_FAMILIES.values():
        if detector in family.detectors:
            return family
    raise ConfigError(f"{where} {detector}", f"no such detector; expected one of {list(detector_names())}")


def family_of_spec(saved: Mapping[str, Any], where: str = "detector_spec") -> DetectorFamily:
    """The family of a checkpoint's ``detector_spec`` dict: its ``"family"`` entry, torchvision when
    it has none (checkpoints written before the families)."""
    return get_family(saved.get(FAMILY_KEY) or DEFAULT_FAMILY, f"{where} family")


def family_of_model_spec(spec: Any) -> DetectorFamily:
    """The registered family whose ``spec_type`` ``spec`` is (a TypeError if none: a programming error)."""
    for family in DETECTOR_FAMILIES.values():
        if isinstance(spec, family.spec_type):
            return family
    raise TypeError(f"no registered detector family takes a {type(spec).__name__}")


def detector_names() -> tuple[str, ...]:
    """Every registered family's detectors, in registration order (``--detector``'s choices)."""
    return tuple(d for family in DETECTOR_FAMILIES.values() for d in family.detectors)


def backbone_names() -> tuple[str, ...]:
    """Every registered family's backbones, without repeats (``--backbone``'s choices)."""
    return tuple(dict.fromkeys(b for family in DETECTOR_FAMILIES.values() for b in family.backbones))


def _register_builtin() -> tuple[str, ...]:
    from icd.detection.adapters.rtdetr import RTDetrFamily  # imports transformers only to build
    from icd.detection.adapters.torchvision import TorchvisionFamily

    builtin = (TorchvisionFamily(), RTDetrFamily())
    for family in builtin:
        register_family(family)
    return tuple(f.name for f in builtin)


_BUILTIN_NAMES = _register_builtin()

__all__ = [
    "DEFAULT_FAMILY",
    "DETECTOR_FAMILIES",
    "FAMILY_KEY",
    "DetectorFamily",
    "FeatureLayout",
    "InputFrame",
    "Tap",
    "backbone_names",
    "check_teacher_frame",
    "detector_names",
    "family_of",
    "family_of_model_spec",
    "family_of_spec",
    "get_family",
    "register_family",
    "unregister_family",
]
