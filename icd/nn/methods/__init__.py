"""Distillation methods: the registry (``registry.py``) and one module per method.

``METHODS`` maps each ``--distill`` name to its ``DistillMethod`` entry, in the order ``--distill``
lists them. A new method is a module beside these (its distiller, config dataclass, builder and
flags, ending in one ``DistillMethod``) and one entry: its ``METHOD`` in ``_BUILTIN`` below (or
``register_method(METHOD)`` from outside icd).
"""

from icd.nn.methods import fpn_mse, icd
from icd.nn.methods.registry import (
    METHODS,
    NONE,
    DistillMethod,
    DistillTarget,
    add_method_flags,
    config_from_flags,
    distilling_methods,
    get_method,
    register_method,
)

_BUILTIN = (icd.METHOD, fpn_mse.METHOD, NONE)  # --distill's choices, in this order
for _method in _BUILTIN:
    register_method(_method)

__all__ = [
    "METHODS",
    "DistillMethod",
    "DistillTarget",
    "add_method_flags",
    "config_from_flags",
    "distilling_methods",
    "get_method",
    "register_method",
]
