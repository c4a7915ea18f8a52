"""Timing and peak-memory helpers shared by the benchmark scripts.

A measured call is a zero-argument function; its inputs are made beforehand. The ``.grad`` of
the tensors in ``grad_to_none`` is dropped before each call, outside the timed region.

Time:
  * CPU: ``torch.utils.benchmark.Timer(...).blocked_autorange()``, the per-call times of its
    blocks (a block is one call unless a call takes under ~10 ms).
  * CUDA: ``triton.testing.do_bench`` (CUDA events around each call, L2 cache flushed
    before each), all its per-call times.

Peak memory is the most bytes held at once during the call beyond what was held before it:
the call's outputs, gradients, saved activations and temporaries count, the inputs do not.
  * CUDA: ``torch.cuda.max_memory_allocated()`` over the call minus
    ``torch.cuda.memory_allocated()`` before it.
  * CPU: PyTorch keeps no allocator counter, so the call runs once under ``torch.profiler``
    with ``profile_memory=True`` (``icd.profiling``); the peak of the running sum of its
    allocation (+bytes) and free (-bytes) records, in time order, is the figure. It sees
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
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from git_info import git_commit
from torch import Tensor
from torch.utils.benchmark import Timer

from icd.profiling import profile_cpu_allocations

Call = Callable[[], Any]

CUDA_MS_PER_REPEAT = 5.0  # do_bench times the calls that fit in repeats x 5 ms (20 -> its default 100 ms)


@dataclass
class Measurement:
    """Per-call wall times (seconds), the peak memory and the first call's result.

    Each entry of ``times`` is the mean of a block of ``calls_per_time`` calls (1 unless the
    calls are fast: ``Timer.blocked_autorange`` groups them).
    """

    times: list[float]
    peak_bytes: int
    result: Any = None
    calls_per_time: int = 1

    @property
    def calls(self) -> int:
        """How many calls were timed."""
        return len(self.times) * self.calls_per_time

    @property
    def median(self) -> float:
        return statistics.median(self.times)


def drop_grads(tensors: Sequence[Tensor]) -> None:
    for t in tensors:
        t.grad = None


def peak_memory(fn: Call, device: torch.device) -> tuple[Any, int, float]:
    """Run ``fn`` once; (its result, peak bytes beyond what was held before, wall seconds).

    CPU: under the profiler (icd.profiling); CUDA: the allocator's peak counter.
    """
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        before = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        start = time.perf_counter()
        result = fn()
        torch.cuda.synchronize(device)
        return result, torch.cuda.max_memory_allocated(device) - before, time.perf_counter() - start
    seconds = 0.0

    def timed() -> Any:
        nonlocal seconds
        start = time.perf_counter()
        out = fn()
        seconds = time.perf_counter() - start
        return out

    result, allocations = profile_cpu_allocations(timed)
    return result, allocations.peak_bytes, seconds


def time_once(fn: Call, device: torch.device) -> tuple[Any, float]:
    """(result, seconds) of one call: a stopwatch for interleaving single calls of several
    variants (run_distill.py), which the repeating timers of ``measure`` cannot do."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    start = time.perf_counter()
    result = fn()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return result, time.perf_counter() - start


def measure(
    fn: Call,
    device: torch.device,
    *,
    grad_to_none: Sequence[Tensor] = (),
    warmup: int = 2,
    repeats: int = 5,
    slow_s: float = 1.0,
    slow_repeats: int = 3,
) -> Measurement:
    """Per-call times and the peak memory of ``fn``; ``result`` is the first call's return value.

    CPU: the first call is profiled for memory (a warm-up too); ``warmup - 2`` more warm-ups
    run when it took under ``slow_s``; then ``Timer.blocked_autorange`` (its block-size
    estimate is the last warm-up) runs until the timed calls add up to about ``repeats``
    calls (``slow_repeats`` for calls over ``slow_s``). CUDA: ``warmup`` calls (they absorb
    compilation and autotuning), one call for memory, then ``triton.testing.do_bench`` over
    ``repeats`` x 5 ms of calls.
    """
    gc.collect()
    drop_grads(grad_to_none)
    if device.type == "cuda":
        for _ in range(warmup):
            fn()
            drop_grads(grad_to_none)
        result, peak, _ = peak_memory(fn, device)
        drop_grads(grad_to_none)
        times, per_time = _do_bench_seconds(fn, grad_to_none, repeats), 1
    else:
        result, peak, first = peak_memory(fn, device)
        drop_grads(grad_to_none)
        if first < slow_s:
            for _ in range(warmup - 2):
                fn()
                drop_grads(grad_to_none)
        calls = repeats if first < slow_s else min(repeats, slow_repeats)
        times, per_time = _autorange_seconds(fn, grad_to_none, calls, first)
    drop_grads(grad_to_none)
    return Measurement(times=times, peak_bytes=int(peak), result=result, calls_per_time=per_time)


