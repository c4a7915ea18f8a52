"""The sweep behind the op benchmarks: every op x backend x size x pass, timed and its peak
memory measured (benchmarks/common.py), checked against the reference, printed with ratios
side by side and written as CSV and PNG.

An op benchmark script (bench_attention.py, bench_value_mask.py, bench_feature_mse.py)
describes its op as an ``OpBenchmark``; ``main`` runs one or several of them with the
command line of run_attention.py. See benchmarks/README.md.
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import os
import subprocess
import sys
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from common import (
    OUT_HELP,
    Measurement,
    default_out_dir,
    format_table,
    machine_info,
    measure,
    peak_memory,
    rss_peak,
    run_columns,
    slug,
    write_csv,
)
from workload import INPUTS, LAYOUTS, LEVEL_SETS, TARGET, Inputs, Workload, make_inputs, parse_inputs, relative_error

import icd.ops
from icd.ops.backends import native_backends

DEVICE_TYPES = ("cpu", "cuda")
# Backends that hold [N, h, K, S] tensors (their memory is predicted from OpBenchmark.bytes_per_logit)
MATERIALISING = {"reference", "sdpa_math"}

COLUMNS = (
    "device", "device_name", "op", "pass", "backend", "levels", "input", "N", "h", "K", "S",
    "D", "dtype", "layout", "masked_frac", "median_ms", "min_ms", "max_ms", "repeats",
    "peak_mb", "time_vs_ref", "mem_vs_ref", "time_vs_sdpa", "mem_vs_sdpa", "rel_err", "err_vs",
    "status",
)  # fmt: skip


@dataclass(frozen=True)
class Target:
    """A project target: ``measure`` ("time" or "mem") of a fused backend's ``pass_`` over
    ``baseline``'s (a backend, or "sdpa" for the device's first SDPA peer) at TARGET's size
    is ``<= limit`` (``< limit`` when ``strict``)."""

    pass_: str
    baseline: str
    measure: str
    limit: float
    strict: bool = False


@dataclass(frozen=True)
class OpBenchmark:
    """One op as the sweep sees it.

    Attributes:
        name: the op's name in the CSV ("attention", ...).
        passes: "fwd" and/or "fwd+bwd".
        build_call: (backend, pass, inputs, workload) -> the zero-argument call to measure; it
            returns the tensors compared with the baseline's (output or gradients).
        peers: device type -> torch's own kernels measured next to the icd backends.
        per_k: False when the op does not depend on K (measured once per S, K blank).
        bytes_per_logit: pass -> bytes per [N, h, K, S] element a materialising backend holds
            at its peak (to skip sizes that would not fit).
        targets: the project's targets for this op.
    """

    name: str
    passes: tuple[str, ...]
    build_call: Callable[[str, str, Inputs, Workload], Callable[[], tuple[Any, ...]]]
    peers: Mapping[str, tuple[str, ...]] = field(default_factory=dict)
    per_k: bool = True
    bytes_per_logit: Mapping[str, int] = field(default_factory=dict)
    targets: tuple[Target, ...] = ()

    def work(self, w: Workload) -> int:
        """What a call's time scales with: K x S, or S."""
        return w.k * w.s if self.per_k else w.s


@dataclass
class Settings:
    device: torch.device
    dtype: torch.dtype
    layout: str
    warmup: int
    repeats: int
    max_memory_bytes: float
    max_call_s: float


def peers_of(benchmarks: Sequence[OpBenchmark], device_type: str) -> list[str]:
    """torch's own kernels of every op, in order; the first is the "sdpa" baseline."""
    return list(dict.fromkeys(p for b in benchmarks for p in b.peers.get(device_type, ())))


def icd_backends(device_type: str) -> tuple[str, ...]:
    """The icd backends measured on ``device_type``, built here or not: the reference, then
    every backend of the table (``icd.ops.backends``) that runs natively on that device type."""
    return native_backends(device_type)


def backends_for(
    device: torch.device, benchmarks: Sequence[OpBenchmark], wanted: Sequence[str] | None, known_peers: Sequence[str]
) -> list[str]:
    """In measuring order: the reference, the first peer, the fused backends built for this
    device, the other peers (peers only when an op with peers is measured)."""
    built = set(icd.ops.available_backends())
    fused = [b for b in icd_backends(device.type) if b in built and b != "reference"]
    peers = peers_of(benchmarks, device.type)
    names = ["reference", *peers[:1], *fused, *peers[1:]]
    if wanted is not None:
        unknown = set(wanted) - set(icd_backends(device.type)) - set(known_peers)
        if unknown:
            raise SystemExit(f"--backends: {sorted(unknown)} do not run on {device.type}")
        missing = [b for b in wanted if b not in names]
        if missing:
            print(f"note: backends {missing} are not built here; available: {sorted(built)}")
        names = [b for b in names if b in wanted]
    return names


