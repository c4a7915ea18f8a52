"""Speed and peak memory of the icd ops per backend, over the FPN sizes of ICD training.

Times ``icd.ops.instance_attention`` (forward, forward+backward), ``instance_value_mask``
(forward) and ``masked_feature_mse`` (forward, forward+backward) for every backend built
for the device, next to torch's own attention: SDPA with the boolean key mask (CPU: the
math kernel and the flash kernel SDPA picks by default; CUDA: the memory-efficient and cuDNN
kernels) and, on CUDA, compiled FlexAttention with a mask_mod for the padding.

Sizes: N=2 images, h=8 heads, D=32, K instance slots, S tokens of the FPN levels P3-P7
(RetinaNet, FCOS) or P2-P6 (Faster R-CNN) of an 800x1333-shaped input at 512, 800 and
1333 px; the second image of the batch is smaller, so ~20% of all keys are padding.

    python benchmarks/run_attention.py --quick              # one size, < 2 min on 2 cores
    python benchmarks/run_attention.py --device cuda        # full sweep on the GPU

Prints a table per size with ratios to the reference backend and to SDPA, then writes
``attention_<device>-<model>.csv`` and ``.png`` under ``--out``. See benchmarks/README.md.
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import os
import subprocess
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from common import (
    Measurement,
    cpu_peak_memory,
    format_table,
    machine_info,
    measure,
    rss_peak,
    slug,
    write_csv,
)
from torch import Tensor

import icd.ops

RESULTS_DIR = Path(__file__).resolve().parent / "results"

LEVEL_SETS = {"p3-p7": (3, 4, 5, 6, 7), "p2-p6": (2, 3, 4, 5, 6)}
SIZE_DIVISIBILITY = 32  # detectron2 / torchvision pad each batch to a multiple of 32
INPUTS = ((512, 853), (800, 1333), (1333, 2222))  # 800x1333 aspect at three scales
SECOND_IMAGE_SCALE = 0.6**0.5  # image 1 covers 60% of the padded area: ~20% keys masked
REAL_INSTANCES = (7, 12)  # ground-truth boxes per image (COCO averages ~7), weight 1

OPS = ("attention", "value_mask", "feature_mse")
LAYOUTS = ("tokens", "sequence", "heads")
PASSES = {
    "attention": ("fwd", "fwd+bwd"),
    "value_mask": ("fwd",),
    "feature_mse": ("fwd", "fwd+bwd"),
}
ICD_BACKENDS = {"cpu": ("reference", "cpu"), "cuda": ("reference", "triton", "cuda")}
PEERS = {"cpu": ("sdpa_flash", "sdpa_math"), "cuda": ("sdpa_efficient", "sdpa_cudnn", "flex")}
# Backends that hold [N, h, K, S] tensors; bytes per logit element at the peak, measured
# (rounded up) at P3-P7 800x1333, K=300 on CPU.
MATERIALISING = {"reference", "sdpa_math"}
BYTES_PER_LOGIT = {
    ("attention", "fwd"): 13,
    ("attention", "fwd+bwd"): 26,
    ("value_mask", "fwd"): 13,
}

COLUMNS = (
    "device", "device_name", "op", "pass", "backend", "levels", "input", "N", "h", "K", "S",
    "D", "dtype", "layout", "masked_frac", "median_ms", "min_ms", "max_ms", "repeats",
    "peak_mb", "time_vs_ref", "mem_vs_ref", "time_vs_sdpa", "mem_vs_sdpa", "rel_err", "err_vs",
    "status",
)  # fmt: skip


# --- sizes -----------------------------------------------------------------------------------


def level_shapes(height: int, width: int, levels: Sequence[int]) -> list[tuple[int, int]]:
    """(H_l, W_l) of FPN levels ``levels`` (2 = stride 4 ... 7 = stride 128) of an input.

    The batch is padded to a multiple of 32; levels up to P5 are the padded size divided by
    the stride, P6 and P7 come from stride-2 layers on the level below (ceil of half).
    """
    hp = math.ceil(height / SIZE_DIVISIBILITY) * SIZE_DIVISIBILITY
    wp = math.ceil(width / SIZE_DIVISIBILITY) * SIZE_DIVISIBILITY
    shapes = {}
    for level in range(2, max(levels) + 1):
        if level <= 5:
            shapes[level] = (hp >> level, wp >> level)
        else:
            below = shapes[level - 1]
            shapes[level] = (math.ceil(below[0] / 2), math.ceil(below[1] / 2))
    return [shapes[level] for level in levels]


@dataclass(frozen=True)
class Workload:
    """One benchmark size: levels, input size and instance slots; N, h, D fixed."""

    levels: str
    height: int
    width: int
    k: int
    n: int = 2
    heads: int = 8
    head_dim: int = 32

    @property
    def shapes(self) -> list[tuple[int, int]]:
        return level_shapes(self.height, self.width, LEVEL_SETS[self.levels])

    @property
    def padded(self) -> tuple[int, int]:
        div = SIZE_DIVISIBILITY
        return math.ceil(self.height / div) * div, math.ceil(self.width / div) * div

    @property
    def s(self) -> int:
        return sum(h * w for h, w in self.shapes)

    @property
    def name(self) -> str:
        return f"{self.levels.upper()} {self.height}x{self.width} K={self.k} (S={self.s:,})"

    def image_sizes(self) -> list[tuple[int, int]]:
        """Even images fill the input; odd ones are smaller, padded on the right and bottom."""
        second = (round(self.height * SECOND_IMAGE_SCALE), round(self.width * SECOND_IMAGE_SCALE))
        return [second if i % 2 else (self.height, self.width) for i in range(self.n)]

    def key_padding_mask(self) -> Tensor:
        """bool [N, S], True = padding (icd.ops.padding_mask of the image sizes)."""
        return icd.ops.padding_mask(self.image_sizes(), self.shapes, self.padded)


# The size of the project's targets (N=2, h=8, K=300, S=22,400): always measured.
TARGET = Workload("p3-p7", 800, 1333, 300)


def parse_inputs(text: str) -> list[tuple[int, int]]:
    sizes = []
    for item in text.split(","):
        h, _, w = item.strip().lower().partition("x")
        if not (h.isdigit() and w.isdigit()):
            raise argparse.ArgumentTypeError(f"input size {item!r}; expected HxW, e.g. 800x1333")
        sizes.append((int(h), int(w)))
    return sizes


# --- inputs ----------------------------------------------------------------------------------


@dataclass
class Inputs:
    """The tensors of one workload, made once, outside every measured region.

    ``*_base`` tensors are the leaves that receive gradients. Layout "tokens": bases are
    [N, S, h, D] (how a [N, S, C] projection splits into heads) and the ops get the
    [N, h, S, D] transpose, a strided view; layout "sequence": bases are [S, N, h, D] (a
    sequence-first [S, N, C] projection, as in nn.MultiheadAttention without batch_first)
    viewed as [N, h, S, D] by permute; layout "heads": bases are contiguous [N, h, S, D].
    """

    q_base: Tensor
    k_base: Tensor
    v_base: Tensor
    grad_out: Tensor  # [N, h, K, D], the upstream gradient of the attention output
    mask: Tensor  # bool [N, S], True = padding
    weight: Tensor  # [N, K], 1 for real instances
    student_base: Tensor
    teacher_base: Tensor
    mse_weight: Tensor  # [N, h, S] >= 0, 0 on padding
    layout: str

    def heads(self, base: Tensor) -> Tensor:
        if self.layout == "tokens":
            return base.transpose(1, 2)
        if self.layout == "sequence":
            return base.permute(1, 2, 0, 3)
        return base

    def leaves(self) -> tuple[Tensor, ...]:
        return self.q_base, self.k_base, self.v_base, self.student_base

    def clear_grads(self) -> None:
        for t in self.leaves():
            t.grad = None

    @property
    def masked_frac(self) -> float:
        return self.mask.float().mean().item()


def make_inputs(
    w: Workload, device: torch.device, dtype: torch.dtype, layout: str, seed: int = 0
) -> Inputs:
    """Random q, k, v, features and gradients; weights shaped like ICD's (see module doc)."""
    gen = torch.Generator(device="cpu").manual_seed(seed)

    def rand(tokens: int) -> Tensor:
        n, h, d = w.n, w.heads, w.head_dim
        shapes = {"tokens": (n, tokens, h, d), "sequence": (tokens, n, h, d), "heads": (n, h, tokens, d)}
        shape = shapes[layout]
        return torch.randn(shape, generator=gen).to(device=device, dtype=dtype)

    mask = w.key_padding_mask().to(device)
    weight = torch.zeros(w.n, w.k)
    real = [REAL_INSTANCES[i % len(REAL_INSTANCES)] for i in range(w.n)]
    for i, count in enumerate(real):
        weight[i, :count] = 1.0
    # a value mask sums to the number of real instances over S: mean count / S per token
    mse_weight = torch.rand(w.n, w.heads, w.s, generator=gen) * (2 * sum(real) / w.n / w.s)
    mse_weight = mse_weight.to(device).masked_fill(mask[:, None, :], 0.0)
    grad_out = torch.randn(w.n, w.heads, w.k, w.head_dim, generator=gen).to(
        device=device, dtype=dtype
    )
    return Inputs(
        q_base=rand(w.k).requires_grad_(),
        k_base=rand(w.s).requires_grad_(),
        v_base=rand(w.s).requires_grad_(),
        grad_out=grad_out,
        mask=mask,
        weight=weight.to(device),
        student_base=rand(w.s).requires_grad_(),
        teacher_base=rand(w.s),
        mse_weight=mse_weight,
        layout=layout,
    )