def _autorange_seconds(
    fn: Call, grad_to_none: Sequence[Tensor], calls: int, estimate_s: float
) -> tuple[list[float], int]:
    """(per-call seconds of each block, calls per block) from ``Timer.blocked_autorange``, run
    for about ``calls`` calls of ``estimate_s`` each. The gradients are dropped in ``setup``,
    outside the timed region, before each block; a block of several (fast) calls drops them
    again before each call."""
    timer = Timer(
        stmt="drop_grads(grad_to_none); fn()",
        setup="drop_grads(grad_to_none)",
        globals={"fn": fn, "drop_grads": drop_grads, "grad_to_none": list(grad_to_none)},
        num_threads=torch.get_num_threads(),
    )
    m = timer.blocked_autorange(min_run_time=max((calls - 0.5) * estimate_s, 1e-3))
    return list(m.times), m.number_per_run


def _do_bench_seconds(fn: Call, grad_to_none: Sequence[Tensor], repeats: int) -> list[float]:
    """Per-call seconds from ``triton.testing.do_bench`` (it drops the gradients before each call)."""
    from triton.testing import do_bench

    ms = do_bench(fn, rep=max(1, round(repeats * CUDA_MS_PER_REPEAT)), grad_to_none=list(grad_to_none) or None,
                  return_mode="all")  # fmt: skip
    return [t / 1e3 for t in ms]


def eager_times(
    fn: Call, device: torch.device, *, grad_to_none: Sequence[Tensor] = (), repeats: int = 20
) -> list[float]:
    """Wall seconds of ``repeats`` eager calls, host included: the device is synchronised before
    and after each call (the gradients are dropped before it, outside the timed region)."""
    times = []
    for _ in range(repeats):
        drop_grads(grad_to_none)
        _, seconds = time_once(fn, device)
        times.append(seconds)
    drop_grads(grad_to_none)
    return times


def graph_replay_times(
    fn: Call, *, grad_to_none: Sequence[Tensor] = (), repeats: int = 20, warmup: int = 3
) -> list[float]:
    """Device seconds of ``repeats`` replays of ``fn`` captured once in a CUDA graph: no host
    (Python, dispatch, launches) in the figure. Each replay is timed alone with CUDA events.

    ``fn`` is warmed up on a side stream first (as ``torch.cuda.graph`` requires); gradients
    are dropped before the capture, so a backward in ``fn`` writes fresh gradients from the
    graph's pool on every replay. The replays reuse one set of inputs (they may sit in L2
    when they fit: ~50 MB on an H100/H200). Raises what the capture raises (a host sync,
    an op that cannot be captured).
    """
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(warmup):
            drop_grads(grad_to_none)
            fn()
    torch.cuda.current_stream().wait_stream(side)
    torch.cuda.synchronize()
    drop_grads(grad_to_none)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph, capture_error_mode="thread_local"):  # other threads' CUDA calls are no error
        fn()
    graph.replay()
    torch.cuda.synchronize()
    events = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)) for _ in range(repeats)]
    for start, end in events:
        start.record()
        graph.replay()
        end.record()
    torch.cuda.synchronize()
    times = [start.elapsed_time(end) / 1e3 for start, end in events]
    del graph
    drop_grads(grad_to_none)
    return times


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
    """CPU model and cores, GPU name, library versions, the commit: printed and stored with the results."""
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
        "commit": git_commit(),
    }
    return info


# Written into every row of every benchmark CSV, so that a row read alone says where it was measured.
RUN_COLUMNS = ("machine", "torch_threads", "torch", "commit")


def run_columns(info: Mapping[str, str], device: torch.device) -> dict[str, str]:
    """The RUN_COLUMNS values of ``machine_info``: the GPU's name on CUDA, else the CPU model with its cores."""
    machine = info["gpu"] if device.type == "cuda" else f"{info['cpu']} ({info['cores']} cores)"
    return {"machine": machine, "torch_threads": info["torch_threads"], "torch": info["torch"],
            "commit": info["commit"]}  # fmt: skip


def default_out_dir() -> Path:
    """Where a benchmark writes unless told: ~/icd-benchmarks, outside the checkout (``--out
    benchmarks/results`` keeps a result with the project)."""
    return Path.home() / "icd-benchmarks"


OUT_HELP = "folder for the CSV and PNG (default: ~/icd-benchmarks; benchmarks/results keeps them with the project)"


# --- output --------------------------------------------------------------------------------


def write_csv(path: Path, rows: Sequence[dict[str, Any]], columns: Sequence[str], run: Mapping[str, str]) -> None:
    """``rows`` as CSV with ``columns`` then RUN_COLUMNS (``run``: ``run_columns()``) in every row."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fields = [*columns, *(c for c in RUN_COLUMNS if c not in columns)]
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=fields, extrasaction="ignore")
        writer.writeheader()
        for row in rows:
            row = {**row, **{c: run[c] for c in RUN_COLUMNS}}
            writer.writerow({c: _csv_value(row.get(c)) for c in fields})


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