def skip_reason(
    op: OpBenchmark, backend: str, pass_: str, w: Workload, cfg: Settings, history: dict, all_peers: set
) -> str | None:
    """Why a measurement is left out, or None: a peer without this op, or a predicted
    memory or time over the limits (predictions scale the last smaller size's figures;
    the TARGET size is exempt from the time limit)."""
    if backend in all_peers and backend not in op.peers.get(cfg.device.type, ()):
        return "n/a"
    if backend in MATERIALISING and pass_ in op.bytes_per_logit:
        need = op.bytes_per_logit[pass_] * w.n * w.heads * w.k * w.s
        if need > cfg.max_memory_bytes:
            return f"skipped: needs ~{need / 2**30:.1f} GiB > {cfg.max_memory_bytes / 2**30:.1f} GiB"
    seen = history.get((op.name, backend, pass_))
    if seen is not None and w != TARGET:
        seconds, work = seen
        predicted = seconds * op.work(w) / work
        if predicted > cfg.max_call_s:
            return f"skipped: predicted {predicted:.0f} s/call > {cfg.max_call_s:.0f} s"
    return None


def _base_row(op: OpBenchmark, backend: str, pass_: str, w: Workload, cfg: Settings, x: Inputs) -> dict:
    return {
        "device": cfg.device.type, "op": op.name, "pass": pass_, "backend": backend,
        "levels": w.levels.upper(), "input": f"{w.height}x{w.width}", "N": w.n, "h": w.heads,
        "K": w.k if op.per_k else "", "S": w.s, "D": w.head_dim,
        "dtype": str(cfg.dtype).removeprefix("torch."), "layout": cfg.layout,
        "masked_frac": round(x.masked_frac, 4),
    }  # fmt: skip


def run_workload(
    w: Workload,
    benchmarks: Sequence[OpBenchmark],
    backends: Sequence[str],
    cfg: Settings,
    history: dict,
    seen_s: set,
) -> list[dict]:
    """All measurements of one size; rows without ratios yet.

    ``backends`` in measuring order: the reference, then the SDPA peer, so that the others'
    results can be checked against the first of them that ran (rel_err, err_vs).
    """
    peers = peers_of(benchmarks, cfg.device.type)
    all_peers = set(peers)
    x = make_inputs(w, cfg.device, cfg.dtype, cfg.layout)
    rows = []
    for op in benchmarks:
        if not op.per_k:
            if (op.name, w.s) in seen_s:  # K does not enter this op
                continue
            seen_s.add((op.name, w.s))
        for pass_ in op.passes:
            baseline: tuple[str, Any] | None = None  # (backend, result) for rel_err
            for backend in backends:
                row = _base_row(op, backend, pass_, w, cfg, x)
                reason = skip_reason(op, backend, pass_, w, cfg, history, all_peers)
                if reason == "n/a":
                    continue
                if reason is None:
                    m, reason = _measure_one(op, backend, pass_, x, w, cfg)
                if reason is not None:
                    row["status"] = reason
                    rows.append(row)
                    print(f"  {op.name:12s} {pass_:8s} {backend:15s} {reason}", flush=True)
                    continue
                history[(op.name, backend, pass_)] = (m.median, op.work(w))
                if baseline is None and backend in ("reference", *peers[:1]):
                    baseline = (backend, m.result)
                elif baseline is not None:
                    row["rel_err"] = relative_error(m.result, baseline[1])
                    row["err_vs"] = baseline[0]
                row.update(
                    median_ms=m.median * 1e3, min_ms=min(m.times) * 1e3, max_ms=max(m.times) * 1e3,
                    repeats=m.calls, peak_mb=m.peak_bytes / 2**20, status="ok",
                )  # fmt: skip
                rows.append(row)
                print(
                    f"  {op.name:12s} {pass_:8s} {backend:15s} {m.median * 1e3:10.2f} ms "
                    f"{m.peak_bytes / 2**20:10.1f} MB",
                    flush=True,
                )
                del m
            del baseline
            gc.collect()
    return rows


def _measure_one(
    op: OpBenchmark, backend: str, pass_: str, x: Inputs, w: Workload, cfg: Settings
) -> tuple[Measurement | None, str | None]:
    try:
        fn = op.build_call(backend, pass_, x, w)
        m = measure(fn, cfg.device, grad_to_none=x.leaves(), warmup=cfg.warmup, repeats=cfg.repeats)
        return m, None
    except Exception as exc:  # a backend that fails is reported in its row, not fatal
        if cfg.device.type == "cuda":
            torch.cuda.empty_cache()
        x.clear_grads()
        text = " ".join(str(exc).split())[:160]
        return None, f"error: {type(exc).__name__}: {text}"


