"""CPU memory of a call, from the profiler's allocation events.

PyTorch keeps no allocator counter on the CPU, so ``profile_cpu_allocations`` runs the call
under ``torch.profiler`` with ``profile_memory=True`` and reads one record per allocation
and free. Used by the benchmarks and by the tests that check no [N, h, K, S] tensor is made.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch.profiler import ProfilerActivity, profile


@dataclass(frozen=True)
class AllocationProfile:
    """What a call allocated on the CPU.

    Attributes:
        sizes: bytes of each allocation, in time order (frees left out).
        peak_bytes: the most bytes held at once beyond what was held before the call
            (outputs, gradients, saved tensors and temporaries; not the inputs).
    """

    sizes: tuple[int, ...]
    peak_bytes: int

    @property
    def largest_bytes(self) -> int:
        """The largest single allocation, in bytes (0 when nothing was allocated)."""
        return max(self.sizes, default=0)


def profile_cpu_allocations(fn: Callable[[], Any]) -> tuple[Any, AllocationProfile]:
    """Run ``fn()`` once under the profiler; return its result and its CPU allocations.

    Only memory taken through PyTorch's CPU allocator is seen (not a kernel's own malloc).
    """
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        result = fn()
    # prof.events() folds allocations into the op that made them and drops some; the raw
    # kineto events keep one "[memory]" record per allocation (+bytes) and free (-bytes).
    events = sorted(
        (e.start_ns(), e.nbytes())
        for e in prof.profiler.kineto_results.events()
        if e.name() == "[memory]" and e.device_type() == torch.autograd.DeviceType.CPU
    )
    held = peak = 0
    for _, nbytes in events:
        held += nbytes
        peak = max(peak, held)
    return result, AllocationProfile(tuple(n for _, n in events if n > 0), peak)