# --- the measured calls ------------------------------------------------------------------


def _grads(*leaves: Tensor) -> tuple[Tensor, ...]:
    return tuple(t.grad for t in leaves)


def _attention_call(
    x: Inputs, attend: Callable[[Tensor, Tensor, Tensor], Tensor], pass_: str
) -> Callable:
    """fwd returns the output; fwd+bwd backpropagates ``grad_out`` and returns (dq, dk, dv)."""

    def forward() -> tuple[Tensor, ...]:
        return (attend(x.heads(x.q_base), x.heads(x.k_base), x.heads(x.v_base)).detach(),)

    def forward_backward() -> tuple[Tensor, ...]:
        attend(x.heads(x.q_base), x.heads(x.k_base), x.heads(x.v_base)).backward(x.grad_out)
        return _grads(x.q_base, x.k_base, x.v_base)

    return forward if pass_ == "fwd" else forward_backward


def _icd_attention(x: Inputs, backend: str) -> Callable[[Tensor, Tensor, Tensor], Tensor]:
    def attend(q: Tensor, k: Tensor, v: Tensor) -> Tensor:
        return icd.ops.instance_attention(q, k, v, x.mask, backend=backend)[0]

    return attend


def _sdpa_attention(x: Inputs, kernel: Any) -> Callable[[Tensor, Tensor, Tensor], Tensor]:
    from torch.nn.attention import sdpa_kernel

    allowed = ~x.mask[:, None, None, :]  # SDPA's boolean mask: True = attend

    def attend(q: Tensor, k: Tensor, v: Tensor) -> Tensor:
        with sdpa_kernel(kernel):
            return F.scaled_dot_product_attention(q, k, v, attn_mask=allowed)

    return attend


