"""``icd train``'s own training step, timed per distillation, precision and compilation; and the
resume and DDP checks of the trainer on a device.

    python benchmarks/run_training.py --device cuda --out DIR [--quick]   # the sweep below
    python benchmarks/run_training.py --device cpu --tiny --out DIR       # the same at toy size (CI)
    python benchmarks/run_training.py --check resume --device cuda --out DIR
    torchrun --nproc_per_node N benchmarks/run_training.py --check ddp --device cuda --out DIR

The sweep runs the paper's configuration (configs/retinanet/r50_1x_icd.toml: RetinaNet R50
student, R101 teacher, 800 x 1333, 2 images per step; the teacher random-initialised, which does
not change the time) on generated COCO-format data of that resolution: no distillation, FPN-MSE
and ICD, each in float32, bfloat16 autocast and float16 autocast with GradScaler; then ICD in
bfloat16 with --compile (inductor) and with --icd-static-shapes --icd-cuda-graphs. Each
configuration runs in a subprocess of its own under a timeout (one failure or hang does not stop
the others): it builds ``icd.engine.trainer.Trainer`` from the ``icd train`` flags, takes a few
batches of the data, runs ``--warmup`` steps then ``--steps`` timed steps (``Trainer.step``, what
``icd train`` runs per iteration, data loading apart), reads the losses (which must be finite),
and on CUDA counts the host synchronisations of a few more steps (``torch.cuda.set_sync_debug_mode``,
attributed to icd's code or to others by the calling Python frame). The "no distillation" run also
times the teacher's forward on the same batches, for ICD's step / (student step + teacher forward).

Writes DIR/training.md and DIR/training.csv (``--check``: DIR/resume.md, DIR/ddp.md); exit status
0 only when everything ran.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
CONFIG_DIR = ROOT / "configs" / "retinanet"
TARGET_RATIO = 1.10  # ICD's step / (student step + teacher forward), the target
PRECISIONS = {"fp32": [], "bf16": ["--amp", "--amp-dtype", "bfloat16"], "fp16": ["--amp", "--amp-dtype", "float16"]}
COLUMNS = (
    "config", "distill", "precision", "extra", "status", "median_ms", "min_ms", "max_ms", "iqr_ms", "steps",
    "images_per_s", "peak_mb", "teacher_fwd_ms", "icd_ratio", "syncs_per_step", "icd_syncs_per_step",
    "final_loss", "graph_breaks", "cudagraph_skips", "device_name", "error",
)  # fmt: skip


@dataclass
class Workload:
    """What each configuration trains on (``--tiny``: R18 on 64 px images, 2 steps)."""

    device: str
    tiny: bool
    height: int = 800
    width: int = 1333
    images: int = 8  # in the generated training split
    boxes: tuple[int, int] = (5, 30)  # boxes per image, at least and at most
    classes: int = 80
    batch_size: int = 2
    warmup: int = 10
    steps: int = 30
    sync_steps: int = 3  # further steps whose host synchronisations are counted (CUDA)


def workload(device: str, tiny: bool, quick: bool) -> Workload:
    if tiny:
        return Workload(device, True, 64, 80, 4, (1, 4), 7, 2, 1, 2, 1)
    w = Workload(device, False)
    if quick:
        w.warmup, w.steps = 3, 10
    return w


@dataclass
class Config:
    name: str
    distill: str  # none, fpn-mse, icd
    precision: str  # fp32, bf16, fp16
    extra: list[str] = field(default_factory=list)


MIN_CONFIG_S = 20.0  # under --budget: a configuration is not started with less left


def configurations() -> list[Config]:
    """Every configuration, most wanted first (a run under --budget keeps the first that fit): ICD's
    ratio to the student in bf16, its CUDA-graph path, FPN-MSE, the other precisions, then inductor,
    whose compilation alone takes a minute or more."""
    plain = {(d, p): Config(f"{d} {p}", d, p) for d in ("none", "fpn-mse", "icd") for p in PRECISIONS}
    order = [("none", "bf16"), ("icd", "bf16")]
    graphs = Config("icd bf16 static+graphs", "icd", "bf16", ["--icd-static-shapes", "--icd-cuda-graphs"])
    others = [plain[(d, p)] for p in PRECISIONS if p != "bf16" for d in ("none", "icd", "fpn-mse")]
    rest = [plain[("fpn-mse", "bf16")], *others]
    compiled = Config("icd bf16 compile", "icd", "bf16", ["--compile"])
    return [plain[k] for k in order] + [graphs] + rest + [compiled]


# -- the data and the teacher ---------------------------------------------------------------------
def make_data(root: Path, w: Workload, seed: int = 0) -> Path:
    """A COCO-format dataset of ``w.images`` training (and 2 val) images of w.height x w.width:
    noisy gradients with filled rectangles, one box per rectangle, ``w.classes`` categories."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(seed)
    categories = [{"id": i + 1, "name": f"class{i + 1}"} for i in range(w.classes)]
    for split, count in (("train", w.images), ("val", 2)):
        (root / split).mkdir(parents=True, exist_ok=True)
        images, annotations = [], []
        for i in range(count):
            ramp = np.linspace(0, 160, w.width)[None, :, None] + np.linspace(0, 60, w.height)[:, None, None]
            pixels = (ramp + rng.integers(0, 40, (w.height, w.width, 3))).clip(0, 255).astype(np.uint8)
            for _ in range(int(rng.integers(w.boxes[0], w.boxes[1] + 1))):
                bw = int(rng.integers(max(4, w.width // 40), max(5, w.width // 3)))
                bh = int(rng.integers(max(4, w.height // 40), max(5, w.height // 3)))
                x, y = int(rng.integers(0, w.width - bw)), int(rng.integers(0, w.height - bh))
                pixels[y : y + bh, x : x + bw] = rng.integers(0, 256, 3)
                annotations.append({
                    "id": len(annotations) + 1, "image_id": i + 1, "category_id": int(rng.integers(1, w.classes + 1)),
                    "bbox": [x, y, bw, bh], "area": bw * bh, "iscrowd": 0,
                })  # fmt: skip
            name = f"{i:04d}.png"
            Image.fromarray(pixels).save(root / split / name)
            images.append({"id": i + 1, "file_name": name, "width": w.width, "height": w.height})
        (root / "annotations").mkdir(exist_ok=True)
        with open(root / "annotations" / f"instances_{split}.json", "w") as f:
            json.dump({"images": images, "annotations": annotations, "categories": categories}, f)
    return root


def make_teacher(path: Path, w: Workload) -> Path:
    """A random-initialised teacher checkpoint (R101, R18 for --tiny) with its detector spec.

    GroupNorm: a random ResNet-101 under FrozenBatchNorm (identity statistics) gives FPN maps
    beyond float16's range (~1.5e5 seen), which a trained one never does."""
    import torch

    from icd.detection.models import DetectorSpec, build_detector
    from icd.engine.checkpoint import save_atomic

    spec = DetectorSpec(
        "retinanet", "resnet18" if w.tiny else "resnet101", num_classes=w.classes,
        fpn_channels=32 if w.tiny else 256, norm="gn", min_level=3, max_level=7 if not w.tiny else 5,
        min_size=(w.height,), max_size=w.width,
    )  # fmt: skip
    torch.manual_seed(1)
    save_atomic({"model": build_detector(spec).state_dict(), "detector_spec": spec.to_dict()}, str(path))
    return path


def train_argv(w: Workload, data: Path, teacher: Path, out: Path, cfg: Config, iters: int) -> list[str]:
    """The ``icd train`` command line of a configuration."""
    if w.tiny:
        argv = ["train", "--data-path", str(data), "--detector", "retinanet", "--backbone", "resnet18",
                "--fpn-channels", "32", "--norm", "gn", "--min-level", "3", "--max-level", "5",
                "--min-size", str(w.height), "--max-size", str(w.width)]  # fmt: skip
    else:
        preset = "r50_1x.toml" if cfg.distill == "none" else "r50_1x_icd.toml"
        # the preset's lr is for 16 images per step: scaled to this batch (a random-initialised
        # student at 8x that lr may diverge within the timed steps)
        argv = ["train", "--config", str(CONFIG_DIR / preset), "--data-path", str(data), "--min-size",
                str(w.height), "--max-size", str(w.width), "--lr", str(0.01 * w.batch_size / 16)]  # fmt: skip
    argv += ["--batch-size", str(w.batch_size), "--workers", "0", "--device", w.device, "--no-eval",
             "--no-progress", "--output-dir", str(out), "--iters", str(iters), "--print-freq", str(iters),
             "--checkpoint-every", "0", "--warmup-iters", "0", "--lr-steps", str(iters)]  # fmt: skip
    if cfg.distill != "none":
        argv += ["--teacher", str(teacher), "--distill", cfg.distill, "--distill-warmup-iters", "0"]
        if not w.tiny:
            argv += ["--inherit-teacher", ""]  # a GroupNorm teacher's head is not the student's
    return argv + PRECISIONS[cfg.precision] + cfg.extra


# -- one configuration, in its own process ----------------------------------------------------------
def _sync_counts(trainer, batches, steps: int) -> tuple[float, float]:
    """(host synchronisations per step, those from icd's code) over ``steps`` CUDA steps: each one
    torch.cuda.set_sync_debug_mode("warn") reports, attributed by the Python frame that called it."""
    import torch

    import icd

    icd_dir = os.path.dirname(os.path.abspath(icd.__file__))
    torch.cuda.synchronize()
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            for i in range(steps):
                trainer.step(*batches[i % len(batches)])
        finally:
            torch.cuda.set_sync_debug_mode("default")
    syncs = [s for s in seen if "synchroniz" in str(s.message).lower()]
    ours = [s for s in syncs if os.path.abspath(s.filename).startswith(icd_dir)]
    return len(syncs) / steps, len(ours) / steps


def _compile_counts(args) -> dict:
    """torch.compile's graph breaks and the graphs inductor ran without CUDA graphs (it skips them,
    with a log line, for e.g. a CPU tensor in the graph): a compiled run's health."""
    if not (args.compile or getattr(args, "icd_cuda_graphs", False)):
        return {}
    from torch._dynamo.utils import counters

    return {"graph_breaks": sum(counters["graph_break"].values()),
            "cudagraph_skips": counters["inductor"].get("cudagraph_skips", 0)}  # fmt: skip


def _elapsed_ms(step, n: int, device) -> list[float]:
    """Wall times (ms) of ``n`` calls of ``step(i)``: CUDA events (read after the last call, so
    the calls queue as in training), or the clock on CPU."""
    import torch

    if device.type == "cuda":
        events = [torch.cuda.Event(enable_timing=True) for _ in range(n + 1)]
        events[0].record()
        for i in range(n):
            step(i)
            events[i + 1].record()
        torch.cuda.synchronize()
        return [events[i].elapsed_time(events[i + 1]) for i in range(n)]
    times = []
    for i in range(n):
        start = time.perf_counter()
        step(i)
        times.append((time.perf_counter() - start) * 1e3)
    return times


def run_one(w: Workload, cfg: Config, data: Path, teacher: Path, out: Path) -> dict:
    """Build the trainer of ``cfg``, warm up, time; the result row's numbers."""
    import torch

    from icd.cli import build_parser
    from icd.detection.adapters import family_of
    from icd.engine.evaluator import autocast
    from icd.engine.run_spec import load_teacher
    from icd.engine.trainer import Trainer

    iters = w.warmup + w.steps + w.sync_steps + 10
    argv = train_argv(w, data, teacher, out, cfg, iters)
    preset = argv[argv.index("--config") + 1] if "--config" in argv else None
    args = build_parser(preset, commands=("train",)).parse_args(argv)
    trainer = Trainer(args)
    try:
        device = trainer.info.device
        batches = []
        while len(batches) < 4:
            batch = trainer.batches.next()
            if batch is None:
                trainer.batches.next_epoch()
                continue
            batches.append(batch)
        trainer.model.train()
        for i in range(w.warmup):
            trainer.step(*batches[i % len(batches)])
        trainer.read_losses()  # finite, or NonFiniteError
        if device.type == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        times = _elapsed_ms(lambda i: trainer.step(*batches[i % len(batches)]), w.steps, device)
        losses = trainer.read_losses()
        peak_mb = torch.cuda.max_memory_allocated() / 2**20 if device.type == "cuda" else float("nan")
        syncs = icd_syncs = float("nan")
        if device.type == "cuda" and w.sync_steps:
            syncs, icd_syncs = _sync_counts(trainer, batches, w.sync_steps)
            trainer.read_losses()
        row = {"times": times, "peak_mb": peak_mb, "syncs": syncs, "icd_syncs": icd_syncs,
               "final_loss": losses[-1][1]["loss"], **_compile_counts(args)}  # fmt: skip
        if cfg.distill == "none":  # the teacher's forward on the same padded batches, for the ratio
            teacher_model, teacher_spec = load_teacher(str(teacher), trainer.train_set.num_classes, args, device)
            padded = []
            for images, _ in batches:
                images = [im.to(device) for im in images]
                with torch.no_grad():
                    padded.append(trainer.family.frame(trainer.model, trainer.spec, images).images)

            def forward(i: int) -> None:
                with torch.no_grad(), autocast(device, args.amp, args.amp_dtype):
                    family_of(teacher_spec.detector).features(teacher_model, teacher_spec, padded[i % len(padded)])

            for i in range(w.warmup):
                forward(i)
            row["teacher_times"] = _elapsed_ms(forward, w.steps, device)
        return row
    finally:
        trainer.close()


def worker(spec: str, result: str) -> int:
    """The subprocess of one configuration: its result as JSON in ``result``."""
    job = json.loads(spec)
    w, cfg = Workload(**{**job["workload"], "boxes": tuple(job["workload"]["boxes"])}), Config(**job["config"])
    try:
        row = run_one(w, cfg, Path(job["data"]), Path(job["teacher"]), Path(job["out"]))
        row["status"] = "ok"
    except BaseException as err:  # reported in the table; the parent goes on with the next one
        traceback.print_exc()
        row = {"status": "error", "error": f"{type(err).__name__}: {' '.join(str(err).split())}"[:300]}
    Path(result).write_text(json.dumps(row))
    return 0 if row["status"] == "ok" else 1


# -- the sweep --------------------------------------------------------------------------------------
def _row(cfg: Config, w: Workload, got: dict, device_name: str) -> dict:
    row = {"config": cfg.name, "distill": cfg.distill, "precision": cfg.precision, "extra": " ".join(cfg.extra),
           "status": got.get("status", "error"), "error": got.get("error", ""), "device_name": device_name}  # fmt: skip
    times = got.get("times")
    if times:
        q = statistics.quantiles(times, n=4) if len(times) > 1 else [times[0]] * 3
        median = statistics.median(times)
        row.update(median_ms=median, min_ms=min(times), max_ms=max(times), iqr_ms=q[2] - q[0], steps=len(times),
                   images_per_s=w.batch_size * 1e3 / median, peak_mb=got.get("peak_mb"),
                   syncs_per_step=got.get("syncs"), icd_syncs_per_step=got.get("icd_syncs"),
                   final_loss=got.get("final_loss"), graph_breaks=got.get("graph_breaks"),
                   cudagraph_skips=got.get("cudagraph_skips"))  # fmt: skip
    if got.get("teacher_times"):
        row["teacher_fwd_ms"] = statistics.median(got["teacher_times"])
    return row


def _ratios(rows: list[dict]) -> None:
    """icd_ratio of each ICD row: its step / (the same precision's student step + teacher forward)."""
    base = {
        r["precision"]: r for r in rows if r["distill"] == "none" and r.get("median_ms") and r.get("teacher_fwd_ms")
    }
    for r in rows:
        b = base.get(r["precision"])
        if r["distill"] == "icd" and r.get("median_ms") and b is not None:
            r["icd_ratio"] = r["median_ms"] / (b["median_ms"] + b["teacher_fwd_ms"])


def _fmt(value, digits: int = 1) -> str:
    if value is None or value == "" or (isinstance(value, float) and math.isnan(value)):
        return "-"
    return f"{value:.{digits}f}" if isinstance(value, float) else str(value)


def write_report(out: Path, rows: list[dict], w: Workload, machine: dict, seconds: float) -> None:
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    import torch
    from common import run_columns, write_csv

    write_csv(out / "training.csv", rows, COLUMNS, run_columns(machine, torch.device(w.device)))
    size = f"{w.height}x{w.width}"
    model = "R18 <- R18 (--tiny)" if w.tiny else "R50 student <- R101 teacher (configs/retinanet/r50_1x_icd.toml)"
    lines = [
        f"# icd train step timings on {machine['gpu'] if w.device.startswith('cuda') else machine['cpu']}",
        "",
        f"RetinaNet {model}, "
        f"{w.batch_size} images of {size} per step, generated COCO-format data ({w.classes} classes, "
        f"{w.boxes[0]}-{w.boxes[1]} boxes per image); {w.warmup} warm-up + {w.steps} timed steps per configuration, "
        f"each in its own process; {seconds:.0f} s in all.",
        "",
        " | ".join(f"{k}: {v}" for k, v in machine.items()),
        "",
        "| configuration | status | step ms (median) | min-max | IQR | images/s | peak MB | teacher fwd ms "
        "| ICD / (student + teacher fwd) | syncs/step (icd's) | final loss | graph breaks / CUDA-graph skips |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|",
    ]
    for r in rows:
        status = r["status"] if r["status"] == "ok" else f"{r['status']}: {r.get('error', '')}"
        cells = [
            r["config"], status, _fmt(r.get("median_ms")), f"{_fmt(r.get('min_ms'))}-{_fmt(r.get('max_ms'))}",
            _fmt(r.get("iqr_ms")), _fmt(r.get("images_per_s")), _fmt(r.get("peak_mb"), 0),
            _fmt(r.get("teacher_fwd_ms")), _fmt(r.get("icd_ratio"), 3),
            f"{_fmt(r.get('syncs_per_step'))} ({_fmt(r.get('icd_syncs_per_step'))})", _fmt(r.get("final_loss"), 4),
            f"{_fmt(r.get('graph_breaks'))} / {_fmt(r.get('cudagraph_skips'))}",
        ]  # fmt: skip
        lines.append("| " + " | ".join(cells) + " |")
    ratios = [r["icd_ratio"] for r in rows if r.get("icd_ratio") is not None]
    met = [r["config"] for r in rows if r.get("icd_ratio") is not None and r["icd_ratio"] <= TARGET_RATIO]
    lines += [
        "",
        f"Target: ICD's step <= {TARGET_RATIO} x (student step + teacher forward), same precision: "
        + (f"met by {', '.join(met) or 'none'} of {len(ratios)} ICD runs." if ratios else "not measured."),
        "",
        "syncs/step: host synchronisations per training step seen by torch.cuda.set_sync_debug_mode "
        "(in brackets those called from icd's code; torchvision's detection losses and GradScaler's "
        "step synchronise by themselves). Losses are read every --print-freq steps, outside these. "
        "Graph breaks / CUDA-graph skips (compiled runs): torch._dynamo's counters; a skip means inductor "
        "ran that graph without CUDA graphs (its log says why).",
    ]
    (out / "training.md").write_text("\n".join(lines) + "\n")


def sweep(opts: argparse.Namespace) -> int:
    import torch

    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from common import machine_info

    w = workload(opts.device, opts.tiny, opts.quick)
    out = Path(opts.out)
    out.mkdir(parents=True, exist_ok=True)
    configs = configurations()
    if opts.device == "cpu":  # CUDA graphs need CUDA (the run refuses them with one line)
        configs = [c for c in configs if "--icd-cuda-graphs" not in c.extra]
    if opts.tiny:  # --tiny: a check that every path runs, not a timing (aot_eager: inductor takes minutes)
        configs = [c for c in configs if not c.extra or opts.compile_tiny]
        for c in configs:
            if "--compile" in c.extra:
                c.extra = [*c.extra, "--compile-backend", "aot_eager"]
    if opts.only:
        configs = [c for c in configs if c.name in opts.only.split(",")]
    machine = machine_info(torch.device(opts.device))
    device_name = machine["gpu"] if opts.device.startswith("cuda") else machine["cpu"]
    rows = []
    start = time.perf_counter()
    with tempfile.TemporaryDirectory(dir=out, prefix="work-") as work:
        work = Path(work)
        data = make_data(work / "data", w)
        teacher = make_teacher(work / "teacher.pth", w)
        for k, cfg in enumerate(configs):
            job = {"workload": asdict(w), "config": asdict(cfg), "data": str(data), "teacher": str(teacher),
                   "out": str(work / f"run{k}")}  # fmt: skip
            result = work / f"result{k}.json"
            cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", json.dumps(job), "--result", str(result)]
            compiled = "--compile" in cfg.extra or "--icd-cuda-graphs" in cfg.extra
            timeout = opts.timeout or (90.0 if opts.quick else 300.0)
            timeout *= 2 if compiled else 1
            t0 = time.perf_counter()
            if opts.budget is not None:  # each configuration gets what is left of the budget, at most its timeout
                left = opts.budget - (t0 - start)
                if left < MIN_CONFIG_S:
                    got = {"status": "skipped", "error": f"--budget {opts.budget:.0f} s: not started"}
                    rows.append(_row(cfg, w, got, device_name))
                    print(f"{cfg.name:<24} skipped (budget)", flush=True)
                    continue
                timeout = min(timeout, left)
            try:
                proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=timeout)
                got = json.loads(result.read_text()) if result.exists() else {
                    "status": "error", "error": f"exit {proc.returncode}: {_last_line(proc.stderr)}"}
            except subprocess.TimeoutExpired:
                got = {"status": "timeout", "error": f"over {timeout:.0f} s"}
            row = _row(cfg, w, got, device_name)
            rows.append(row)
            print(f"{cfg.name:<24} {row['status']:<8} {_fmt(row.get('median_ms'))} ms "
                  f"({time.perf_counter() - t0:.0f} s) {row.get('error', '')}", flush=True)  # fmt: skip
            _ratios(rows)  # after every configuration: a sweep killed from outside keeps its table
            write_report(out, rows, w, machine, time.perf_counter() - start)
    _ratios(rows)
    write_report(out, rows, w, machine, time.perf_counter() - start)
    print(f"wrote {out / 'training.md'} and {out / 'training.csv'}")
    return 0 if rows and all(r["status"] == "ok" for r in rows) else 1


def _last_line(text: str) -> str:
    lines = [line for line in (text or "").strip().splitlines() if line.strip()]
    return lines[-1][:300] if lines else "no output"


# -- --check resume --------------------------------------------------------------------------------
RESUME_TOLERANCE = 1e-4  # largest |difference| / largest |value| accepted on CUDA (atomics reorder sums)


def _flat_state(ckpt: dict) -> dict:
    import torch

    from icd.engine.finite import nested_tensors

    keep = {k: ckpt[k] for k in ("model", "distiller", "optimizer", "teacher_optimizer", "scaler") if k in ckpt}
    return {name: t for name, t in nested_tensors(keep) if torch.is_tensor(t)}


def check_resume(opts: argparse.Namespace) -> int:
    """Train 4 steps straight, and 2 + (checkpoint, resume) 2: the same weights, optimiser and
    scaler state (float16 + GradScaler, ICD)."""
    import torch

    from icd.cli import main
    from icd.engine.checkpoint import load_checkpoint

    if opts.device == "cuda":
        torch.backends.cudnn.benchmark = False
        torch.backends.cudnn.deterministic = True
    w = workload(opts.device, opts.tiny or opts.device == "cpu", quick=True)
    out = Path(opts.out)
    out.mkdir(parents=True, exist_ok=True)
    status, lines = "ok", []
    with tempfile.TemporaryDirectory(dir=out, prefix="work-") as work:
        work = Path(work)
        data, teacher = make_data(work / "data", w), make_teacher(work / "teacher.pth", w)
        cfg = Config("icd fp16", "icd", "fp16")

        def run(name: str, *extra: str) -> int:
            argv = train_argv(w, data, teacher, work / name, cfg, 4)
            argv[argv.index("--print-freq") + 1] = "1"
            return main(argv + list(extra))

        codes = [run("straight"), run("resumed", "--stop-after-iters", "2")]
        codes.append(run("resumed", "--resume", str(work / "resumed" / "checkpoint.pth")))
        if any(codes):
            status = f"error: icd train exit statuses {codes}"
        else:
            a = _flat_state(load_checkpoint(str(work / "straight" / "checkpoint.pth"), "straight"))
            b = _flat_state(load_checkpoint(str(work / "resumed" / "checkpoint.pth"), "resumed"))
            if a.keys() != b.keys():
                status = f"error: the checkpoints hold other entries ({sorted(a.keys() ^ b.keys())[:5]})"
            else:
                equal = all(torch.equal(a[k], b[k]) for k in a)
                worst, name = 0.0, ""
                for k in a:
                    if a[k].is_floating_point() and a[k].numel():
                        scale = max(float(a[k].abs().max()), 1e-12)
                        diff = float((a[k].double() - b[k].double()).abs().max()) / scale
                        if diff > worst:
                            worst, name = diff, k
                lines.append(f"bitwise equal: {equal}; largest relative difference {worst:.3g}" +
                             (f" ({name})" if name else ""))  # fmt: skip
                tolerance = 0.0 if opts.device == "cpu" else RESUME_TOLERANCE
                if not equal and worst > tolerance:
                    status = f"error: resumed run differs by {worst:.3g} > {tolerance:g}"
                scaler = load_checkpoint(str(work / "resumed" / "checkpoint.pth"), "resumed").get("scaler")
                lines.append(f"GradScaler state in the checkpoint: {scaler}")
    text = [
        f"# Resume check on {opts.device}", "",
        f"ICD, float16 autocast + GradScaler, {'R18 <- R18 at 64 px' if w.tiny else 'R50 <- R101 at 800x1333'}: "
        "4 steps straight against 2 steps, checkpoint, --resume, 2 steps; model, distiller, both optimisers "
        f"and the scaler compared (tolerance: bitwise on CPU, {RESUME_TOLERANCE:g} relative on CUDA).", "",
        f"status: {status}", "", *lines,
    ]  # fmt: skip
    (out / "resume.md").write_text("\n".join(text) + "\n")
    print("\n".join(text))
    return 0 if status == "ok" else 1


# -- --check ddp -----------------------------------------------------------------------------------
def check_ddp(opts: argparse.Namespace) -> int:
    """Under torchrun: every rank trains 3 ICD steps through DDP (nccl on CUDA, gloo on CPU, the
    process group joined at every world size, 1 included); the ranks' weights must be equal."""
    import hashlib

    import torch
    import torch.distributed as dist

    from icd.cli import build_parser
    from icd.engine.trainer import Trainer

    rank = int(os.environ.get("RANK", "0"))
    w = workload(opts.device, opts.tiny or opts.device == "cpu", quick=True)
    out = Path(opts.out)
    out.mkdir(parents=True, exist_ok=True)
    work = out / f"ddp-work-rank{rank}"  # each rank its own copy: nothing is shared before the group exists
    data, teacher = make_data(work / "data", w), make_teacher(work / "teacher.pth", w)
    argv = train_argv(w, data, teacher, out / "ddp-run", Config("icd bf16", "icd", "bf16"), 3)
    argv[argv.index("--print-freq") + 1] = "1"
    argv += ["--overwrite"]
    preset = argv[argv.index("--config") + 1] if "--config" in argv else None
    args = build_parser(preset, commands=("train",)).parse_args(argv)
    trainer = Trainer(args)
    try:
        trainer.run()
        backend = dist.get_backend() if dist.is_initialized() else "none (no process group)"
        params = torch.cat([p.detach().double().flatten().cpu() for p in trainer.model.parameters()])
        digest = hashlib.sha256(params.numpy().tobytes()).hexdigest()[:16]
        mine = {"rank": rank, "device": str(trainer.info.device), "digest": digest, "sum": float(params.sum())}
        every = [None] * trainer.info.world_size
        if dist.is_initialized():
            dist.all_gather_object(every, mine)
        else:
            every = [mine]
        agree = len({e["digest"] for e in every}) == 1
        if rank == 0:
            text = [
                "# DDP check", "",
                f"backend {backend}, world size {trainer.info.world_size}, 3 ICD steps (bfloat16 autocast)", "",
                "| rank | device | weights sha256 | sum |", "|---|---|---|---:|",
                *(f"| {e['rank']} | {e['device']} | {e['digest']} | {e['sum']:.6g} |" for e in every), "",
                f"status: {'ok' if agree and dist.is_initialized() else 'error'} (ranks agree: {agree})",
            ]  # fmt: skip
            (out / "ddp.md").write_text("\n".join(text) + "\n")
            print("\n".join(text))
        return 0 if agree and dist.is_initialized() else 1
    finally:
        trainer.close()
        shutil.rmtree(work, ignore_errors=True)
        if rank == 0:
            shutil.rmtree(out / "ddp-run", ignore_errors=True)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--device", choices=("cuda", "cpu"), default="cuda")
    p.add_argument("--out", default="benchmarks/results/training", help="folder of the report")
    p.add_argument("--quick", action="store_true", help="3 warm-up + 10 timed steps per configuration")
    p.add_argument("--tiny", action="store_true", help="R18 on 64 px images, 2 steps: that every path runs")
    p.add_argument("--compile-tiny", action="store_true", help="--tiny: also the --compile configuration")
    p.add_argument("--check", choices=("resume", "ddp"), default=None)
    p.add_argument("--only", default=None, help="comma-separated configuration names (e.g. 'icd bf16')")
    p.add_argument(
        "--timeout", type=float, default=None,
        help="seconds per configuration, doubled for the compiled ones (default 300; 90 with --quick)",
    )
    p.add_argument(
        "--budget", type=float, default=None,
        help="seconds for the whole sweep: a configuration that could end past it is not started (reported as skipped)",
    )
    p.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    p.add_argument("--result", default=None, help=argparse.SUPPRESS)
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    opts = parse_args(argv)
    if opts.worker is not None:
        return worker(opts.worker, opts.result)
    if opts.device == "cuda":
        import torch

        if not torch.cuda.is_available():
            print("run_training.py: --device cuda: no CUDA device here; use --device cpu", file=sys.stderr)
            return 2
    if opts.check == "resume":
        return check_resume(opts)
    if opts.check == "ddp":
        return check_ddp(opts)
    return sweep(opts)


if __name__ == "__main__":
    sys.exit(main())
