"""Time and peak memory of a whole distillation training step, as ratios to the student alone.

One training step of a torchvision detector (student), measured four ways in one run:

    student          the student's forward + backward on its detection losses
    + fpn-mse        + the frozen teacher's backbone on the same padded batch (no grad)
                       + MSE between (adapted) student and teacher FPN maps
    + icd reference  + the teacher's backbone + icd.nn.ICDDistiller on the plain-PyTorch ops
    + icd <fused>    the same with each fused backend built for the device (the backend
                       table of icd.ops.backends): "cpu" (C++ kernels) on CPU, "cuda" and
                       "triton" on a GPU

The step is what icd.engine.trainer.Trainer does per iteration, less the optimiser steps
(the same for every variant): detector losses, teacher forward, distiller losses, one
backward of their sum. Memory and the first timing come from benchmarks/common.py
``measure()``; the further timed calls are interleaved across the variants (see
``measure_variants``), which a shared CPU needs for the ratios to mean anything.

    python benchmarks/run_distill.py                       # CPU, 512x853, RetinaNet R50 <- R101
    python benchmarks/run_distill.py --device cuda         # GPU, 800x1333
    python benchmarks/run_distill.py --quick               # R18 <- R34 at 320x533, seconds

Writes ``distill_step_<device>-<model>.csv`` and ``.png`` under ``--out``.
"""

from __future__ import annotations

import argparse
import statistics
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from common import (
    OUT_HELP,
    default_out_dir,
    format_table,
    machine_info,
    measure,
    run_columns,
    slug,
    time_once,
    write_csv,
)
from torch import Tensor, nn

COLUMNS = (
    "device", "device_name", "variant", "backend", "detector", "student", "teacher", "input",
    "N", "instances", "K", "S", "median_ms", "min_ms", "max_ms", "repeats", "peak_mb",
    "time_vs_student", "mem_vs_student", "time_vs_icd_ref", "mem_vs_icd_ref", "status",
)  # fmt: skip


@dataclass
class StepSettings:
    """The workload of one run (see ``parse_args`` for the defaults per device)."""

    device: torch.device
    detector: str
    student: str
    teacher: str
    fpn_channels: int
    height: int
    width: int
    instances: tuple[int, ...]  # real boxes per image; image i's width is scaled by 1 - 0.4 i
    num_classes: int
    warmup: int
    repeats: int


def make_batch(cfg: StepSettings) -> tuple[list[Tensor], list[dict]]:
    """N images [3, H, W_i] (image i narrower by 40% i, so the batch is padded) and their boxes.

    Boxes are random inside each image, sides between 4% and 40% of the image, labels
    uniform over the classes; seeded, so every variant sees the same batch.
    """
    gen = torch.Generator().manual_seed(0)
    images, targets = [], []
    for i, n in enumerate(cfg.instances):
        h, w = cfg.height, max(32, round(cfg.width * (1 - 0.4 * i)))
        images.append(torch.rand(3, h, w, generator=gen).to(cfg.device))
        size = torch.tensor([w, h]) * (0.04 + 0.36 * torch.rand(n, 2, generator=gen))
        corner = (torch.tensor([w, h]) - size) * torch.rand(n, 2, generator=gen)
        boxes = torch.cat([corner, corner + size], dim=1)
        labels = torch.randint(cfg.num_classes, (n,), generator=gen)
        targets.append({"boxes": boxes.to(cfg.device), "labels": labels.to(cfg.device)})
    return images, targets