def _flex_attention(x: Inputs, w: Workload) -> Callable[[Tensor, Tensor, Tensor], Tensor]:
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention

    valid = ~x.mask

    def keep_valid_keys(b: Tensor, h: Tensor, q_idx: Tensor, kv_idx: Tensor) -> Tensor:
        return valid[b, kv_idx]

    block_mask = create_block_mask(keep_valid_keys, w.n, None, w.k, w.s, device=x.mask.device)
    torch._dynamo.reset()  # one compiled graph per size: stay under the recompile limit
    compiled = torch.compile(flex_attention, dynamic=False)

    def attend(q: Tensor, k: Tensor, v: Tensor) -> Tensor:
        return compiled(q, k, v, block_mask=block_mask)

    return attend


def build_call(op: str, backend: str, pass_: str, x: Inputs, w: Workload) -> Callable[[], Any]:
    """The zero-argument function that runs ``op`` once on ``backend``; returns what to check."""
    if op == "attention":
        from torch.nn.attention import SDPBackend

        sdpa = {
            "sdpa_math": SDPBackend.MATH,
            "sdpa_flash": SDPBackend.FLASH_ATTENTION,
            "sdpa_efficient": SDPBackend.EFFICIENT_ATTENTION,
            "sdpa_cudnn": SDPBackend.CUDNN_ATTENTION,
        }
        if backend in sdpa:
            attend = _sdpa_attention(x, sdpa[backend])
        elif backend == "flex":
            attend = _flex_attention(x, w)
        else:
            attend = _icd_attention(x, backend)
        return _attention_call(x, attend, pass_)
    if op == "value_mask":
        q, k = x.heads(x.q_base).detach(), x.heads(x.k_base).detach()
        return lambda: (icd.ops.instance_value_mask(q, k, x.weight, x.mask, backend=backend),)
    if op == "feature_mse":
        teacher = x.heads(x.teacher_base)

        def loss() -> Tensor:
            return icd.ops.masked_feature_mse(
                x.heads(x.student_base), teacher, x.mse_weight, backend=backend
            )

        if pass_ == "fwd":
            return lambda: (loss().detach(),)

        def forward_backward() -> tuple[Tensor, ...]:
            loss().backward()
            return _grads(x.student_base)

        return forward_backward
    raise ValueError(f"unknown op {op!r}; expected one of {', '.join(OPS)}")


