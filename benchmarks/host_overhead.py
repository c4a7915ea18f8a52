"""Host (Python) time per eager call of the icd ops on the Triton backend, without a GPU, and
the number of kernel launches each makes.

Runs under ``TRITON_INTERPRET=1`` on CPU tensors with every Triton launch replaced by a stub
that only counts it, so what is timed is the work on the host path: argument checks (value
checks off, as on a GPU), backend resolution, op dispatch and autograd, output allocation,
grid and config choices, and the autotuner's lookup. Triton's own launcher (on a GPU, a few
microseconds per launch in C) is not included. Tiny tensors (N=2, h=8, K=300, S=1,024, D=32)
keep allocation cheap, as the caching allocator makes it on a GPU.

    python benchmarks/host_overhead.py            # microseconds per call and launches
"""

from __future__ import annotations

import os
import statistics
import sys
import time
from collections.abc import Callable

os.environ["TRITON_INTERPRET"] = "1"
os.environ["ICD_CHECKS"] = "off"  # value checks read data; on a GPU they are off by default

import torch  # noqa: E402
from triton.runtime.interpreter import InterpretedFunction  # noqa: E402

import icd.ops as ops  # noqa: E402

LAUNCHES: list[str] = []


def _stub_run(self, *args, grid, warmup, **kwargs):
    LAUNCHES.append(self.fn.__name__)


def _time(call: Callable[[], object], repeats: int = 300) -> tuple[float, float, int]:
    """(lowest and median microseconds, launches) of one call: on a shared machine the lowest
    is the steadiest figure for host-only work."""
    call()
    LAUNCHES.clear()
    call()
    launches = len(LAUNCHES)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        call()
        times.append(time.perf_counter() - start)
    return min(times) * 1e6, statistics.median(times) * 1e6, launches


def main() -> int:
    InterpretedFunction.run = _stub_run
    torch.manual_seed(0)
    n, h, kq, s, d = 2, 8, 300, 1024, 32
    q = torch.randn(n, h, kq, d, requires_grad=True)
    k = torch.randn(s, n, h, d).permute(1, 2, 0, 3).requires_grad_(True)
    v = torch.randn(s, n, h, d).permute(1, 2, 0, 3).requires_grad_(True)
    mask = torch.zeros(n, s, dtype=torch.bool)
    mask[1, s // 2:] = True
    weight = torch.zeros(n, kq)
    weight[:, :10] = 1.0
    student = torch.randn(s, n, h, d).permute(1, 2, 0, 3).requires_grad_(True)
    teacher = torch.randn(s, n, h, d).permute(1, 2, 0, 3)
    mse_weight = torch.rand(n, h, s)

    out, lse = ops.instance_attention(q, k, v, mask, backend="triton")
    grad_out = torch.ones_like(out)

    def attention_forward():
        with torch.no_grad():
            ops.instance_attention(q, k, v, mask, backend="triton")

    def attention_forward_backward():
        out, lse = ops.instance_attention(q, k, v, mask, backend="triton")
        torch.autograd.grad((out, lse), (q, k, v), (grad_out, torch.ones_like(lse)))

    def value_mask_with_lse():
        ops.instance_value_mask(q, k, weight, mask, lse=lse.detach(), backend="triton")

    def value_mask_without_lse():
        ops.instance_value_mask(q, k, weight, mask, temperature=0.5, backend="triton")

    def feature_mse_forward_backward():
        loss = ops.masked_feature_mse(student, teacher, mse_weight, backend="triton")
        torch.autograd.grad(loss, student)

    print(f"torch {torch.__version__}; host time per eager call (lowest / median of 300) and Triton launches")
    for name, call in (
        ("attention fwd", attention_forward),
        ("attention fwd+bwd", attention_forward_backward),
        ("value mask (lse given)", value_mask_with_lse),
        ("value mask (T = 0.5)", value_mask_without_lse),
        ("feature MSE fwd+bwd", feature_mse_forward_backward),
    ):
        lowest, median, launches = _time(call)
        print(f"  {name:24s} {lowest:7.1f} / {median:7.1f} us   {launches} launches")
    return 0


if __name__ == "__main__":
    sys.exit(main())
