"""A worked example of icd.ops: the ICD loss path, reference vs the fused backends on this machine.

Builds RetinaNet-like inputs (P3-P7 of a 512x853 image pair, 20% of keys padded), runs the
three ops of the ICD loss (instance attention forward + backward, the value mask, the
masked feature MSE forward + backward) on every backend that can run here, and prints how
far each result is from the reference, the time and the peak memory each used.

    python examples/ops_demo.py [--k 100] [--input 512x853] [--repeats 3]

Self-contained: it needs only an installed ``icd``, its public ``icd.ops`` and ``icd.profiling``
(peak CPU memory from the profiler's allocation records); time with ``time.perf_counter``.
"""

from __future__ import annotations

import argparse
import math
import statistics
import time
from collections.abc import Callable
from typing import Any

import torch

import icd.ops as ops
from icd.ops.backends import BACKEND_TABLE
from icd.profiling import profile_cpu_allocations

HEADS, HEAD_DIM = 8, 32


def fpn_tokens(height: int, width: int, strides=(8, 16, 32, 64, 128)) -> int:
    return sum(math.ceil(height / s) * math.ceil(width / s) for s in strides)


def time_and_peak(fn: Callable[[], Any], repeats: int) -> tuple[Any, float, int]:
    """(result of a first profiled call, median seconds of ``repeats`` timed calls, peak CPU bytes)."""
    result, allocations = profile_cpu_allocations(fn)  # also the warm-up
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return result, statistics.median(times), allocations.peak_bytes


def loss_path(inputs: dict, backend: str) -> dict:
    """One ICD loss evaluation: attention (fwd+bwd), value mask, feature MSE (fwd+bwd)."""
    q, k, v, mask, real, student = (inputs[n] for n in ("q", "k", "v", "mask", "real", "student"))
    for t in (q, k, v, student):
        t.grad = None
    out, lse = ops.instance_attention(q, k, v, mask, backend=backend)
    weight = ops.instance_value_mask(q, k, real, mask, lse=lse.detach(), backend=backend)
    mse = ops.masked_feature_mse(student, v.detach(), weight, backend=backend)
    (out.square().mean() + mse).backward()
    return {"out": out.detach(), "lse": lse.detach(), "value mask": weight, "mse": mse.detach(),
            "dq": q.grad.clone(), "dk": k.grad.clone(), "d student": student.grad.clone()}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--k", type=int, default=100, help="instance slots per image")
    parser.add_argument("--input", default="512x853", help="input size HxW (P3-P7 levels)")
    parser.add_argument("--repeats", type=int, default=3, help="timed calls per backend (the median is shown)")
    args = parser.parse_args(argv)
    height, width = (int(x) for x in args.input.split("x"))
    n, s = 2, fpn_tokens(height, width)
    torch.manual_seed(0)
    mask = torch.zeros(n, s, dtype=torch.bool)
    mask[1, int(0.6 * s):] = True  # the second image is smaller: 40% of its keys are padding
    inputs = {
        "q": torch.randn(n, HEADS, args.k, HEAD_DIM, requires_grad=True),
        "k": torch.randn(n, HEADS, s, HEAD_DIM, requires_grad=True),
        "v": torch.randn(n, HEADS, s, HEAD_DIM, requires_grad=True),
        "mask": mask,
        "real": (torch.rand(n, args.k) < 0.2).float(),
        "student": torch.randn(n, HEADS, s, HEAD_DIM, requires_grad=True),
    }
    print(f"icd.ops demo: N={n}, h={HEADS}, K={args.k}, S={s} (P3-P7 of {height}x{width}), D={HEAD_DIM}")
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; backends here: "
          f"{', '.join(ops.available_backends())}")
    print(f"the reference materialises [N, h, K, S] = {n * HEADS * args.k * s * 4 / 2**20:.0f} MiB "
          "of fp32 logits per copy\n")
    runs = {}
    for backend in ops.available_backends("cpu"):
        if not BACKEND_TABLE[backend].native_on("cpu"):
            continue  # the Triton interpreter is too slow here; GPU backends: benchmarks/run_attention.py
        runs[backend] = time_and_peak(lambda b=backend: loss_path(inputs, b), args.repeats)
    ref_result, ref_time, ref_peak = runs["reference"]
    print(f"{'backend':<10} {'time (s)':>9} {'x ref':>7} {'peak (MiB)':>11} {'x ref':>7}  max |diff| vs reference")
    for backend, (result, seconds, peak) in runs.items():
        diffs = ", ".join(
            f"{name} {(result[name] - ref_result[name]).abs().max().item():.1e}"
            for name in ("out", "lse", "value mask", "mse", "dq", "dk", "d student")
            if backend != "reference"
        ) or "-"
        print(f"{backend:<10} {seconds:9.3f} {seconds / ref_time:7.2f} {peak / 2**20:11.1f} "
              f"{peak / max(ref_peak, 1):7.2f}  {diffs}")


if __name__ == "__main__":
    main()