class DistillStep:
    """One training step's forward + backward of a student, optionally distilled from a teacher.

    ``method`` None: the student alone; "fpn-mse" or "icd" (with ``backend``): as the trainer.
    """

    def __init__(self, cfg: StepSettings, method: str | None, backend: str | None = None) -> None:
        from icd.detection.feature_tap import FeatureTap
        from icd.detection.models import DetectorSpec, build_detector
        from icd.engine.distill import build_distiller

        torch.manual_seed(0)
        common = dict(detector=cfg.detector, num_classes=cfg.num_classes,
                      fpn_channels=cfg.fpn_channels, norm="frozen_bn", trainable_layers=3,
                      min_size=(cfg.height,), max_size=max(cfg.width, cfg.height))  # fmt: skip
        self.student = build_detector(DetectorSpec(backbone=cfg.student, **common))
        self.student.to(cfg.device).train()
        self.spec = DetectorSpec(backbone=cfg.student, **common)
        self.method = method
        self.teacher = self.distiller = self.tap = None
        if method is not None:
            self.teacher = build_detector(DetectorSpec(backbone=cfg.teacher, **common))
            self.teacher.to(cfg.device).eval().requires_grad_(False)
            self.distiller = build_distiller(
                method,
                detector=cfg.detector,
                num_classes=cfg.num_classes,
                teacher_channels=cfg.fpn_channels,
                student_channels=cfg.fpn_channels,
                num_levels=len(self.spec.levels),
                loss_weight=None,
                warmup_iters=0,
                backend=backend,
            ).to(cfg.device)
            self.tap = FeatureTap(self.student)
        self.last: dict = {}

    def parameters(self) -> list[nn.Parameter]:
        params = [p for p in self.student.parameters() if p.requires_grad]
        if self.distiller is not None:
            params += [p for p in self.distiller.parameters() if p.requires_grad]
        return params

    def zero_grad(self) -> None:
        for p in self.parameters():
            p.grad = None

    def __call__(self, images: list[Tensor], targets: list[dict]) -> float:
        losses = dict(self.student(images, targets))
        if self.distiller is not None:
            batch = self.tap.batch
            with torch.no_grad():
                teacher_maps = list(self.teacher.backbone(batch.images).values())
            losses.update(
                self.distiller(
                    teacher_maps,
                    batch.features,
                    batch.boxes,
                    batch.labels,
                    batch.image_sizes.to(batch.images.device),
                    batch.padded_size,
                )
            )
            # K and S of this batch, for the table
            n_gt = torch.tensor([len(b) for b in batch.boxes])
            self.last = {"S": sum(f.shape[-2] * f.shape[-1] for f in batch.features)}
            if self.method == "icd":
                from icd.nn import instance_count

                d = self.distiller
                self.last["K"] = max(instance_count(int(n), d.sampler.neg_ratio,
                                                    d.sampler.max_labels) for n in n_gt)  # fmt: skip
            self.tap.clear()
        total = sum(losses.values())
        total.backward()
        return float(total.detach())


def variants(device: torch.device, wanted: Sequence[str] | None) -> list[tuple[str, str | None]]:
    """(method, backend) pairs: the student alone, FPN-MSE, ICD reference, ICD on every other
    backend of the table (``icd.ops.backends``) built for ``device``'s type."""
    import icd.ops
    from icd.ops.backends import native_backends

    built = set(icd.ops.available_backends())
    out: list[tuple[str, str | None]] = [("student", None), ("fpn-mse", None), ("icd", "reference")]
    out += [("icd", b) for b in native_backends(device.type, with_kernels=True) if b in built]
    if wanted:
        out = [v for v in out if _label(*v) in wanted or v[0] in wanted]
    return out


def _label(method: str, backend: str | None) -> str:
    return method if backend is None else f"{method}:{backend}"


