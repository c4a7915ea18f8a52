"""CPU memory of a call, from the profiler's allocation events.

PyTorch keeps no allocator counter on the CPU, so ``profile_cpu_allocations`` runs the call
under ``torch.profiler.profile(profile_memory=True)`` and reads one record per allocation and
free from the trace the profiler exports (``export_chrome_trace``, a documented method).
Used by the benchmarks, ``examples/ops_demo.py`` and the tests that check no [N, h, K, S]
tensor is made.
"""

from __future__ import annotations

import json
import os
import sys
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

from torch.profiler import ProfilerActivity, profile

_CPU = 0  # the "Device Type" of a trace's memory record: c10::DeviceType::CPU


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
    Memory allocated before the call and freed during it is not reported by the profiler,
    so it does not lower the figure.
    """
    prof = profile(activities=[ProfilerActivity.CPU], profile_memory=True)
    with _stderr_silenced():
        prof.start()
    try:
        result = fn()
    finally:
        with _stderr_silenced():
            prof.stop()
    # prof.events() / key_averages() fold each allocation into the op that made it (a
    # temporary freed inside its op nets to zero); the exported trace keeps one "[memory]"
    # instant event per allocation (+bytes) and per free (-bytes), with its timestamp.
    with tempfile.TemporaryDirectory(prefix="icd_profile_") as folder:
        path = os.path.join(folder, "trace.json")
        prof.export_chrome_trace(path)
        with open(path) as f:
            trace = json.load(f)
    events = trace["traceEvents"] if isinstance(trace, dict) else trace
    records = sorted(  # stable: records with equal timestamps keep the trace's order
        (
            (e["ts"], int(e["args"]["Bytes"]))
            for e in events
            if e.get("name") == "[memory]" and e.get("args", {}).get("Device Type") == _CPU
        ),
        key=lambda record: record[0],
    )
    held = peak = 0
    for _, nbytes in records:
        held += nbytes
        peak = max(peak, held)
    return result, AllocationProfile(tuple(n for _, n in records if n > 0), peak)


@contextmanager
def _stderr_silenced() -> Iterator[None]:
    """File descriptor 2 pointed at /dev/null: the profiler's C++ side (kineto) prints a
    "USDT: ... profiler_start" / "profiler_stop" line per start and stop that no log level
    turns off (KINETO_LOG_LEVEL does not); only the start and stop run in here, never the call."""
    sys.stderr.flush()
    saved = os.dup(2)
    try:
        with open(os.devnull, "w") as null:
            os.dup2(null.fileno(), 2)
        yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)