def add_ratios(rows: list[dict], benchmarks: Sequence[OpBenchmark], peer: str | None) -> None:
    """time/memory of each row over the reference's and (ops with peers) the SDPA peer's."""
    with_peers = {b.name for b in benchmarks if b.peers}
    ok = {
        (r["op"], r["pass"], r["backend"], r["S"], r["K"]): r
        for r in rows
        if r.get("status") == "ok"
    }
    for r in rows:
        if r.get("status") != "ok":
            continue
        for base, suffix in (("reference", "ref"), (peer, "sdpa")):
            if suffix == "sdpa" and r["op"] not in with_peers:
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


def print_targets(rows: Sequence[dict], benchmarks: Sequence[OpBenchmark], peer: str | None) -> None:
    """The project's targets for the fused backends at P3-P7 800x1333, K=300."""
    at = [r for r in rows if r.get("status") == "ok" and r["S"] == TARGET.s and r["K"] in (TARGET.k, "")]
    peers = {p for b in benchmarks for names in b.peers.values() for p in names}
    fused = sorted({r["backend"] for r in at} - {"reference"} - peers)
    if not at or not fused:
        return
    print("\nTargets at N=2, h=8, K=300, S=22,400 (ratio = backend / baseline, lower is better):")

    def get(op: str, pass_: str, backend: str | None) -> dict | None:
        return next((r for r in at if (r["op"], r["pass"], r["backend"]) == (op, pass_, backend)), None)

    for backend in fused:
        for op in benchmarks:
            for t in op.targets:
                base = peer if t.baseline == "sdpa" else t.baseline
                r, b = get(op.name, t.pass_, backend), get(op.name, t.pass_, base)
                if r is None or b is None:
                    continue
                key = "median_ms" if t.measure == "time" else "peak_mb"
                ratio = r[key] / b[key] if b[key] > 0 else math.inf
                ok = ratio < t.limit if t.strict else ratio <= t.limit
                cmp = "<" if t.strict else "<="
                print(
                    f"  {backend:8s} {op.name:12s} {t.pass_:8s} {t.measure:4s} {ratio:7.3f}x of {base:<14s}"
                    f" target {cmp} {t.limit:.3g}: {'met' if ok else 'MISSED'}"
                )


# --- plot ------------------------------------------------------------------------------------