def measure_variants(cfg: StepSettings, pairs: Sequence[tuple[str, str | None]]) -> list[dict]:
    """Peak memory and median step time of each (method, backend), the timed calls interleaved.

    Each variant first goes through ``measure()`` once (its warm-up, the profiled call for the
    peak memory, one timed call); then ``cfg.repeats - 1`` rounds time one call of every
    variant in turn (the order rotating), so a change of load on a shared machine hits all
    variants alike instead of whichever was measured at the time.
    """
    images, targets = make_batch(cfg)
    steps: dict[str, DistillStep] = {}
    rows: dict[str, dict] = {}
    times: dict[str, list[float]] = {}
    for method, backend in pairs:
        label = _label(method, backend)
        print(f"  {label} ...", flush=True)
        rows[label] = {"variant": label, "backend": backend or ""}
        try:
            step = DistillStep(cfg, None if method == "student" else method, backend)
            m = measure(lambda s=step: s(images, targets), cfg.device, grad_to_none=step.parameters(),
                        warmup=cfg.warmup, repeats=1)  # fmt: skip
        except Exception as err:  # a broken backend gets an error row; the others still run
            rows[label]["status"] = f"error: {type(err).__name__}: {err}"[:300]
            continue
        steps[label], times[label] = step, list(m.times)
        rows[label].update(peak_mb=m.peak_bytes / 2**20, status="ok", **step.last)
    labels = list(steps)
    for round_ in range(cfg.repeats - 1):
        for label in labels[round_ % len(labels) :] + labels[: round_ % len(labels)]:
            step = steps[label]
            step.zero_grad()
            _, elapsed = time_once(lambda s=step: s(images, targets), cfg.device)
            times[label].append(elapsed)
    for label, step in steps.items():
        step.zero_grad()
        if step.tap is not None:
            step.tap.remove()
        rows[label].update(
            median_ms=1e3 * statistics.median(times[label]),
            min_ms=1e3 * min(times[label]),
            max_ms=1e3 * max(times[label]),
            repeats=len(times[label]),
        )
    return list(rows.values())


def add_ratios(rows: list[dict]) -> None:
    """time/mem of each variant over the student alone and over ICD's reference backend."""
    base = next((r for r in rows if r["variant"] == "student" and r["status"] == "ok"), None)
    ref = next((r for r in rows if r["variant"] == "icd:reference" and r["status"] == "ok"), None)
    for r in rows:
        if r["status"] != "ok":
            continue
        for name, other in (("student", base), ("icd_ref", ref)):
            if other is None or (name == "icd_ref" and not r["variant"].startswith("icd")):
                continue
            r[f"time_vs_{name}"] = r["median_ms"] / other["median_ms"]
            r[f"mem_vs_{name}"] = r["peak_mb"] / max(other["peak_mb"], 1e-9)