def relative_error(got: Sequence[Tensor], want: Sequence[Tensor]) -> float:
    """max |got - want| / max |want| over the tensors both sides return."""
    worst = 0.0
    for a, b in zip(got, want, strict=False):
        a, b = a.detach().double(), b.detach().double()
        worst = max(worst, (a - b).abs().max().item() / max(b.abs().max().item(), 1e-30))
    return worst


# --- the sweep -------------------------------------------------------------------------------


@dataclass
class Settings:
    device: torch.device
    dtype: torch.dtype
    layout: str
    warmup: int
    repeats: int
    max_memory_bytes: float
    max_call_s: float


def backends_for(
    device: torch.device, ops: Sequence[str], wanted: Sequence[str] | None
) -> list[str]:
    """In measuring order: the reference, the first SDPA peer, the fused backends built for
    this device, the other peers (peers only when attention is measured)."""
    built = set(icd.ops.available_backends())
    fused = [b for b in ICD_BACKENDS[device.type] if b in built and b != "reference"]
    peers = list(PEERS[device.type]) if "attention" in ops else []
    names = ["reference", *peers[:1], *fused, *peers[1:]]
    if wanted is not None:
        unknown = set(wanted) - set(ICD_BACKENDS[device.type]) - set(PEERS[device.type])
        if unknown:
            raise SystemExit(f"--backends: {sorted(unknown)} do not run on {device.type}")
        missing = [b for b in wanted if b not in names]
        if missing:
            print(f"note: backends {missing} are not built here; available: {sorted(built)}")
        names = [b for b in names if b in wanted]
    return names


def _work(op: str, w: Workload) -> int:
    return w.s if op == "feature_mse" else w.k * w.s


def skip_reason(
    op: str, backend: str, pass_: str, w: Workload, cfg: Settings, history: dict
) -> str | None:
    """Why a measurement is left out, or None: a peer without this op, or a predicted
    memory or time over the limits (predictions scale the last smaller size's figures;
    the TARGET size is exempt from the time limit)."""
    if backend in PEERS[cfg.device.type] and op != "attention":
        return "n/a"
    if backend in MATERIALISING and (op, pass_) in BYTES_PER_LOGIT:
        need = BYTES_PER_LOGIT[(op, pass_)] * w.n * w.heads * w.k * w.s
        if need > cfg.max_memory_bytes:
            return (
                f"skipped: needs ~{need / 2**30:.1f} GiB > {cfg.max_memory_bytes / 2**30:.1f} GiB"
            )
    seen = history.get((op, backend, pass_))
    if seen is not None and w != TARGET:
        seconds, work = seen
        predicted = seconds * _work(op, w) / work
        if predicted > cfg.max_call_s:
            return f"skipped: predicted {predicted:.0f} s/call > {cfg.max_call_s:.0f} s"
    return None


def _base_row(op: str, backend: str, pass_: str, w: Workload, cfg: Settings, x: Inputs) -> dict:
    return {
        "device": cfg.device.type, "op": op, "pass": pass_, "backend": backend,
        "levels": w.levels.upper(), "input": f"{w.height}x{w.width}", "N": w.n, "h": w.heads,
        "K": "" if op == "feature_mse" else w.k, "S": w.s, "D": w.head_dim,
        "dtype": str(cfg.dtype).removeprefix("torch."), "layout": cfg.layout,
        "masked_frac": round(x.masked_frac, 4),
    }  # fmt: skip


