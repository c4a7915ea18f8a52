"""Backends, devices, shapes and inputs shared by the op tests.

Every built backend is compared with the reference on the same inputs; which backends exist,
their devices and dtypes come from the backend table (``icd.ops.backends.BACKEND_TABLE``).
A backend that runs on CPU tensors only under TRITON_INTERPRET=1 (the Triton backend) gets
the small cases there (the interpreter is slow) and no bfloat16.
"""

from __future__ import annotations

from dataclasses import dataclass

import pytest
import torch

from icd.ops.backends import BACKEND_TABLE


@dataclass(frozen=True)
class Case:
    """Sizes in the letters of docs/method.md; ``padding`` masks ~30% of keys, ``empty_image`` masks image 0 fully."""

    n: int
    h: int
    k: int
    s: int
    d: int
    padding: bool = True
    empty_image: bool = False
    permuted: bool = False

    @property
    def id(self) -> str:
        flags = "".join(
            f for f, on in (("-pad", self.padding), ("-empty", self.empty_image), ("-perm", self.permuted)) if on
        )
        return f"N{self.n}h{self.h}K{self.k}S{self.s}D{self.d}{flags}"


# Small enough for the Triton interpreter; S is never a multiple of a block size.
SMALL_CASES = [
    Case(2, 2, 5, 37, 16, padding=True, empty_image=True),
    Case(1, 1, 1, 1, 8, padding=False),
    Case(2, 2, 3, 45, 8, padding=True, permuted=True),
    Case(3, 1, 7, 70, 32, padding=True, empty_image=True, permuted=True),
    Case(1, 2, 4, 19, 64, padding=False, permuted=True),
]
# Extra cases for the compiled backends: several key blocks, larger K and D.
LARGER_CASES = [
    Case(2, 3, 37, 1031, 32, padding=True, empty_image=True, permuted=True),
    Case(1, 2, 300, 2500, 16, padding=True),
]


def kernel_backends() -> tuple[str, ...]:
    """The backends with kernels behind the icd:: ops (all but the reference), in table order,
    read at each call: those of ``icd.ops.register_backend`` included."""
    return tuple(name for name, b in BACKEND_TABLE.items() if b.load_kernels is not None)


def _backend_device(backend: str) -> torch.device | None:
    """The device a backend is tested on here (its first device type this machine has), or None."""
    described = BACKEND_TABLE[backend]
    if not described.available:
        return None
    for device_type in described.device_types() or ("cpu",):
        if device_type == "cpu" or (device_type == "cuda" and torch.cuda.is_available()):
            return torch.device(device_type)
    return None


def _cannot_run(backend: str) -> list:
    return [pytest.mark.skip(reason=f"backend {backend!r} cannot run here")]


def backend_params() -> list:
    """pytest params of (backend, device) for every built, non-reference backend."""
    params = []
    for name in kernel_backends():
        device = _backend_device(name)
        params.append(pytest.param(name, device, id=name, marks=[] if device is not None else _cannot_run(name)))
    return params


def dtype_id(dtype: torch.dtype) -> str:
    return str(dtype).replace("torch.", "")


def case_params(max_cases: int | None = None, dtypes: tuple[torch.dtype, ...] | None = None) -> list:
    """pytest params of (backend, device, case, dtype): one test id per backend, dtype and shape.

    Every case of ``cases_for`` (the first ``max_cases``) in every dtype of ``dtypes_for``
    (those also in ``dtypes``); a backend that cannot run here gets one skipped id.
    """
    params = []
    for name in kernel_backends():
        device = _backend_device(name)
        if device is None:
            params.append(pytest.param(name, None, None, None, id=name, marks=_cannot_run(name)))
            continue
        for case in cases_for(name, device)[:max_cases]:
            for dtype in dtypes_for(name, device):
                if dtypes is None or dtype in dtypes:
                    params.append(pytest.param(name, device, case, dtype, id=f"{name}-{dtype_id(dtype)}-{case.id}"))
    return params


def interpreted(backend: str, device: torch.device) -> bool:
    """Whether ``backend`` runs on ``device`` through the Triton interpreter (slow: small cases)."""
    return BACKEND_TABLE[backend].interpreted_on(device)


def cases_for(backend: str, device: torch.device) -> list[Case]:
    return SMALL_CASES if interpreted(backend, device) else SMALL_CASES + LARGER_CASES


def dtypes_for(backend: str, device: torch.device) -> list[torch.dtype]:
    """The backend's dtypes (its descriptor's), bfloat16 left out under the Triton interpreter."""
    dtypes = BACKEND_TABLE[backend].dtypes
    if interpreted(backend, device):
        return [d for d in dtypes if d != torch.bfloat16]  # bfloat16 is not faithful under the interpreter
    return list(dtypes)


TOLERANCES = {
    torch.float64: dict(atol=1e-9, rtol=1e-7),
    torch.float32: dict(atol=2e-5, rtol=2e-4),
    torch.float16: dict(atol=4e-3, rtol=4e-3),
    torch.bfloat16: dict(atol=3e-2, rtol=3e-2),
}


def head_tensor(n: int, h: int, length: int, d: int, dtype, device, permuted: bool) -> torch.Tensor:
    """A random [N, h, L, D] tensor; with ``permuted``, a view of an [L, N, h, D] buffer."""
    if permuted:
        return torch.randn(length, n, h, d, dtype=dtype, device=device).permute(1, 2, 0, 3)
    return torch.randn(n, h, length, d, dtype=dtype, device=device)


def key_mask(case: Case, device) -> torch.Tensor | None:
    """bool [N, S]: ~30% of keys masked at random, image 0 fully masked with ``empty_image``."""
    if not case.padding and not case.empty_image:
        return None
    mask = torch.rand(case.n, case.s, device=device) < (0.3 if case.padding else 0.0)
    if case.empty_image:
        mask[0] = True
    return mask


def attention_inputs(case: Case, dtype, device, requires_grad: bool = False):
    q = head_tensor(case.n, case.h, case.k, case.d, dtype, device, permuted=False)
    k = head_tensor(case.n, case.h, case.s, case.d, dtype, device, case.permuted)
    v = head_tensor(case.n, case.h, case.s, case.d, dtype, device, case.permuted)
    if requires_grad:
        for t in (q, k, v):
            t.requires_grad_(True)
    return q, k, v, key_mask(case, device)


def instance_weight(case: Case, device) -> torch.Tensor:
    """[N, K]: about half the slots real (1), the rest 0; image 1 (if any) has no instances."""
    weight = (torch.rand(case.n, case.k, device=device) < 0.5).float()
    weight[:, 0] = 1.0
    if case.n > 1:
        weight[1] = 0.0
    return weight


def assert_close(actual: torch.Tensor, expected: torch.Tensor, dtype: torch.dtype, what: str) -> None:
    assert actual.shape == expected.shape, f"{what}: shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    assert torch.isfinite(actual[torch.isfinite(expected)]).all(), f"{what}: non-finite values"
    tol = TOLERANCES[dtype]
    torch.testing.assert_close(actual.to(expected.dtype), expected, msg=lambda m: f"{what}: {m}", **tol)