def plot(rows: Sequence[dict], benchmarks: Sequence[OpBenchmark], path: Path, title: str) -> None:
    """Time and peak memory of each backend as a ratio to a baseline, one panel per op and pass.

    The baseline of a panel is torch's SDPA where the op has that peer, else the reference;
    the ratios sit on linear axes from zero with a line at 1 (below it: ahead of the baseline).
    Bars when the run has one size (--quick, each annotated with its milliseconds or MB);
    against S when it has several (solid: largest K, dashed: smaller K).
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ok = [r for r in rows if r.get("status") == "ok"]
    panels = []
    for op in benchmarks:
        for p in op.passes:
            mine = [r for r in ok if (r["op"], r["pass"]) == (op.name, p)]
            suffix = "sdpa" if any("time_vs_sdpa" in r for r in mine) else "ref"
            mine = [r for r in mine if f"time_vs_{suffix}" in r]
            if mine:
                panels.append((op.name, p, suffix, mine))
    if not panels:
        return
    fig, axes = plt.subplots(2, len(panels), figsize=(4.2 * len(panels), 7.5), squeeze=False)
    colors = {b: f"C{i}" for i, b in enumerate(sorted({r["backend"] for r in ok}))}
    one_size = len({r["S"] for r in ok}) == 1 and len({r["K"] for r in ok if r["K"] != ""}) <= 1
    for col, (op, pass_, suffix, mine) in enumerate(panels):
        baseline = "SDPA" if suffix == "sdpa" else "reference"
        for row, measure_, unit, absolute in ((0, "time", "time", "median_ms"), (1, "mem", "peak memory", "peak_mb")):
            ax = axes[row][col]
            key = f"{measure_}_vs_{suffix}"
            if one_size:
                _bars(ax, mine, key, absolute, colors)
            else:
                _lines(ax, mine, key, colors)
            ax.axhline(1.0, color="black", linewidth=0.8)
            ax.set_ylim(bottom=0)
            ax.set_ylabel(f"{unit} / {baseline}'s")
            ax.grid(True, axis="y", alpha=0.3)
        axes[0][col].set_title(f"{op} {pass_} (lower is better)", fontsize=9)
        if not one_size:
            axes[0][col].legend(fontsize=7)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _bars(ax: Any, rows: Sequence[dict], key: str, absolute: str, colors: dict[str, str]) -> None:
    names = [r["backend"] for r in rows]
    values = [r.get(key, 0.0) for r in rows]
    ax.bar(names, values, color=[colors[n] for n in names])
    for i, (v, r) in enumerate(zip(values, rows, strict=True)):
        unit = "ms" if absolute == "median_ms" else "MB"
        ax.annotate(f"{v:.2f}x\n{r[absolute]:.3g} {unit}", (i, v), ha="center", va="bottom", fontsize=7)
    ax.set_ylim(top=1.2 * max([*values, 1.0]))
    ax.tick_params(axis="x", labelrotation=30, labelsize=8)


def _lines(ax: Any, rows: Sequence[dict], key: str, colors: dict[str, str]) -> None:
    largest_k = max((r["K"] for r in rows if r["K"] != ""), default="")
    for backend, k in sorted({(r["backend"], r["K"]) for r in rows}, key=str):
        series = sorted(
            (r for r in rows if (r["backend"], r["K"]) == (backend, k) and key in r), key=lambda r: r["S"]
        )
        ax.plot(
            [r["S"] for r in series], [r[key] for r in series],
            "-" if k == largest_k else "--", marker="o", color=colors[backend],
            label=backend if k == "" else f"{backend} K={k}",
        )  # fmt: skip
    ax.set_xscale("log")
    ax.set_xlabel("S (tokens)")


# --- resident-set cross-check --------------------------------------------------------------


def rss_probe(spec: str, benchmarks: Sequence[OpBenchmark], w: Workload, cfg: Settings) -> dict:
    """In this (fresh) process: RSS high-water rise and profiler peak of one call, in bytes."""
    name, backend, pass_ = spec.split(":")
    op = next(b for b in benchmarks if b.name == name)
    x = make_inputs(w, cfg.device, cfg.dtype, cfg.layout)
    fn = op.build_call(backend, pass_, x, w)
    fn()  # warm-up: code pages, thread pools and lazy initialisation stay out of the figure
    x.clear_grads()
    rss = rss_peak(fn)
    x.clear_grads()
    _, profiled, _ = peak_memory(fn, cfg.device)
    return {"op": name, "backend": backend, "pass": pass_, "rss_bytes": rss, "profiler_bytes": profiled}


def rss_check(
    w: Workload, benchmarks: Sequence[OpBenchmark], backends: Sequence[str], script: str, argv: Sequence[str]
) -> None:
    """Compare the profiler's peak with the RSS high-water mark, each call in a new process.

    glibc is told to serve every allocation over 64 KiB with mmap and give it back on free,
    so the resident set follows the live tensors.
    """
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536", MALLOC_TRIM_THRESHOLD_="0")
    all_peers = set(peers_of(benchmarks, "cpu"))
    print(f"\nPeak memory cross-check (fresh process per call, {w.name}):")
    body = []
    for op in benchmarks:
        for pass_ in op.passes:
            for backend in backends:
                if backend in all_peers and backend not in op.peers.get("cpu", ()):
                    continue
                spec = f"{op.name}:{backend}:{pass_}"
                cmd = [sys.executable, script, *argv, "--rss-probe", spec]
                done = subprocess.run(cmd, env=env, capture_output=True, text=True, check=False)
                lines = [ln for ln in done.stdout.splitlines() if ln.startswith("{")]
                if done.returncode != 0 or not lines:
                    body.append((op.name, pass_, backend, "failed", "", ""))
                    continue
                r = json.loads(lines[-1])
                prof, rss = r["profiler_bytes"] / 2**20, r["rss_bytes"] / 2**20
                body.append((op.name, pass_, backend, f"{prof:.1f}", f"{rss:.1f}", f"{rss / max(prof, 1e-9):.2f}"))
    print(format_table(body, ("op", "pass", "backend", "profiler MB", "RSS MB", "RSS/prof")))


# --- command line ------------------------------------------------------------------------


def parse_args(argv: Sequence[str] | None, benchmarks: Sequence[OpBenchmark], description: str) -> argparse.Namespace:
    names = [b.name for b in benchmarks]
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--device", choices=DEVICE_TYPES, default=None, help="default: cuda when available, else cpu")
    p.add_argument(
        "--quick",
        action="store_true",
        help="only P3-P7 800x1333, K=300, fewer repeats (< 2 min on 2 CPU cores)",
    )
    p.add_argument("--ops", default=",".join(names), help=f"comma list of {', '.join(names)}")
    p.add_argument(
        "--backends",
        default=None,
        help="comma list; default all for the device: "
        + "; ".join(f"{d}: {', '.join((*icd_backends(d), *peers_of(benchmarks, d)))}" for d in DEVICE_TYPES),
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
    p.add_argument(
        "--warmup",
        type=int,
        default=None,
        help="warm-up calls (default cpu 2: the profiled call and blocked_autorange's block-size "
        "estimate; cuda 3, before the memory call and do_bench)",
    )
    p.add_argument(
        "--repeats",
        type=int,
        default=None,
        help="timed calls (default cpu 5, cuda 20; --quick cpu 3, cuda 10); cpu: about that many "
        "(blocked_autorange runs until they add up), cuda: do_bench over repeats x 5 ms",
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
        help="skip a measurement whose call is predicted (from the previous size) to take longer (default 5)",
    )
    p.add_argument("--out", type=Path, default=default_out_dir(), help=OUT_HELP)
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


def main(
    argv: Sequence[str] | None,
    benchmarks: Sequence[OpBenchmark],
    *,
    script: str,
    description: str | None = None,
) -> int:
    """Run ``benchmarks`` (those that ``--ops`` selects) over the sizes of the command line.

    ``script`` is the file run as ``python <script>`` (the RSS cross-check reruns it).
    """
    args = parse_args(argv, benchmarks, (description or "").split("\n\n")[0])
    cfg = make_settings(args)
    names = _split(args.ops)
    known = [b.name for b in benchmarks]
    if set(names) - set(known):
        raise SystemExit(f"--ops: {sorted(set(names) - set(known))}; expected some of {', '.join(known)}")
    chosen = [b for b in benchmarks if b.name in names]
    wanted = _split(args.backends) if args.backends else None
    backends = backends_for(cfg.device, chosen, wanted, peers_of(benchmarks, cfg.device.type))
    workloads = workloads_of(args)
    if args.rss_probe:
        print(json.dumps(rss_probe(args.rss_probe, chosen, workloads[0], cfg)))
        return 0

    info = machine_info(cfg.device)
    print("machine: " + ", ".join(f"{k} {v}" for k, v in info.items()))
    print(f"device {cfg.device}, dtype {args.dtype}, layout {cfg.layout}")
    print(f"backends {', '.join(backends)}")
    peer = next(iter(peers_of(benchmarks, cfg.device.type)), None)
    rows: list[dict] = []
    history: dict = {}
    seen_s: set = set()
    for w in workloads:
        masked = w.key_padding_mask().float().mean().item()
        print(f"\n{w.name}, N={w.n}, h={w.heads}, D={w.head_dim}, {100 * masked:.1f}% keys masked, "
              f"levels {w.shapes}", flush=True)  # fmt: skip
        block = run_workload(w, chosen, backends, cfg, history, seen_s)
        add_ratios(block, chosen, peer)
        print_table(block)
        rows += block
    for r in rows:
        r["device_name"] = info["gpu"] if cfg.device.type == "cuda" else info["cpu"]
    print_targets(rows, chosen, peer)

    stem = f"attention_{cfg.device.type}-{slug(rows[0]['device_name'] if rows else 'unknown')}"
    stem += "_quick" if args.quick else ""
    csv_path = args.out / f"{stem}.csv"
    write_csv(csv_path, rows, COLUMNS, run_columns(info, cfg.device))
    print(f"\nwrote {csv_path}")
    if not args.no_plot:
        name = rows[0]["device_name"] if rows else str(cfg.device)
        ks = sorted({int(r["K"]) for r in rows if r["K"] != ""})
        ss = sorted({int(r["S"]) for r in rows})
        sizes = f"K={'/'.join(map(str, ks))}, S={ss[0]}" + (f"-{ss[-1]}" if len(ss) > 1 else "") if ss else ""
        threads = f", {info['torch_threads']} threads" if cfg.device.type == "cpu" else ""
        title = (
            f"icd ops on {name}{threads}: N=2, h=8, D=32, {args.dtype}, layout {cfg.layout}, {sizes}\n"
            f"torch {info['torch']}, triton {info['triton']}, commit {info['commit']}"
        )
        plot(rows, chosen, args.out / f"{stem}.png", title)
        print(f"wrote {args.out / f'{stem}.png'}")
    if args.rss_check and cfg.device.type == "cpu" and workloads:
        rss_check(workloads[0], chosen, backends, script, list(argv if argv is not None else sys.argv[1:]))
    return 0
