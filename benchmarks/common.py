"""Timing and peak-memory helpers shared by the benchmark scripts.

A measured call is a zero-argument function; its inputs are made beforehand, and a
``setup`` function (also outside the measured region) runs before every call, e.g. to drop
the gradients of the previous one.

Peak memory is the most bytes held at once during the call beyond what was held before it:
the call's outputs, gradients, saved activations and temporaries count, the inputs do not.
  * CUDA: ``torch.cuda.max_memory_allocated()`` over the call minus
    ``torch.cuda.memory_allocated()`` before it.
  * CPU: PyTorch keeps no allocator counter, so the call runs once under
    ``torch.profiler`` with ``profile_memory=True``; the peak of the running sum of its
    allocation (+bytes) and free (-bytes) events, in time order, is the figure. It sees
    every tensor made through PyTorch's CPU allocator, not memory a kernel takes with plain
    malloc. ``rss_peak`` measures the resident-set high-water mark instead, for a
    cross-check in a fresh process.
"""

from __future__ import annotations

import csv
import gc
import os
import platform
import re
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from icd.profiling import profile_cpu_allocations

Call = Callable[[], Any]


@dataclass
class Measurement:
    """Wall times (seconds) of the repeated calls, the peak memory and the first result."""

    times: list[float]
    peak_bytes: int
    result: Any = None

    @property
    def median(self) -> float:
        return statistics.median(self.times)


def _noop() -> None:
    return None


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def cpu_peak_memory(fn: Call) -> tuple[Any, int, float]:
    """Run ``fn`` once under the profiler; (its result, peak bytes, wall seconds).

    The peak is that of the running sum of the CPU allocator's alloc/free events
    (icd.profiling), so memory held before the call (the inputs) is not counted.
    """
    start = time.perf_counter()
    result, allocations = profile_cpu_allocations(fn)
    return result, allocations.peak_bytes, time.perf_counter() - start


def cuda_peak_memory(fn: Call, device: torch.device) -> tuple[Any, int]:
    """Run ``fn`` once; (its result, peak allocated during it minus what was allocated before)."""
    torch.cuda.synchronize(device)
    before = torch.cuda.memory_allocated(device)
    torch.cuda.reset_peak_memory_stats(device)
    result = fn()
    torch.cuda.synchronize(device)
    return result, torch.cuda.max_memory_allocated(device) - before


def _time_once(fn: Call, device: torch.device) -> tuple[Any, float]:
    if device.type == "cuda":
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        result = fn()
        end.record()
        end.synchronize()
        return result, start.elapsed_time(end) / 1000.0
    start_s = time.perf_counter()
    result = fn()
    return result, time.perf_counter() - start_s


def measure(
    fn: Call,
    device: torch.device,
    *,
    setup: Call = _noop,
    warmup: int = 1,
    repeats: int = 5,
    slow_s: float = 1.0,
    slow_repeats: int = 3,
) -> Measurement:
    """Median-ready wall times and the peak memory of ``fn``.

    CPU: the profiled call (for memory) is the first warm-up; the remaining ``warmup - 1``
    warm-ups run only when that call took under ``slow_s``. CUDA: ``warmup`` calls (they
    absorb compilation and autotuning), one call for memory, then the timed calls, each
    timed with CUDA events. Calls slower than ``slow_s`` are repeated ``slow_repeats``
    times at most. ``result`` is the first call's return value.
    """
    gc.collect()
    setup()
    if device.type == "cuda":
        result = fn()
        for _ in range(warmup - 1):
            setup()
            fn()
        setup()
        _, peak = cuda_peak_memory(fn, device)
        first = None
    else:
        result, peak, first = cpu_peak_memory(fn)
        if first < slow_s:
            for _ in range(warmup - 1):
                setup()
                fn()
    times: list[float] = []
    while len(times) < repeats:
        setup()
        _synchronize(device)
        _, elapsed = _time_once(fn, device)
        times.append(elapsed)
        if elapsed > slow_s and len(times) >= slow_repeats:
            break
    setup()
    return Measurement(times=times, peak_bytes=int(peak), result=result)


# --- resident-set cross-check (Linux) ------------------------------------------------------


def _status_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"/proc/self/status has no {field} line")


def rss_peak(fn: Call) -> int:
    """Bytes by which the resident set's high-water mark rose above the RSS before ``fn``.

    Resets the high-water mark first (``/proc/self/clear_refs``, Linux). Meant for a fresh
    process: freed heap pages that glibc keeps around could hide part of the peak.
    """
    gc.collect()
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    before = _status_kib("VmRSS")
    fn()
    return (_status_kib("VmHWM") - before) * 1024


# --- machine description ----------------------------------------------------------------


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return cpu_model()


def slug(text: str) -> str:
    """A file-name-safe lower-case form: 'NVIDIA H100 80GB HBM3' -> 'nvidia-h100-80gb-hbm3'."""
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-") or "unknown"


def machine_info(device: torch.device) -> dict[str, str]:
    """CPU model and cores, GPU name, library versions: printed and stored with the results."""
    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = "not installed"
    info = {
        "cpu": cpu_model(),
        "cores": str(os.cpu_count()),
        "torch_threads": str(torch.get_num_threads()),
        "gpu": torch.cuda.get_device_name(device) if device.type == "cuda" else "none",
        "torch": torch.__version__,
        "triton": triton_version,
        "python": platform.python_version(),
    }
    return info


# --- output --------------------------------------------------------------------------------


def write_csv(path: Path, rows: Sequence[dict[str, Any]], columns: Sequence[str]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(columns), extrasaction="ignore")
        writer.writeheader()
        for row in rows:
            writer.writerow({c: _csv_value(row.get(c)) for c in columns})


def _csv_value(value: Any) -> Any:
    if value is None:
        return ""
    if isinstance(value, float):
        return f"{value:.6g}"
    return value


def format_table(rows: Sequence[Sequence[str]], header: Sequence[str]) -> str:
    """Left-aligned first columns, right-aligned numbers, widths fitted to the contents."""
    widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header))]
    lines = []
    for row in [header, *rows]:
        cells = []
        for i, cell in enumerate(row):
            cell = str(cell)
            cells.append(cell.ljust(widths[i]) if i < 3 else cell.rjust(widths[i]))
        lines.append("  ".join(cells).rstrip())
    lines.insert(1, "-" * len(lines[0]))
    return "\n".join(lines)
