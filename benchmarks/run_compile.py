"""ICDDistiller eager vs torch.compile, and the dynamic vs the static slot layout, per training step.

One step: a torchvision student (ResNet + FPN, forward and backward) and ICDDistiller's losses
against fixed teacher FPN maps, over a sequence of batches whose box counts vary (each variant
sees the same sequence). Variants:

    eager dynamic     the default: K = the largest instance count of the batch
    eager static      static_shapes=True: K = max_labels slots, fixed shapes
    compiled static   static_shapes=True, torch.compile(distiller, fullgraph=True) (and the
                        student compiled too with --compile-student)
    compiled dynamic  torch.compile(distiller) on the dynamic layout (graph breaks and
                        recompilations as K changes; --with-compiled-dynamic)

Printed per variant: the first pass over the batches (it includes compilation), the median
step time of the following passes, the number of graphs dynamo compiled, and each step time
as a ratio to eager dynamic. The boxes of the static variants are padded by
``icd.nn.pad_instances`` outside the timed step (a data loader's job).

    python benchmarks/run_compile.py                     # CPU, 320x320, max_labels 100
    python benchmarks/run_compile.py --quick             # 128x128, seconds (plus compilation)
    python benchmarks/run_compile.py --distiller-only    # the distiller's share alone
    python benchmarks/run_compile.py --device cuda --input 800x1344 --max-labels 300

Writes ``compile_<device>.csv`` under ``--out``.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from common import OUT_HELP, default_out_dir, machine_info, run_columns, write_csv  # noqa: E402

from icd.nn import ICDDistiller, pad_instances  # noqa: E402


@dataclass
class Batch:
    images: Tensor
    teacher: list[Tensor]
    boxes: list[Tensor]
    labels: list[Tensor]
    padded_boxes: Tensor
    padded_labels: Tensor
    sizes: Tensor
    student: list[Tensor]  # stand-in student FPN maps (leaves) for --distiller-only


def make_student(backbone: str, channels: int) -> torch.nn.Module:
    """torchvision ResNet + FPN of ``channels`` on layers 2-4 (strides 8, 16, 32), random weights."""
    import torchvision
    from torchvision.models.detection.backbone_utils import BackboneWithFPN

    body = getattr(torchvision.models, backbone)(weights=None)
    widths = [body.layer2[-1].conv1.in_channels, body.layer3[-1].conv1.in_channels, body.layer4[-1].conv1.in_channels]
    if backbone not in ("resnet18", "resnet34"):  # bottleneck blocks: 4x expansion
        widths = [body.layer2[-1].conv3.out_channels, body.layer3[-1].conv3.out_channels,
                  body.layer4[-1].conv3.out_channels]
    return BackboneWithFPN(body, {"layer2": "0", "layer3": "1", "layer4": "2"}, widths, channels)


def make_batches(
    count: int, size: tuple[int, int], channels: int, instances: tuple[int, int], max_labels: int,
    num_classes: int, device: torch.device,
) -> list[Batch]:
    """``count`` batches of 2 images: the second one padded on the right and bottom."""
    gen = torch.Generator().manual_seed(0)
    h, w = size
    sizes = torch.tensor([[h, w], [h * 3 // 4, w * 5 // 6]])
    levels = [(-(-h // s), -(-w // s)) for s in (8, 16, 32)]
    batches = []
    for _ in range(count):
        boxes, labels = [], []
        for ih, iw in sizes.tolist():
            n = int(torch.randint(instances[0], instances[1] + 1, (1,), generator=gen))
            xy = torch.rand(n, 2, generator=gen) * torch.tensor([iw * 0.7, ih * 0.7])
            wh = 8 + torch.rand(n, 2, generator=gen) * torch.tensor([iw * 0.3 - 8, ih * 0.3 - 8])
            boxes.append(torch.cat([xy, xy + wh], dim=1).to(device))
            labels.append(torch.randint(0, num_classes, (n,), generator=gen).to(device))
        padded_boxes, padded_labels = pad_instances(boxes, labels, max_labels)
        batches.append(Batch(
            images=torch.randn(2, 3, h, w, generator=gen).to(device),
            teacher=[torch.randn(2, channels, lh, lw, generator=gen).to(device) for lh, lw in levels],
            student=[torch.randn(2, channels, lh, lw, generator=gen).to(device).requires_grad_(True)
                     for lh, lw in levels],
            boxes=boxes, labels=labels, padded_boxes=padded_boxes, padded_labels=padded_labels,
            sizes=sizes.to(device),
        ))
    return batches


def make_step(
    student: torch.nn.Module | None, distiller: ICDDistiller, padded: bool, size: tuple[int, int]
) -> Callable[[Batch], None]:
    """One step; without a student, the batch's stand-in student maps take its place."""

    def step(batch: Batch) -> None:
        distiller.zero_grad(set_to_none=True)
        if student is None:
            features = batch.student
            for f in features:
                f.grad = None
        else:
            student.zero_grad(set_to_none=True)
            features = list(student(batch.images).values())[:3]
        boxes, labels = (batch.padded_boxes, batch.padded_labels) if padded else (batch.boxes, batch.labels)
        losses = distiller(batch.teacher, features, boxes, labels, batch.sizes, size)
        # the student's own losses stand in as a sum of its features
        (sum(losses.values()) + sum(f.mean() for f in features)).backward()

    return step