def run_workload(
    w: Workload,
    ops: Sequence[str],
    backends: Sequence[str],
    cfg: Settings,
    history: dict,
    seen_s: set,
) -> list[dict]:
    """All measurements of one size; rows without ratios yet.

    ``backends`` in measuring order: the reference, then the SDPA peer, so that the others'
    results can be checked against the first of them that ran (rel_err, err_vs).
    """
    peer = PEERS[cfg.device.type][0]
    x = make_inputs(w, cfg.device, cfg.dtype, cfg.layout)
    rows = []
    for op in ops:
        if op == "feature_mse":
            if w.s in seen_s:  # K does not enter this op
                continue
            seen_s.add(w.s)
        for pass_ in PASSES[op]:
            baseline: tuple[str, Any] | None = None  # (backend, result) for rel_err
            for backend in backends:
                row = _base_row(op, backend, pass_, w, cfg, x)
                reason = skip_reason(op, backend, pass_, w, cfg, history)
                if reason == "n/a":
                    continue
                if reason is None:
                    m, reason = _measure_one(op, backend, pass_, x, w, cfg)
                if reason is not None:
                    row["status"] = reason
                    rows.append(row)
                    print(f"  {op:12s} {pass_:8s} {backend:15s} {reason}", flush=True)
                    continue
                history[(op, backend, pass_)] = (m.median, _work(op, w))
                if baseline is None and backend in ("reference", peer):
                    baseline = (backend, m.result)
                elif baseline is not None:
                    row["rel_err"] = relative_error(m.result, baseline[1])
                    row["err_vs"] = baseline[0]
                row.update(
                    median_ms=m.median * 1e3, min_ms=min(m.times) * 1e3, max_ms=max(m.times) * 1e3,
                    repeats=len(m.times), peak_mb=m.peak_bytes / 2**20, status="ok",
                )  # fmt: skip
                rows.append(row)
                print(
                    f"  {op:12s} {pass_:8s} {backend:15s} {m.median * 1e3:10.2f} ms "
                    f"{m.peak_bytes / 2**20:10.1f} MB",
                    flush=True,
                )
                del m
            del baseline
            gc.collect()
    return rows


def _measure_one(
    op: str, backend: str, pass_: str, x: Inputs, w: Workload, cfg: Settings
) -> tuple[Measurement | None, str | None]:
    try:
        fn = build_call(op, backend, pass_, x, w)
        m = measure(fn, cfg.device, setup=x.clear_grads, warmup=cfg.warmup, repeats=cfg.repeats)
        return m, None
    except Exception as exc:  # a backend that fails is reported in its row, not fatal
        if cfg.device.type == "cuda":
            torch.cuda.empty_cache()
        x.clear_grads()
        text = " ".join(str(exc).split())[:160]
        return None, f"error: {type(exc).__name__}: {text}"


def add_ratios(rows: list[dict], peer: str) -> None:
    """time/memory of each row over the reference's and (attention) the SDPA peer's."""
    ok = {
        (r["op"], r["pass"], r["backend"], r["S"], r["K"]): r
        for r in rows
        if r.get("status") == "ok"
    }
    for r in rows:
        if r.get("status") != "ok":
            continue
        for base, suffix in (("reference", "ref"), (peer, "sdpa")):
            if suffix == "sdpa" and r["op"] != "attention":
                continue
            b = ok.get((r["op"], r["pass"], base, r["S"], r["K"]))
            if b is not None and b["median_ms"] > 0:
                r[f"time_vs_{suffix}"] = r["median_ms"] / b["median_ms"]
                if b["peak_mb"] > 0:
                    r[f"mem_vs_{suffix}"] = r["peak_mb"] / b["peak_mb"]


def _fmt(value: Any, spec: str) -> str:
    return "" if value in (None, "") else format(value, spec)


def print_table(rows: Sequence[dict]) -> None:
    header = ("op", "pass", "backend", "median ms", "peak MB", "t/ref", "mem/ref", "t/sdpa",
              "mem/sdpa", "rel err")  # fmt: skip
    body = []
    for r in rows:
        if r.get("status") != "ok":
            body.append((r["op"], r["pass"], r["backend"], r["status"], "", "", "", "", "", ""))
            continue
        numbers = (
            _fmt(r["median_ms"], ".1f"), _fmt(r["peak_mb"], ".1f"),
            _fmt(r.get("time_vs_ref"), ".3f"), _fmt(r.get("mem_vs_ref"), ".3f"),
            _fmt(r.get("time_vs_sdpa"), ".3f"), _fmt(r.get("mem_vs_sdpa"), ".3f"),
            _fmt(r.get("rel_err"), ".1e") + ("" if r.get("err_vs", "reference") == "reference"
                                             else f" vs {r['err_vs']}"),
        )  # fmt: skip
        body.append((r["op"], r["pass"], r["backend"], *numbers))
    print(format_table(body, header), flush=True)


# --- targets (N=2, h=8, K=300, S=22,400) ---------------------------------------------------


