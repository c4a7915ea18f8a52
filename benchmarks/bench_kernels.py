"""The kernel benchmark of the GPU issues (28 item 1, 30 item 4): every op, every backend, three
shapes, bf16 and fp16, GPU time and eager time side by side in one run, beside each shape's floor.

    python benchmarks/bench_kernels.py --device cuda             # ~2 min on an H100/H200
    python benchmarks/bench_kernels.py --device cuda --quick     # the ICD shape in bf16 only
    python benchmarks/bench_kernels.py --device cpu              # CPU-sized shapes (tests, CI)

Ops and passes: attention fwd and fwd+bwd (backends: icd triton, icd cuda, the reference,
SDPA cuDNN, SDPA efficient with the boolean mask, FlexAttention compiled with a block mask
from the padding), value mask fwd and feature MSE fwd+bwd (icd backends). On CPU: the icd
``reference`` and ``cpu`` backends and SDPA's flash and math kernels.

Shapes (bf16 or fp16, 20% of keys padded, the inputs of benchmarks/workload.py):
  icd     N=2, h=8, K=300, S=22,400, D=32   (ICD at 800x1333, P3-P7)
  d64     N=2, h=4, K=300, S=22,400, D=64   (C=256 as 4 heads)
  n8k100  N=8, h=8, K=100, S=22,400, D=32   (a larger batch, fewer slots)

Per row:
  * ``gpu_ms``: median device time of CUDA-graph replays of the call (common.graph_replay_times):
    the kernels alone, no host. Blank with ``graph_status`` saying why when the call cannot be
    captured (or on CPU).
  * ``eager_ms``: median wall time of eager calls with a synchronize before and after each
    (common.eager_times): what a training step pays, host included.
  * the shape's floor: FLOPs of the matrix products, exp2 count, HBM bytes (each input read
    once, each output written once), and the microseconds each costs at the device's peak
    (``PEAKS``: datasheet figures, cited); ``floor_us`` is the largest of the three. The counts
    are those of docs/gpu-kernels.md section 1 (tests/test_gpu_check.py checks the ICD shape's).
  * ratios to SDPA cuDNN's time for the same pass (``sdpa_flash`` on CPU).
Then TARGET lines (issue 28 items 4 and 5, issue 30 item 4) with PASS/FAIL and the numbers, a
CSV (one row per op/backend/shape/dtype/pass) and a PNG of the attention ratios.
A backend that errors gets an error row; the run goes on.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import os
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from bench_attention import call_of, make_attend
from bench_feature_mse import build_call as mse_call
from bench_value_mask import build_call as value_mask_call
from common import (
    OUT_HELP,
    default_out_dir,
    eager_times,
    graph_replay_times,
    machine_info,
    peak_memory,
    run_columns,
    slug,
    write_csv,
)
from op_sweep import icd_backends
from workload import REAL_INSTANCES, Inputs, Workload, make_inputs, relative_error

import icd.ops

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


@dataclass(frozen=True)
class Shape:
    name: str
    workload: Workload

    @property
    def text(self) -> str:
        w = self.workload
        return f"N={w.n} h={w.heads} K={w.k} S={w.s:,} D={w.head_dim}"


GPU_SHAPES = (
    Shape("icd", Workload("p3-p7", 800, 1333, 300)),
    Shape("d64", Workload("p3-p7", 800, 1333, 300, heads=4, head_dim=64)),
    Shape("n8k100", Workload("p3-p7", 800, 1333, 100, n=8)),
)
# The same three shapes at a size the CPU (and the tests) measure in seconds: S = 323.
CPU_SHAPES = (
    Shape("icd", Workload("p3-p7", 96, 160, 24)),
    Shape("d64", Workload("p3-p7", 96, 160, 24, heads=4, head_dim=64)),
    Shape("n8k100", Workload("p3-p7", 96, 160, 8, n=8)),
)

OPS = (("attention", "fwd"), ("attention", "fwd+bwd"), ("value_mask", "fwd"), ("feature_mse", "fwd+bwd"))
# Every op runs on the icd backends of the device (op_sweep.icd_backends: the backend table);
# attention also on torch's own kernels, per device type, the first of which is the ratio baseline.
ATTENTION_PEERS = {"cuda": ("sdpa_cudnn", "sdpa_efficient", "flex"), "cpu": ("sdpa_flash", "sdpa_math")}
BASELINE = {device_type: peers[0] for device_type, peers in ATTENTION_PEERS.items()}

COLUMNS = (
    "device", "device_name", "commit", "torch", "triton", "op", "pass", "backend", "shape", "N", "h",
    "K", "S", "D", "dtype", "masked_frac", "gpu_ms", "gpu_min_ms", "gpu_max_ms", "eager_ms",
    "eager_min_ms", "eager_max_ms", "repeats", "peak_mb", "gpu_vs_baseline", "eager_vs_baseline",
    "baseline", "gflop", "mexp2", "hbm_mb", "floor_us", "floor_by", "gpu_vs_floor", "rel_err",
    "err_vs", "graph_status", "status",
)  # fmt: skip


# --- the device's peaks and each shape's floor ------------------------------------------------


@dataclass(frozen=True)
class Peak:
    """Datasheet peaks of one GPU: dense bf16/fp16 tensor-core FLOP/s, HBM bytes/s, and the
    exp2 rate (16 results per clock per SM from the special-function units on sm_80/sm_90, at
    the boost clock)."""

    name: str
    tensor_flops: float
    hbm_bytes_s: float
    sms: int
    boost_hz: float
    source: str

    @property
    def exp2_s(self) -> float:
        return 16 * self.sms * self.boost_hz


EXP2_SOURCE = (
    "exp2: 16 results/clock/SM (CUDA C++ Programming Guide, 'Throughput of Native Arithmetic "
    "Instructions', compute capability 8.x/9.0) x SMs x boost clock"
)
# Matched against torch.cuda.get_device_name() in order (first substring match wins).
PEAKS = (
    Peak("H100 PCIe", 756e12, 2.0e12, 114, 1.755e9,
         "NVIDIA H100 Tensor Core GPU datasheet: H100 PCIe bf16 1,513 TFLOPS with sparsity (756 dense), "
         "2.0 TB/s HBM2e, 114 SMs, 1,755 MHz boost"),
    Peak("H100 NVL", 835e12, 3.9e12, 132, 1.785e9,
         "NVIDIA H100 Tensor Core GPU datasheet: H100 NVL bf16 1,671 TFLOPS with sparsity (835 dense), "
         "3.9 TB/s HBM3, 1,785 MHz boost"),
    Peak("H100", 989e12, 3.35e12, 132, 1.98e9,
         "NVIDIA H100 Tensor Core GPU datasheet: H100 SXM bf16 1,979 TFLOPS with sparsity (989 dense), "
         "3.35 TB/s HBM3, 132 SMs, 1,980 MHz boost"),
    Peak("H200 NVL", 835e12, 4.8e12, 132, 1.785e9,
         "NVIDIA H200 Tensor Core GPU datasheet: H200 NVL bf16 1,671 TFLOPS with sparsity (835 dense), "
         "4.8 TB/s HBM3e"),
    Peak("H200", 989e12, 4.8e12, 132, 1.98e9,
         "NVIDIA H200 Tensor Core GPU datasheet: H200 SXM bf16 1,979 TFLOPS with sparsity (989 dense), "
         "4.8 TB/s HBM3e, 132 SMs (as the H100 SXM)"),
)  # fmt: skip


def peak_for(device_name: str) -> Peak | None:
    """The PEAKS entry of a device name ('NVIDIA H100 80GB HBM3' -> H100 SXM), or None."""
    upper = device_name.upper()
    return next((p for p in PEAKS if p.name.upper() in upper), None)


def real_slots(n: int) -> int:
    """Slots of weight > 0 over a batch of ``n`` images (the value mask's work): workload.REAL_INSTANCES."""
    return sum(REAL_INSTANCES[i % len(REAL_INSTANCES)] for i in range(n))


def floor(op: str, pass_: str, n: int, h: int, kq: int, s: int, d: int, elem: int) -> dict[str, float]:
    """The least work of one call: ``flop`` (matrix products, 2 per multiply-add), ``exp2``
    (exponentials), ``bytes`` (HBM: each input read once, each output written once).

    attention fwd: QK^T and PV (4 N h K S D), one exp per logit, q/k/v/mask read, out and lse
    (float32) written. fwd+bwd adds the backward of a FlashAttention-style kernel: the logits
    recomputed and four more products (dV, dP, dQ, dK: 10 N h K S D), a second exp per logit,
    q, k, v, out, dO, lse, delta read and dq, dk, dv written. value mask: its weighted
    (real) slots only (weight-0 slots need no work, issue 28 item 4): the logits of those
    slots and their exp, q/k/mask read and the float32 [N, h, S] mask written. feature MSE
    fwd+bwd: two passes, as autograd runs them: student, teacher and the float32 weight read
    by each, the student's gradient written (``bytes_fused``: one pass, read once).
    """
    nhsd, nhkd, nhk, nhs = n * h * s * d, n * h * kq * d, n * h * kq, n * h * s
    if op == "attention":
        fwd_bytes = (2 * nhkd + 2 * nhsd) * elem + n * s + 4 * nhk
        if pass_ == "fwd":
            return {"flop": 4 * nhk * s * d, "exp2": nhk * s, "bytes": fwd_bytes}
        bwd_bytes = (4 * nhkd + 4 * nhsd) * elem + 8 * nhk
        return {"flop": 14 * nhk * s * d, "exp2": 2 * nhk * s, "bytes": fwd_bytes + bwd_bytes}
    if op == "value_mask":
        real = real_slots(n) * h
        return {"flop": 2 * real * s * d, "exp2": real * s, "bytes": (nhsd + nhkd) * elem + n * s + 4 * nhs}
    if op == "feature_mse":
        return {"flop": 0, "exp2": 0, "bytes": 5 * nhsd * elem + 8 * nhs, "bytes_fused": 3 * nhsd * elem + 4 * nhs}
    raise ValueError(f"floor: op {op!r}")


def floor_us(work: dict[str, float], peak: Peak | None) -> tuple[float | None, str, dict[str, float]]:
    """(the floor in microseconds: the largest term, which term, every term) at ``peak``."""
    if peak is None:
        return None, "", {}
    terms = {
        "tensor": work["flop"] / peak.tensor_flops * 1e6,
        "exp2": work["exp2"] / peak.exp2_s * 1e6,
        "hbm": work["bytes"] / peak.hbm_bytes_s * 1e6,
    }
    by = max(terms, key=terms.get)
    return terms[by], by, terms


# --- measuring -------------------------------------------------------------------------------


def _median_ms(times: Sequence[float]) -> tuple[float, float, float]:
    return statistics.median(times) * 1e3, min(times) * 1e3, max(times) * 1e3


def backends_of(op: str, device_type: str, wanted: Sequence[str] | None) -> list[str]:
    """In measuring order: the reference, the baseline peer (attention), the other icd backends
    built for ``device_type``, the other peers (attention); only ``wanted`` ones when given."""
    built = set(icd.ops.available_backends())
    fused = [b for b in icd_backends(device_type) if b in built and b != "reference"]
    peers = ATTENTION_PEERS[device_type] if op == "attention" else ()
    names = ["reference", *peers[:1], *fused, *peers[1:]]
    return [b for b in names if wanted is None or b in wanted]


def measure_row(
    call: Callable[[], Any], x: Inputs, device: torch.device, repeats: int, warmup: int
) -> tuple[dict[str, Any], Any]:
    """(timings, the call's result) of one call: warm-ups (compilation, autotuning), the peak
    memory call, eager times, then CUDA-graph replay times (CUDA only)."""
    leaves = x.leaves()
    for _ in range(warmup):
        x.clear_grads()
        call()
    x.clear_grads()
    result, peak, _ = peak_memory(call, device)
    x.clear_grads()
    row: dict[str, Any] = {"peak_mb": peak / 2**20, "repeats": repeats}
    eager = eager_times(call, device, grad_to_none=leaves, repeats=repeats)
    row["eager_ms"], row["eager_min_ms"], row["eager_max_ms"] = _median_ms(eager)
    if device.type != "cuda":
        row["graph_status"] = "n/a: no CUDA"
        return row, result
    try:
        gpu = graph_replay_times(call, grad_to_none=leaves, repeats=repeats)
        row["gpu_ms"], row["gpu_min_ms"], row["gpu_max_ms"] = _median_ms(gpu)
        row["graph_status"] = "ok"
    except Exception as exc:  # a call that cannot be captured keeps its eager time
        row["graph_status"] = f"error: {type(exc).__name__}: {' '.join(str(exc).split())[:120]}"
        x.clear_grads()
        with contextlib.suppress(Exception):  # a broken context fails the next row, not this one
            torch.cuda.synchronize()
    return row, result


def call_for(op: str, pass_: str, backend: str, x: Inputs, w: Workload, attends: dict) -> Callable[[], Any]:
    if op == "attention":
        if backend not in attends:  # flex compiles once per shape and dtype, for both passes
            attends[backend] = make_attend(backend, x, w)
        return call_of(attends[backend], pass_, x)
    if op == "value_mask":
        return value_mask_call(backend, pass_, x, w)
    return mse_call(backend, pass_, x, w)


def run_block(
    shape: Shape, dtype_name: str, device: torch.device, backends: Sequence[str] | None, repeats: int, warmup: int,
    base: dict[str, Any], on_row: Callable[[dict[str, Any]], None] = lambda row: None,
) -> list[dict[str, Any]]:  # fmt: skip
    """Every op, pass and backend at one shape and dtype; ``on_row`` gets each row when it is done."""
    w = shape.workload
    dtype = DTYPES[dtype_name]
    x = make_inputs(w, device, dtype, "tokens")
    rows = []
    attends: dict[str, Any] = {}
    for op, pass_ in OPS:
        reference: tuple[str, Any] | None = None
        for backend in backends_of(op, device.type, backends):
            row = {
                **base, "op": op, "pass": pass_, "backend": backend, "shape": shape.name, "N": w.n,
                "h": w.heads, "K": w.k if op != "feature_mse" else "", "S": w.s, "D": w.head_dim,
                "dtype": dtype_name, "masked_frac": round(x.masked_frac, 4),
            }  # fmt: skip
            start = time.perf_counter()
            try:
                call = call_for(op, pass_, backend, x, w, attends)
                timings, result = measure_row(call, x, device, repeats, warmup)
                row.update(timings, status="ok")
                if reference is None:
                    reference = (backend, result)
                else:
                    row["rel_err"], row["err_vs"] = relative_error(result, reference[1]), reference[0]
                del result
            except Exception as exc:  # recorded in the row; the next backend runs
                row["status"] = f"error: {type(exc).__name__}: {' '.join(str(exc).split())[:160]}"
                x.clear_grads()
                if device.type == "cuda":
                    with contextlib.suppress(Exception):  # a sticky CUDA error: later rows record it
                        torch.cuda.empty_cache()
            rows.append(row)
            on_row(row)
            gpu = f"{row['gpu_ms']:8.3f}" if "gpu_ms" in row else "       -"
            eager = f"{row['eager_ms']:8.3f}" if "eager_ms" in row else "       -"
            print(f"  {shape.name:7s} {dtype_name} {op:11s} {pass_:7s} {backend:15s} gpu {gpu} ms  eager {eager} ms"
                  f"  {row['status'] if row['status'] != 'ok' else ''} ({time.perf_counter() - start:.1f} s)",
                  flush=True)  # fmt: skip
        del reference
        gc.collect()
    del attends, x
    if device.type == "cuda":
        with contextlib.suppress(Exception):
            torch.cuda.empty_cache()
    return rows


def add_derived(rows: list[dict[str, Any]], device_type: str, peak: Peak | None) -> None:
    """Ratios to the baseline of the same op/pass/shape/dtype, and each row's floor."""
    baseline = BASELINE[device_type]
    ok = {(r["op"], r["pass"], r["shape"], r["dtype"], r["backend"]): r for r in rows if r.get("status") == "ok"}
    for r in rows:
        if r["op"] not in {op for op, _ in OPS}:
            continue
        dims = (int(r["N"]), int(r["h"]), int(r["K"] or 0), int(r["S"]), int(r["D"]))
        work = floor(r["op"], r["pass"], *dims, DTYPES[r["dtype"]].itemsize)
        r["gflop"], r["mexp2"], r["hbm_mb"] = work["flop"] / 1e9, work["exp2"] / 1e6, work["bytes"] / 1e6
        us, by, _ = floor_us(work, peak)
        if us is not None:
            r["floor_us"], r["floor_by"] = us, by
            if r.get("gpu_ms"):
                r["gpu_vs_floor"] = r["gpu_ms"] * 1e3 / us
        b = ok.get((r["op"], r["pass"], r["shape"], r["dtype"], baseline))
        if r["op"] == "attention" and b is not None and r.get("status") == "ok":
            r["baseline"] = baseline
            for key in ("gpu", "eager"):
                if r.get(f"{key}_ms") and b.get(f"{key}_ms"):
                    r[f"{key}_vs_baseline"] = r[f"{key}_ms"] / b[f"{key}_ms"]


# --- targets -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Target:
    """``metric`` of (op, pass, backend) over that of ``versus`` (a backend of ``versus_op``,
    or "floor") at ``shape`` is <= ``limit``."""

    issue: str
    shape: str
    op: str
    pass_: str
    backend: str
    metric: str  # gpu_ms or eager_ms
    versus: str
    limit: float
    versus_op: tuple[str, str] | None = None


TARGETS = (
    Target("28.5", "icd", "attention", "fwd+bwd", "triton", "gpu_ms", "sdpa_cudnn", 0.5),
    Target("28.5", "icd", "attention", "fwd+bwd", "triton", "gpu_ms", "flex", 0.5),
    Target("28.5", "d64", "attention", "fwd+bwd", "triton", "gpu_ms", "sdpa_cudnn", 1.0),
    Target("28.5", "d64", "attention", "fwd+bwd", "triton", "gpu_ms", "flex", 1.0),
    Target("28.5", "n8k100", "attention", "fwd+bwd", "triton", "gpu_ms", "sdpa_cudnn", 1.0),
    Target("28.5", "n8k100", "attention", "fwd+bwd", "triton", "gpu_ms", "flex", 1.0),
    Target("28.5", "icd", "attention", "fwd+bwd", "triton", "eager_ms", "sdpa_cudnn", 1.0),
    Target("28.4", "icd", "value_mask", "fwd", "triton", "gpu_ms", "triton", 0.3, ("attention", "fwd")),
    Target("28.4", "n8k100", "feature_mse", "fwd+bwd", "triton", "gpu_ms", "floor", 1.5),
    Target("30.4", "icd", "attention", "fwd+bwd", "cuda", "gpu_ms", "triton", 2.0),
    Target("30.4", "icd", "attention", "fwd+bwd", "cuda", "gpu_ms", "sdpa_cudnn", 1.5),
    Target("30.4", "icd", "value_mask", "fwd", "cuda", "gpu_ms", "triton", 2.0),
)


def check_targets(rows: Sequence[dict[str, Any]]) -> list[str]:
    """One 'TARGET <issue> PASS|FAIL|n/a ...' line per target and dtype measured."""
    ok = {(r["op"], r["pass"], r["shape"], r["dtype"], r["backend"]): r for r in rows if r.get("status") == "ok"}
    lines = []
    for dtype in sorted({r["dtype"] for r in rows}):
        for t in TARGETS:
            what = f"{dtype} {t.shape}: {t.backend} {t.op} {t.pass_} {t.metric.removesuffix('_ms')}"
            mine = ok.get((t.op, t.pass_, t.shape, dtype, t.backend))
            if t.versus == "floor":
                theirs_ms = (mine or {}).get("floor_us")
                theirs_ms = theirs_ms / 1e3 if theirs_ms else None
                name = "its HBM floor"
            else:
                op, pass_ = t.versus_op or (t.op, t.pass_)
                theirs = ok.get((op, pass_, t.shape, dtype, t.versus))
                theirs_ms = (theirs or {}).get(t.metric)
                name = f"{t.versus}" + (f" {op} {pass_}" if t.versus_op else "")
            mine_ms = (mine or {}).get(t.metric)
            if not mine_ms or not theirs_ms:
                lines.append(f"TARGET {t.issue} n/a  {what} <= {t.limit:g}x {name}: not measured")
                continue
            ratio = mine_ms / theirs_ms
            verdict = "PASS" if ratio <= t.limit else "FAIL"
            lines.append(f"TARGET {t.issue} {verdict} {what} {mine_ms:.3f} ms = {ratio:.2f}x {name} "
                         f"{theirs_ms:.3f} ms (target <= {t.limit:g}x)")  # fmt: skip
    return lines


# --- output ------------------------------------------------------------------------------------


def _num(value: Any, spec: str) -> str:
    return "" if value in (None, "") else format(value, spec)


def markdown(rows: Sequence[dict[str, Any]], device_name: str, peak: Peak | None, targets: Sequence[str]) -> str:
    """Tables per shape and dtype, the floors, the peaks' source and the TARGET lines."""
    out = [f"Device: {device_name}; peaks: " + (f"{peak.name}, {peak.tensor_flops / 1e12:.0f} TFLOP/s dense "
           f"bf16/fp16, {peak.hbm_bytes_s / 1e12:.2f} TB/s, {peak.exp2_s / 1e12:.2f} T exp2/s ({peak.source}; "
           f"{EXP2_SOURCE})" if peak else "none known for this device (floors in microseconds left blank)"), ""]
    blocks = list(dict.fromkeys((r["shape"], r["dtype"]) for r in rows))
    shapes = {s.name: s for s in (*GPU_SHAPES, *CPU_SHAPES)}
    for shape, dtype in blocks:
        mine = [r for r in rows if (r["shape"], r["dtype"]) == (shape, dtype)]
        r0 = mine[0]
        out.append(f"### {shape} ({dtype}): N={r0['N']} h={r0['h']} K={r0['K'] or '-'} S={int(r0['S']):,} "
                   f"D={r0['D']}, {100 * float(r0.get('masked_frac') or 0):.0f}% keys padded")  # fmt: skip
        out.append("")
        out.append("| op | pass | backend | GPU ms (graph) | eager ms (host incl.) | GPU / base | eager / base "
                   "| floor us (by) | GPU / floor | peak MB | rel err | status |")
        out.append("| --- | --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | --- |")
        for r in mine:
            status = r.get("status", "")
            if status == "ok" and r.get("graph_status") not in (None, "ok", "n/a: no CUDA"):
                status = "graph " + r["graph_status"]
            floor_text = f"{r['floor_us']:.1f} ({r['floor_by']})" if r.get("floor_us") else ""
            out.append(
                f"| {r['op']} | {r['pass']} | {r['backend']} | {_num(r.get('gpu_ms'), '.3f')} | "
                f"{_num(r.get('eager_ms'), '.3f')} | {_num(r.get('gpu_vs_baseline'), '.2f')} | "
                f"{_num(r.get('eager_vs_baseline'), '.2f')} | {floor_text} | {_num(r.get('gpu_vs_floor'), '.1f')} | "
                f"{_num(r.get('peak_mb'), '.1f')} | {_num(r.get('rel_err'), '.1e')} | {status} |"
            )
        out.append("")
        out.append(f"Floors at {shapes[shape].text if shape in shapes else shape}, {dtype}:")
        seen = set()
        for r in mine:
            if (r["op"], r["pass"]) in seen or "gflop" not in r:
                continue
            seen.add((r["op"], r["pass"]))
            us = f", {r['floor_us']:.1f} us at peak ({r['floor_by']})" if r.get("floor_us") else ""
            out.append(f"- {r['op']} {r['pass']}: {r['gflop']:.2f} GFLOP, {r['mexp2']:.1f} M exp2, "
                       f"{r['hbm_mb']:.1f} MB HBM{us}")  # fmt: skip
        out.append("")
    out.append("Ratios: to " + ", ".join(sorted({r['baseline'] for r in rows if r.get('baseline')}) or ["-"])
               + " for the same pass (attention). GPU time: median of CUDA-graph replays; eager: median wall "
               "time with a synchronize around each call.")  # fmt: skip
    out.append("")
    out.append("```")
    out.extend(targets or ["(no targets measured)"])
    out.append("```")
    return "\n".join(out) + "\n"


def plot(rows: Sequence[dict[str, Any]], path: Path, device_name: str, baseline: str) -> None:
    """Attention fwd+bwd time over ``baseline``'s, per shape (panels), backend (bars) and dtype,
    GPU time on top, eager below; linear axis from zero, a line at 1."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    att = [r for r in rows if r["op"] == "attention" and r["pass"] == "fwd+bwd" and r.get("status") == "ok"]
    shapes = list(dict.fromkeys(r["shape"] for r in att))
    if not shapes:
        return
    dtypes = sorted({r["dtype"] for r in att})
    fig, axes = plt.subplots(2, len(shapes), figsize=(4.6 * len(shapes), 7.0), squeeze=False)
    for col, shape in enumerate(shapes):
        mine = [r for r in att if r["shape"] == shape]
        backends = list(dict.fromkeys(r["backend"] for r in mine))
        for row, key, label in ((0, "gpu_vs_baseline", "GPU time (graph)"), (1, "eager_vs_baseline", "eager time")):
            ax = axes[row][col]
            width = 0.8 / len(dtypes)
            for j, dtype in enumerate(dtypes):
                values = [next((r.get(key) or 0.0 for r in mine if (r["backend"], r["dtype"]) == (b, dtype)), 0.0)
                          for b in backends]  # fmt: skip
                xs = [i + (j - (len(dtypes) - 1) / 2) * width for i in range(len(backends))]
                ax.bar(xs, values, width=width, label=dtype)
                for xpos, v in zip(xs, values, strict=True):
                    if v:
                        ax.annotate(f"{v:.2f}", (xpos, v), ha="center", va="bottom", fontsize=6)
            ax.axhline(1.0, color="k", lw=0.8)
            ax.set_ylim(bottom=0)
            ax.set_xticks(range(len(backends)), backends, rotation=30, fontsize=8)
            ax.set_ylabel(f"{label} / {baseline}")
            r0 = mine[0]
            ax.set_title(f"{shape}: N={r0['N']} h={r0['h']} K={r0['K']} S={int(r0['S']):,} D={r0['D']}", fontsize=9)
            ax.legend(fontsize=7)
    fig.suptitle(f"attention fwd+bwd time / {baseline} on {device_name} (lower is better)", fontsize=10)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _split(text: str | None) -> list[str] | None:
    return None if text is None else [t.strip() for t in text.split(",") if t.strip()]


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", choices=("cpu", "cuda"), default=None, help="default: cuda when available")
    p.add_argument("--quick", action="store_true", help="the icd shape in bf16 only, fewer repeats")
    p.add_argument("--shapes", default=None, help="comma list of icd, d64, n8k100 (default all)")
    p.add_argument("--dtypes", default=None, help="comma list of bf16, fp16, fp32 (default bf16,fp16; cpu: fp32)")
    p.add_argument("--backends", default=None, help="comma list (default: every backend of the device)")
    p.add_argument("--repeats", type=int, default=None, help="timed calls per row (default 20, --quick 10)")
    p.add_argument("--warmup", type=int, default=2, help="eager calls before timing (compilation, autotuning)")
    p.add_argument("--max-seconds", type=float, default=None, help="start no new shape/dtype block after this")
    p.add_argument("--out", type=Path, default=default_out_dir(), help=OUT_HELP + "; kernels_<device>.csv/.png/.md")
    p.add_argument("--no-plot", action="store_true")
    args = p.parse_args(argv)
    name = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: torch sees no CUDA device")
    device = torch.device("cuda", torch.cuda.current_device()) if name == "cuda" else torch.device("cpu")
    all_shapes = GPU_SHAPES if name == "cuda" else CPU_SHAPES
    wanted_shapes = _split(args.shapes) or (["icd"] if args.quick else [s.name for s in all_shapes])
    unknown = set(wanted_shapes) - {s.name for s in all_shapes}
    if unknown:
        raise SystemExit(f"--shapes: {sorted(unknown)}; expected some of {', '.join(s.name for s in all_shapes)}")
    shapes = [s for s in all_shapes if s.name in wanted_shapes]
    dtypes = _split(args.dtypes) or (["bf16"] if args.quick else ["bf16", "fp16"] if name == "cuda" else ["fp32"])
    if set(dtypes) - set(DTYPES):
        raise SystemExit(f"--dtypes: {sorted(set(dtypes) - set(DTYPES))}; expected some of {', '.join(DTYPES)}")
    repeats = args.repeats or (10 if args.quick else 20)
    info = machine_info(device)
    device_name = info["gpu"] if name == "cuda" else info["cpu"]
    peak = peak_for(device_name) if name == "cuda" else None
    run = run_columns(info, device)
    base = {"device": name, "device_name": device_name, "commit": info["commit"], "torch": info["torch"],
            "triton": info["triton"]}  # fmt: skip
    stem = f"kernels_{slug(device_name) if name == 'cuda' else 'cpu'}"
    print("machine: " + ", ".join(f"{k} {v}" for k, v in info.items()), flush=True)
    if name == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = False
    rows: list[dict[str, Any]] = []
    start = time.perf_counter()
    for dtype_name in dtypes:  # every shape in bf16 first: the targets' dtype
        for shape in shapes:
            if args.max_seconds is not None and time.perf_counter() - start > args.max_seconds:
                print(f"  {shape.name} {dtype_name}: skipped, --max-seconds {args.max_seconds:g} reached", flush=True)
                continue
            def keep(row: dict[str, Any]) -> None:  # after each row: a run cut short keeps what it measured
                rows.append(row)
                _write(rows, args.out, stem, device_name, peak, name, run)

            try:
                run_block(shape, dtype_name, device, _split(args.backends), repeats, args.warmup, base, keep)
            except Exception as exc:  # the inputs could not be made (memory, a broken context): one error row
                w = shape.workload
                keep({**base, "op": "inputs", "pass": "", "backend": "", "shape": shape.name, "N": w.n, "h": w.heads,
                      "K": w.k, "S": w.s, "D": w.head_dim, "dtype": dtype_name,
                      "status": f"error: {type(exc).__name__}: {' '.join(str(exc).split())[:160]}"})  # fmt: skip
    targets = _write(rows, args.out, stem, device_name, peak, name, run)
    print("\n".join(targets), flush=True)
    if not args.no_plot and rows:
        try:
            plot(rows, args.out / f"{stem}.png", device_name, BASELINE[name])
            print(f"wrote {args.out / f'{stem}.png'}", flush=True)
        except Exception as exc:  # the CSV and tables are written already
            print(f"plot failed: {type(exc).__name__}: {exc}", flush=True)
    print(f"wrote {args.out / f'{stem}.csv'} and .md in {time.perf_counter() - start:.0f} s", flush=True)
    return 0


def _write(rows: list[dict[str, Any]], out: Path, stem: str, device_name: str, peak: Peak | None,
           device_type: str, run: dict[str, str]) -> list[str]:  # fmt: skip
    add_derived(rows, device_type, peak)
    targets = check_targets(rows)
    out.mkdir(parents=True, exist_ok=True)
    tmp = out / f".{stem}.csv.tmp"
    write_csv(tmp, rows, COLUMNS, run)
    os.replace(tmp, out / f"{stem}.csv")
    tmp = out / f".{stem}.md.tmp"
    tmp.write_text(markdown(rows, device_name, peak, targets))
    os.replace(tmp, out / f"{stem}.md")
    return targets


if __name__ == "__main__":
    sys.exit(main())