def run_variant(
    name: str, step: Callable[[Batch], None], batches: Sequence[Batch], passes: int,
    device: torch.device,
) -> dict:
    from torch._dynamo.utils import counters

    counters.clear()
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    start = time.perf_counter()
    for batch in batches:
        step(batch)
    sync()
    first = time.perf_counter() - start
    step_times = []
    for _ in range(passes):
        for batch in batches:
            sync()
            t0 = time.perf_counter()
            step(batch)
            sync()
            step_times.append(time.perf_counter() - t0)
    return {
        "variant": name,
        "first_pass_s": first,
        "step_ms": 1000 * statistics.median(step_times),
        "graphs": counters["stats"]["unique_graphs"],
        "graph_breaks": sum(counters["graph_break"].values()),
    }


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    p.add_argument("--input", default="320x320", help="HxW of the padded batch")
    p.add_argument("--backbone", default="resnet18")
    p.add_argument("--channels", type=int, default=64, help="FPN channels of student and teacher")
    p.add_argument("--heads", type=int, default=8)
    p.add_argument("--max-labels", type=int, default=100)
    p.add_argument("--instances", default="1,12", help="min,max real boxes per image")
    p.add_argument("--batches", type=int, default=20)
    p.add_argument("--passes", type=int, default=2, help="timed passes over the batches")
    p.add_argument("--backend", default="inductor", help="torch.compile backend")
    p.add_argument("--compile-student", action="store_true")
    p.add_argument("--distiller-only", action="store_true", help="random student maps, no student network")
    p.add_argument("--with-compiled-dynamic", action="store_true")
    p.add_argument("--threads", type=int, default=None, help="torch intra-op threads (CPU)")
    p.add_argument("--quick", action="store_true", help="128x128, 8 batches, 1 pass")
    p.add_argument("--out", type=Path, default=default_out_dir(), help=OUT_HELP)
    return p.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    if args.quick:
        args.input, args.batches, args.passes = "128x128", 8, 1
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    size = tuple(int(x) for x in args.input.split("x"))
    instances = tuple(int(x) for x in args.instances.split(","))
    num_classes = 80
    batches = make_batches(
        args.batches, size, args.channels, instances, args.max_labels, num_classes, device
    )

    variants = [("eager dynamic", False, False), ("eager static", True, False), ("compiled static", True, True)]
    if args.with_compiled_dynamic:
        variants.append(("compiled dynamic", False, True))
    rows = []
    for name, static, compiled in variants:
        torch._dynamo.reset()
        torch.manual_seed(0)
        student = None if args.distiller_only else make_student(args.backbone, args.channels).to(device).train()
        distiller = ICDDistiller(
            num_classes, args.channels, args.channels, heads=args.heads, max_labels=args.max_labels,
            warmup_iters=0, static_shapes=static,
        ).to(device).train()
        if compiled:
            distiller = torch.compile(distiller, backend=args.backend, fullgraph=static)
            if args.compile_student and student is not None:
                student = torch.compile(student, backend=args.backend)
        step = make_step(student, distiller, padded=static, size=size)
        rows.append(run_variant(name, step, batches, args.passes, device))
        print(f"  {name}: {rows[-1]}", flush=True)

    base = rows[0]["step_ms"]
    for row in rows:
        row["ratio_to_eager_dynamic"] = row["step_ms"] / base
    what = "distiller only" if args.distiller_only else f"{args.backbone} FPN student"
    print(f"\n{args.device}, {args.input}, {what}, {args.channels} channels, max_labels {args.max_labels}, "
          f"{instances[0]}-{instances[1]} boxes per image, threads {torch.get_num_threads()}, "
          f"compile backend {args.backend}{' (student too)' if args.compile_student else ''}")
    print(f"{'variant':<18}{'first pass s':>14}{'step ms':>10}{'graphs':>8}{'breaks':>8}{'x eager dynamic':>17}")
    for row in rows:
        print(f"{row['variant']:<18}{row['first_pass_s']:>14.1f}{row['step_ms']:>10.1f}{row['graphs']:>8}"
              f"{row['graph_breaks']:>8}{row['ratio_to_eager_dynamic']:>17.2f}")
    static_rows = {row["variant"]: row for row in rows}
    if "compiled static" in static_rows:
        ratio = static_rows["eager static"]["step_ms"] / static_rows["compiled static"]["step_ms"]
        print(f"compiled static is {ratio:.2f}x faster than eager static")
    path = Path(args.out) / f"compile_{args.device}.csv"
    write_csv(path, rows, list(rows[0]), run_columns(machine_info(device), device))
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