def print_targets(rows: Sequence[dict], peer: str) -> None:
    """The project's targets for the fused backends at P3-P7 800x1333, K=300."""
    at = [
        r
        for r in rows
        if r.get("status") == "ok" and r["S"] == TARGET.s and r["K"] in (TARGET.k, "")
    ]
    fused = sorted(
        {r["backend"] for r in at} - {"reference"} - set(PEERS["cpu"]) - set(PEERS["cuda"])
    )
    if not at or not fused:
        return
    print("\nTargets at N=2, h=8, K=300, S=22,400 (ratio = backend / baseline, lower is better):")

    def get(op: str, pass_: str, backend: str) -> dict | None:
        return next(
            (r for r in at if (r["op"], r["pass"], r["backend"]) == (op, pass_, backend)), None
        )

    checks = (
        ("attention", "fwd+bwd", peer, "time", 1.5, "<="),
        ("attention", "fwd+bwd", peer, "mem", 1.5, "<="),
        ("value_mask", "fwd", "reference", "time", 1.0, "<"),
        ("value_mask", "fwd", "reference", "mem", 1 / 8, "<="),
        ("feature_mse", "fwd+bwd", "reference", "time", 1.0, "<"),
        ("feature_mse", "fwd+bwd", "reference", "mem", 1 / 2, "<="),
    )
    for backend in fused:
        for op, pass_, base, what, limit, cmp in checks:
            r, b = get(op, pass_, backend), get(op, pass_, base)
            if r is None or b is None:
                continue
            key = "median_ms" if what == "time" else "peak_mb"
            ratio = r[key] / b[key] if b[key] > 0 else math.inf
            ok = ratio < limit if cmp == "<" else ratio <= limit
            print(
                f"  {backend:8s} {op:12s} {pass_:8s} {what:4s} {ratio:7.3f}x of {base:<14s}"
                f" target {cmp} {limit:.3g}: {'met' if ok else 'MISSED'}"
            )


# --- plot ------------------------------------------------------------------------------------


