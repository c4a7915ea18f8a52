"""Which backend computes an op: the default per device, ICD_BACKEND and set_backend().

The backends and what each takes are in the table of ``icd.ops.backends`` (docs/method.md
3.5). Default: the first available of triton, cuda, cpu that runs natively on the inputs'
device (triton or cuda on CUDA tensors, cpu on CPU tensors), else reference.
``ICD_BACKEND=<name>`` (read whenever an op chooses its backend, so a misspelt value is an
error there, never at import), ``set_backend(name)`` and the ``backend=`` argument of each op
override it, in increasing priority.
"""

from __future__ import annotations

import os
from types import TracebackType

import torch

from icd.errors import EnvironmentSettingError
from icd.ops.backends import BACKEND_TABLE, Backend, register_backend, triton_interpreted, unregister_backend

__all__ = [
    "BACKENDS",  # noqa: F822 - from the module __getattr__ below
    "available_backends",
    "backend_of",
    "default_backend",
    "env_backend",
    "get_backend",
    "is_built",
    "register_backend",
    "resolve_backend",
    "set_backend",
    "triton_interpreted",
    "unregister_backend",
]


def __getattr__(name: str) -> tuple[str, ...]:
    if name == "BACKENDS":  # every backend name, read at each access (register_backend adds names)
        return tuple(BACKEND_TABLE)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


# The per-device default: the first of these that is available and runs natively on the device.
DEFAULT_PREFERENCE = ("triton", "cuda", "cpu")


def backend_of(name: str) -> Backend:
    """The descriptor of backend ``name``."""
    return BACKEND_TABLE[_check_name(name, "backend")]


def is_built(name: str) -> bool:
    """Whether backend ``name`` can run in this installation (any device)."""
    return backend_of(name).available


def available_backends(device: torch.device | str | None = None) -> list[str]:
    """The backends that can run: with ``device``, those that run on its tensors here and now (none
    for a device type this machine does not have: ``"cuda"`` without a GPU; ``triton`` on the CPU
    only with TRITON_INTERPRET=1), in the order of ``BACKENDS``; without it, those built in this
    installation, for any device (``cuda`` and ``triton`` included on a machine without a GPU).

        >>> icd.ops.available_backends("cpu")     # on a CPU-only machine
        ['reference', 'cpu']
    """
    built = [b for b in BACKEND_TABLE.values() if b.available]
    if device is None:
        return [b.name for b in built]
    device = torch.device(device)
    if not _device_present(device):
        return []
    return [b.name for b in built if b.runs_on(device)]


def _device_present(device: torch.device) -> bool:
    """Whether this machine has a device of ``device``'s type (and index, when it gives one)."""
    if device.type == "cpu":
        return True
    if device.type == "cuda":
        return torch.cuda.is_available() and (device.index is None or device.index < torch.cuda.device_count())
    module = getattr(torch, device.type, None)  # mps, xpu, ...: the backend's own is_available()
    return bool(module is not None and getattr(module, "is_available", lambda: False)())


def _check_name(name: str, source: str) -> str:
    if name not in BACKEND_TABLE:
        error = EnvironmentSettingError if source == "ICD_BACKEND" else ValueError
        raise error(f"{source} = {name!r}; expected one of {', '.join(BACKEND_TABLE)}")
    return name


def env_backend() -> str | None:
    """The backend ICD_BACKEND names (None when unset); EnvironmentSettingError when it names none."""
    value = os.environ.get("ICD_BACKEND", "").strip().lower()
    return _check_name(value, "ICD_BACKEND") if value else None


_FROM_ENV = object()  # _override's value while no set_backend(name) is in force: ICD_BACKEND decides
_override: str | None | object = _FROM_ENV


class set_backend:  # noqa: N801 - used like a function, also a context manager
    """Choose the backend of every icd op; ``None`` goes back to ICD_BACKEND / the default.

    Takes effect immediately; used as a context manager it restores the previous choice
    on exit::

        icd.ops.set_backend("reference")
        with icd.ops.set_backend("cpu"):
            ...
    """

    def __init__(self, name: str | None) -> None:
        global _override
        self._previous = _override
        _override = _FROM_ENV if name is None else _check_name(name, "backend")

    def __enter__(self) -> set_backend:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        global _override
        _override = self._previous


def get_backend() -> str | None:
    """The backend forced by set_backend() / ICD_BACKEND, or None for the per-device default."""
    return env_backend() if _override is _FROM_ENV else _override


def default_backend(device: torch.device) -> str:
    """The backend used for tensors on ``device`` when nothing overrides it."""
    for name in DEFAULT_PREFERENCE:
        backend = BACKEND_TABLE[name]
        if backend.available and backend.devices is not None and backend.native_on(device.type):
            return name
    return "reference"


def resolve_backend(device: torch.device, requested: str | None = None) -> str:
    """The backend that will run an op on ``device``; raises if it cannot.

    ``requested`` (an op's ``backend=`` argument) beats set_backend(), which beats
    ICD_BACKEND, which beats the per-device default.
    """
    name = requested if requested is not None else get_backend()
    if name is None:
        return default_backend(device)
    backend = backend_of(name)
    if not backend.available:
        raise RuntimeError(f"icd backend {name!r} is not available: {backend.why_not}. {backend.how_to_get}")
    if not backend.runs_on(device):
        raise ValueError(f"icd backend {name!r} runs on {backend.where}; the inputs are on {device}")
    return name