def plot(rows: Sequence[dict], path: Path, title: str) -> None:
    """Bars of the median step time and the peak memory per variant, ratios written on them."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ok = [r for r in rows if r["status"] == "ok"]
    if not ok:
        return
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    names = [r["variant"] for r in ok]
    colors = [f"C{i}" for i in range(len(ok))]
    for ax, key, ratio, unit in (
        (axes[0], "median_ms", "time_vs_student", "median step time [ms]"),
        (axes[1], "peak_mb", "mem_vs_student", "peak memory [MB]"),
    ):
        values = [r[key] for r in ok]
        bars = ax.bar(names, values, color=colors)
        for bar, r in zip(bars, ok, strict=True):
            ax.annotate(f"x{r.get(ratio, 1.0):.2f}", (bar.get_x() + bar.get_width() / 2,
                        bar.get_height()), ha="center", va="bottom", fontsize=8)  # fmt: skip
        ax.set_ylabel(unit)
        ax.set_ylim(0, 1.15 * max(values))
        ax.tick_params(axis="x", labelrotation=15)
        ax.grid(axis="y", alpha=0.3)
    fig.suptitle(title + "\n(x: ratio to the student's step alone)", fontsize=9)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    p.add_argument("--quick", action="store_true", help="R18 <- R34 at 320x533, 2 repeats")
    p.add_argument("--detector", default="retinanet", choices=("retinanet", "fcos", "fasterrcnn"))
    p.add_argument("--student", default=None, help="student backbone (default resnet50)")
    p.add_argument("--teacher", default=None, help="teacher backbone (default resnet101)")
    p.add_argument("--fpn-channels", type=int, default=256)
    p.add_argument("--input", default=None, help="HxW (default 512x853 on CPU, 800x1333 on CUDA)")
    p.add_argument("--instances", default="7,12", help="real boxes per image, comma-separated")
    p.add_argument("--num-classes", type=int, default=80)
    p.add_argument(
        "--variants",
        default=None,
        help="subset of student,fpn-mse,icd,icd:reference,icd:cpu,icd:triton,icd:cuda",
    )
    p.add_argument("--warmup", type=int, default=None)
    p.add_argument("--repeats", type=int, default=None)
    p.add_argument("--threads", type=int, default=None, help="torch intra-op threads (CPU)")
    p.add_argument("--out", type=Path, default=default_out_dir(), help=OUT_HELP)
    p.add_argument("--no-plot", action="store_true")
    return p.parse_args(argv)


def make_settings(args: argparse.Namespace) -> StepSettings:
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA device")
    default_input = "320x533" if args.quick else ("800x1333" if device.type == "cuda" else "512x853")
    height, width = (int(v) for v in (args.input or default_input).lower().split("x"))
    on_gpu = device.type == "cuda"
    return StepSettings(
        device=device,
        detector=args.detector,
        student=args.student or ("resnet18" if args.quick else "resnet50"),
        teacher=args.teacher or ("resnet34" if args.quick else "resnet101"),
        fpn_channels=args.fpn_channels,
        height=height,
        width=width,
        instances=tuple(int(v) for v in args.instances.split(",")),
        num_classes=args.num_classes,
        warmup=args.warmup if args.warmup is not None else (3 if on_gpu else 1),
        repeats=args.repeats if args.repeats is not None else (2 if args.quick else (10 if on_gpu else 3)),
    )


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    threads = torch.get_num_threads()
    if args.threads:
        torch.set_num_threads(args.threads)
    try:
        return run(args)
    finally:
        torch.set_num_threads(threads)


def run(args: argparse.Namespace) -> int:
    cfg = make_settings(args)
    info = machine_info(cfg.device)
    print("machine: " + ", ".join(f"{k} {v}" for k, v in info.items()))
    workload = {
        "device": cfg.device.type,
        "device_name": info["gpu"] if cfg.device.type == "cuda" else info["cpu"],
        "detector": cfg.detector,
        "student": cfg.student,
        "teacher": cfg.teacher,
        "input": f"{cfg.height}x{cfg.width}",
        "N": len(cfg.instances),
        "instances": "/".join(str(n) for n in cfg.instances),
    }
    print(
        f"{cfg.detector} {cfg.student} <- {cfg.teacher}, inputs {workload['input']} (N="
        f"{workload['N']}, image i narrower by 40% i), real boxes {workload['instances']}"
    )
    wanted = args.variants.split(",") if args.variants else None
    rows = [{**workload, **row} for row in measure_variants(cfg, variants(cfg.device, wanted))]
    add_ratios(rows)
    table = [
        [r["variant"], str(r.get("K", "")), str(r.get("S", "")),
         f"{r['median_ms']:.0f}" if r["status"] == "ok" else r["status"],
         f"{r['peak_mb']:.0f}" if r["status"] == "ok" else "",
         f"{r['time_vs_student']:.2f}" if "time_vs_student" in r else "",
         f"{r['mem_vs_student']:.2f}" if "mem_vs_student" in r else "",
         f"{r['time_vs_icd_ref']:.2f}" if "time_vs_icd_ref" in r else "",
         f"{r['mem_vs_icd_ref']:.2f}" if "mem_vs_icd_ref" in r else ""]
        for r in rows
    ]  # fmt: skip
    header = ["variant", "K", "S", "median ms", "peak MB", "time/student", "mem/student",
              "time/icd-ref", "mem/icd-ref"]  # fmt: skip
    print(format_table(table, header))
    name = f"distill_step_{cfg.device.type}-{slug(workload['device_name'])}" + ("_quick" if args.quick else "")
    out = Path(args.out)
    write_csv(out / f"{name}.csv", rows, COLUMNS, run_columns(info, cfg.device))
    if not args.no_plot:
        title = (f"training step, {cfg.detector} {cfg.student} <- {cfg.teacher}, "
                 f"{workload['input']} x{workload['N']}, {workload['device_name']}"
                 + (f", {info['torch_threads']} threads" if cfg.device.type == "cpu" else "")
                 + f", commit {info['commit']}")  # fmt: skip
        plot(rows, out / f"{name}.png", title)
    print(f"wrote {out / name}.csv" + ("" if args.no_plot else " and .png"))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