def plot(rows: Sequence[dict], path: Path, title: str) -> None:
    """Median time and peak memory per backend, one panel per op and pass (log scale).

    Against S when the run has several sizes (solid: largest K, dashed: smaller K), as
    bars when it has one (--quick).
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ok = [r for r in rows if r.get("status") == "ok"]
    panels = [
        (op, p)
        for op in OPS
        for p in PASSES[op]
        if any((r["op"], r["pass"]) == (op, p) for r in ok)
    ]
    if not panels:
        return
    fig, axes = plt.subplots(2, len(panels), figsize=(4.2 * len(panels), 7.5), squeeze=False)
    colors = {b: f"C{i}" for i, b in enumerate(sorted({r["backend"] for r in ok}))}
    one_size = len({r["S"] for r in ok}) == 1 and len({r["K"] for r in ok if r["K"] != ""}) <= 1
    for col, (op, pass_) in enumerate(panels):
        mine = [r for r in ok if (r["op"], r["pass"]) == (op, pass_)]
        for row, key, unit in (
            (0, "median_ms", "median time [ms]"),
            (1, "peak_mb", "peak memory [MB]"),
        ):
            ax = axes[row][col]
            if one_size:
                _bars(ax, mine, key, colors)
            else:
                _lines(ax, mine, key, colors)
            ax.set_yscale("log")
            ax.set_ylabel(unit)
            ax.grid(True, which="both", alpha=0.3)
        axes[0][col].set_title(f"{op} {pass_}")
        if not one_size:
            axes[0][col].legend(fontsize=7)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _bars(ax: Any, rows: Sequence[dict], key: str, colors: dict[str, str]) -> None:
    names = [r["backend"] for r in rows]
    values = [max(r[key], 1e-3) for r in rows]
    ax.bar(names, values, color=[colors[n] for n in names])
    for i, v in enumerate(values):
        ax.annotate(f"{v:.3g}", (i, v), ha="center", va="bottom", fontsize=7)
    ax.tick_params(axis="x", labelrotation=30, labelsize=8)


def _lines(ax: Any, rows: Sequence[dict], key: str, colors: dict[str, str]) -> None:
    largest_k = max((r["K"] for r in rows if r["K"] != ""), default="")
    for backend, k in sorted({(r["backend"], r["K"]) for r in rows}, key=str):
        series = sorted(
            (r for r in rows if (r["backend"], r["K"]) == (backend, k)), key=lambda r: r["S"]
        )
        ax.plot(
            [r["S"] for r in series], [max(r[key], 1e-3) for r in series],
            "-" if k == largest_k else "--", marker="o", color=colors[backend],
            label=backend if k == "" else f"{backend} K={k}",
        )  # fmt: skip
    ax.set_xscale("log")
    ax.set_xlabel("S (tokens)")


# --- resident-set cross-check --------------------------------------------------------------


def rss_probe(spec: str, w: Workload, cfg: Settings) -> dict:
    """In this (fresh) process: RSS high-water rise and profiler peak of one call, in bytes."""
    op, backend, pass_ = spec.split(":")
    x = make_inputs(w, cfg.device, cfg.dtype, cfg.layout)
    fn = build_call(op, backend, pass_, x, w)
    fn()  # warm-up: code pages, thread pools and lazy initialisation stay out of the figure
    x.clear_grads()
    rss = rss_peak(fn)
    x.clear_grads()
    _, profiled, _ = cpu_peak_memory(fn)
    return {
        "op": op,
        "backend": backend,
        "pass": pass_,
        "rss_bytes": rss,
        "profiler_bytes": profiled,
    }


def rss_check(
    w: Workload, ops: Sequence[str], backends: Sequence[str], argv: Sequence[str]
) -> None:
    """Compare the profiler's peak with the RSS high-water mark, each call in a new process.

    glibc is told to serve every allocation over 64 KiB with mmap and give it back on free,
    so the resident set follows the live tensors.
    """
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536", MALLOC_TRIM_THRESHOLD_="0")
    print(f"\nPeak memory cross-check (fresh process per call, {w.name}):")
    body = []
    for op in ops:
        for pass_ in PASSES[op]:
            for backend in backends:
                if backend in PEERS["cpu"] and op != "attention":
                    continue
                spec = f"{op}:{backend}:{pass_}"
                cmd = [sys.executable, __file__, *argv, "--rss-probe", spec]
                done = subprocess.run(cmd, env=env, capture_output=True, text=True, check=False)
                lines = [ln for ln in done.stdout.splitlines() if ln.startswith("{")]
                if done.returncode != 0 or not lines:
                    body.append((op, pass_, backend, "failed", "", ""))
                    continue
                r = json.loads(lines[-1])
                prof, rss = r["profiler_bytes"] / 2**20, r["rss_bytes"] / 2**20
                body.append(
                    (
                        op,
                        pass_,
                        backend,
                        f"{prof:.1f}",
                        f"{rss:.1f}",
                        f"{rss / max(prof, 1e-9):.2f}",
                    )
                )
    print(format_table(body, ("op", "pass", "backend", "profiler MB", "RSS MB", "RSS/prof")))


# --- command line ------------------------------------------------------------------------


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument(
        "--device",
        choices=("cpu", "cuda"),
        default=None,
        help="default: cuda when available, else cpu",
    )
    p.add_argument(
        "--quick",
        action="store_true",
        help="only P3-P7 800x1333, K=300, fewer repeats (< 2 min on 2 CPU cores)",
    )
    p.add_argument("--ops", default=",".join(OPS), help=f"comma list of {', '.join(OPS)}")
    p.add_argument(
        "--backends",
        default=None,
        help="comma list; default all for the device: "
        + "; ".join(f"{d}: {', '.join(ICD_BACKENDS[d] + PEERS[d])}" for d in ICD_BACKENDS),
    )
    p.add_argument("--levels", default="p3-p7,p2-p6", help="comma list of p3-p7, p2-p6")
    p.add_argument(
        "--inputs",
        type=parse_inputs,
        default=list(INPUTS),
        help="comma list of HxW input sizes (default 512x853,800x1333,1333x2222)",
    )
    p.add_argument("--k", default="100,300", help="comma list of instance slot counts K")
    p.add_argument("--dtype", choices=("float32", "float16", "bfloat16"), default="float32")
    p.add_argument(
        "--layout",
        choices=LAYOUTS,
        default="tokens",
        help="tokens: [N, S, h, D] transposed to [N, h, S, D] (as split from a [N, S, C] "
        "projection); sequence: [S, N, h, D] permuted to [N, h, S, D] (a sequence-first "
        "[S, N, C] projection); heads: contiguous [N, h, S, D]",
    )
    p.add_argument("--warmup", type=int, default=None, help="warm-up calls (default cpu 2, cuda 3)")
    p.add_argument(
        "--repeats",
        type=int,
        default=None,
        help="timed calls (default cpu 5, cuda 20; --quick cpu 3, cuda 10)",
    )
    p.add_argument(
        "--max-memory-gb",
        type=float,
        default=None,
        help="skip materialising backends predicted to need more (default 60%% of "
        "available RAM, 80%% of GPU memory)",
    )
    p.add_argument(
        "--max-call-s",
        type=float,
        default=5.0,
        help="skip a measurement whose call is predicted (from the previous size) to "
        "take longer (default 5)",
    )
    p.add_argument("--out", type=Path, default=RESULTS_DIR, help="folder for the CSV and PNG")
    p.add_argument("--no-plot", action="store_true")
    p.add_argument(
        "--rss-check",
        action="store_true",
        help="CPU: also compare the profiler's peak with the RSS high-water mark at "
        "the first size, one fresh process per call",
    )
    p.add_argument("--rss-probe", default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.quick:
        args.levels, args.inputs, args.k = "p3-p7", [(800, 1333)], "300"
    return args


def _available_bytes(device: torch.device) -> float:
    if device.type == "cuda":
        return 0.8 * torch.cuda.get_device_properties(device).total_memory
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return 0.6 * int(line.split()[1]) * 1024
    except OSError:
        pass
    return 8 * 2**30


def make_settings(args: argparse.Namespace) -> Settings:
    name = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: torch sees no CUDA device")
    device = (
        torch.device(name, torch.cuda.current_device()) if name == "cuda" else torch.device("cpu")
    )
    if name == "cuda":
        warmup, repeats = 3, 10 if args.quick else 20
    else:
        warmup, repeats = 2, 3 if args.quick else 5
    max_memory = args.max_memory_gb * 2**30 if args.max_memory_gb else _available_bytes(device)
    return Settings(
        device=device,
        dtype=getattr(torch, args.dtype),
        layout=args.layout,
        warmup=args.warmup if args.warmup is not None else warmup,
        repeats=args.repeats if args.repeats is not None else repeats,
        max_memory_bytes=max_memory,
        max_call_s=args.max_call_s,
    )


def _split(text: str) -> list[str]:
    return [t.strip().lower() for t in text.split(",") if t.strip()]


def workloads_of(args: argparse.Namespace) -> list[Workload]:
    levels = _split(args.levels)
    bad = [lv for lv in levels if lv not in LEVEL_SETS]
    if bad:
        raise SystemExit(f"--levels: {bad}; expected some of {', '.join(LEVEL_SETS)}")
    sizes = [
        Workload(lv, h, w, int(k)) for lv in levels for h, w in args.inputs for k in _split(args.k)
    ]
    return sorted(sizes, key=lambda w: (w.k * w.s, w.s))  # smaller first: predictions scale up


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    cfg = make_settings(args)
    ops = _split(args.ops)
    if set(ops) - set(OPS):
        raise SystemExit(f"--ops: {sorted(set(ops) - set(OPS))}; expected some of {', '.join(OPS)}")
    wanted = _split(args.backends) if args.backends else None
    backends = backends_for(cfg.device, ops, wanted)
    workloads = workloads_of(args)
    if args.rss_probe:
        print(json.dumps(rss_probe(args.rss_probe, workloads[0], cfg)))
        return 0

    info = machine_info(cfg.device)
    print("machine: " + ", ".join(f"{k} {v}" for k, v in info.items()))
    print(f"device {cfg.device}, dtype {args.dtype}, layout {cfg.layout}")
    print(f"backends {', '.join(backends)}")
    peer = PEERS[cfg.device.type][0]
    rows: list[dict] = []
    history: dict = {}
    seen_s: set = set()
    for w in workloads:
        masked = w.key_padding_mask().float().mean().item()
        print(f"\n{w.name}, N={w.n}, h={w.heads}, D={w.head_dim}, {100 * masked:.1f}% keys masked, "
              f"levels {w.shapes}", flush=True)  # fmt: skip
        block = run_workload(w, ops, backends, cfg, history, seen_s)
        add_ratios(block, peer)
        print_table(block)
        rows += block
    for r in rows:
        r["device_name"] = info["gpu"] if cfg.device.type == "cuda" else info["cpu"]
    print_targets(rows, peer)

    stem = f"attention_{cfg.device.type}-{slug(rows[0]['device_name'] if rows else 'unknown')}"
    stem += "_quick" if args.quick else ""
    csv_path = args.out / f"{stem}.csv"
    write_csv(csv_path, rows, COLUMNS)
    print(f"\nwrote {csv_path}")
    if not args.no_plot:
        name = rows[0]["device_name"] if rows else str(cfg.device)
        title = (
            f"icd ops on {name} (N=2, h=8, D=32, {args.dtype}, layout {cfg.layout}; "
            f"torch {info['torch']}, triton {info['triton']})"
        )
        plot(rows, args.out / f"{stem}.png", title)
        print(f"wrote {args.out / f'{stem}.png'}")
    if args.rss_check and cfg.device.type == "cpu" and workloads:
        rss_check(workloads[0], ops, backends, list(argv if argv is not None else sys.argv[1:]))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
