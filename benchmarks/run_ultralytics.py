"""YOLO n student from a trained YOLO s teacher on the shapes data: baseline, ultralytics'
own distillation (``distill_model=``, ``dis=``) and ICD (``icd.integrations.ultralytics``).

    python -m icd data shapes --out shapes64 --num-train 300 --num-val 100 --image-size 64 --format yolo
    python benchmarks/run_ultralytics.py teacher --data shapes64/yolo/data.yaml --out study
    python benchmarks/run_ultralytics.py student --method baseline --seed 0 --data ... --out study
    python benchmarks/run_ultralytics.py student --method ultralytics --dis 6 --seed 0 ...
    python benchmarks/run_ultralytics.py student --method icd --loss-weight 1 --seed 0 ...
    python benchmarks/run_ultralytics.py summary --out study
    python benchmarks/run_ultralytics.py overhead --device 0 --out gpu_check/ultralytics   # step time on a GPU

Every run appends one JSON line (method, seed, weight, mAP50-95, mAP50, seconds) to
``OUT/results.jsonl``; ``summary`` prints mean +- std per method and weight and paired per-seed
differences. Runs are offline
(YOLO_OFFLINE=1, settings sync=False, plots=False: no font or weight downloads), on CPU unless
``--device`` names a GPU (``0``; then ultralytics' AMP is on).

``overhead`` times the training step (the time between consecutive ``on_train_batch_end``
callbacks, the device synchronised) of a YOLOv8n student for ``--iters`` iterations three ways:
alone, with ultralytics' own distillation from a YOLOv8s (``distill_model=``, ``dis=6``) and
with ICD from the same teacher; models are random-initialised from their yaml (no downloads),
the data is generated (the shapes set). It writes ``OUT/ultralytics.md`` and prints
``OVERHEAD icd/ultralytics <ratio>``: ICD's median step over ultralytics' distillation's.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

os.environ.setdefault("YOLO_OFFLINE", "1")


def _common(args: argparse.Namespace, seed: int) -> dict:
    return dict(
        data=args.data,
        imgsz=args.imgsz,
        batch=args.batch,
        workers=0,
        device=args.device,
        plots=False,
        amp=args.device != "cpu",
        val=False,  # validate once, after the last epoch
        nbs=args.nbs,
        seed=seed,
        deterministic=True,
        project=os.path.abspath(args.out),
        exist_ok=True,
        verbose=False,
    )


def _record(args: argparse.Namespace, row: dict) -> None:
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "results.jsonl"), "a", encoding="utf-8") as f:
        f.write(json.dumps(row) + "\n")
    print(json.dumps(row), flush=True)


def train_teacher(args: argparse.Namespace) -> None:
    from ultralytics import YOLO
    from ultralytics.utils import SETTINGS

    SETTINGS.update(sync=False)
    start = time.time()
    kwargs = {**_common(args, 0), "nbs": 64}
    metrics = YOLO(args.teacher_cfg).train(epochs=args.teacher_epochs, name="teacher", **kwargs)
    _record(args, dict(method="teacher", seed=0, weight=None, map=metrics.box.map, map50=metrics.box.map50,
                       seconds=round(time.time() - start, 1)))


def train_student(args: argparse.Namespace) -> None:
    from ultralytics import YOLO
    from ultralytics.utils import SETTINGS

    SETTINGS.update(sync=False)
    teacher = os.path.join(os.path.abspath(args.out), "teacher", "weights", "best.pt")
    name = f"{args.method}_w{args.weight}_s{args.seed}"
    kwargs = dict(epochs=args.epochs, name=name, **_common(args, args.seed))
    start = time.time()
    model = YOLO(args.student_cfg)
    if args.method == "baseline":
        metrics = model.train(**kwargs)
    elif args.method == "ultralytics":
        metrics = model.train(distill_model=teacher, dis=args.weight, **kwargs)
    elif args.method == "icd":
        from icd.integrations.ultralytics import ICDTrainer

        trainer = ICDTrainer.configure(
            teacher=teacher, loss_weight=args.weight, warmup_iters=args.icd_warmup, icd_lr=args.icd_lr
        )
        metrics = model.train(trainer=trainer, **kwargs)
    else:
        raise SystemExit(f"--method {args.method!r}; expected baseline, ultralytics or icd")
    seconds = round(time.time() - start, 1)
    unpadded = _validate_unpadded(args, str(model.trainer.best))
    _record(args, dict(method=args.method, seed=args.seed, weight=args.weight, map=metrics.box.map,
                       map50=metrics.box.map50, map_unpadded=unpadded.box.map, map50_unpadded=unpadded.box.map50,
                       seconds=seconds))


def _validate_unpadded(args: argparse.Namespace, weights: str):
    """best.pt validated at the training size without ultralytics' rectangular batches: those pad
    every side by half a stride (a 64 px image becomes a 96 px input with a grey border), a
    different input than training saw, which one seed's student reacted to with a burst of false
    positives (mAP 1.2 padded, 7.2 unpadded)."""
    from ultralytics import YOLO

    return YOLO(weights).val(data=args.data, imgsz=args.imgsz, batch=args.batch, device=args.device, plots=False,
                             workers=0, rect=False, verbose=False)


def revalidate(args: argparse.Namespace) -> None:
    """Add the unpadded mAP (``_validate_unpadded``) to every student line of OUT/results.jsonl
    that lacks it, from the run's ``weights/best.pt`` (runs recorded before it was measured)."""
    path = os.path.join(args.out, "results.jsonl")
    rows = [json.loads(line) for line in open(path, encoding="utf-8")]
    for row in rows:
        if row["method"] == "teacher" or "map_unpadded" in row:
            continue
        weights = os.path.join(args.out, f"{row['method']}_w{row['weight']}_s{row['seed']}", "weights", "best.pt")
        metrics = _validate_unpadded(args, weights)
        row.update(map_unpadded=metrics.box.map, map50_unpadded=metrics.box.map50)
    with open(path + ".tmp", "w", encoding="utf-8") as f:
        f.writelines(json.dumps(row) + "\n" for row in rows)
    os.replace(path + ".tmp", path)


def _label(method: str, weight: float | None) -> str:
    return method if weight is None else f"{method} {weight:g}"


def _mean_std(values: list[float]) -> str:
    """'mean +- sample std' (std 0 for one value), two decimals."""
    std = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{statistics.mean(values):.2f} +- {std:.2f}"


def summary(args: argparse.Namespace) -> None:
    """Mean +- sample std per method and weight, the mAP of each seed, and the paired (same-seed)
    differences of every distilled run to the baseline and to ultralytics' distillation at
    its default ``dis=6``: runs of one seed share the student's initialisation and data order."""
    rows = [json.loads(line) for line in open(os.path.join(args.out, "results.jsonl"), encoding="utf-8")]
    groups: dict[tuple, dict[int, dict]] = {}
    for row in rows:  # a later run of the same method, weight and seed replaces an earlier one
        groups.setdefault((row["method"], row["weight"]), {})[row["seed"]] = row
    print("| run | seeds | mAP50-95 (%) | mAP50 (%) | mAP50-95 per seed | unpadded mAP50-95 (%) | s/run |")
    print("|---|---|---|---|---|---|---|")
    for (method, weight), seeded in groups.items():
        runs = [seeded[s] for s in sorted(seeded)]
        per_seed = ", ".join(f"s{r['seed']}: {100 * r['map']:.2f}" for r in runs)
        unpadded = [100 * r["map_unpadded"] for r in runs if "map_unpadded" in r]
        unpadded_text = _mean_std(unpadded) if len(unpadded) == len(runs) else "-"
        print(
            f"| {_label(method, weight)} | {len(runs)} | {_mean_std([100 * r['map'] for r in runs])} | "
            f"{_mean_std([100 * r['map50'] for r in runs])} | {per_seed} | {unpadded_text} | "
            f"{statistics.mean(r['seconds'] for r in runs):.0f} |"
        )
    print("\n| run | control | mAP50-95 validated | paired difference | per seed |")
    print("|---|---|---|---|---|")
    controls = (("baseline", None), ("ultralytics", 6.0))
    for metric in ("map", "map_unpadded"):
        for control in controls:
            theirs = {s: r for s, r in groups.get(control, {}).items() if metric in r}
            for key, seeded in groups.items():
                shared = sorted(s for s in set(seeded) & set(theirs) if metric in seeded[s])
                if key[0] in ("teacher", "baseline") or key == control or len(shared) < 2:
                    continue
                diffs = [100 * (seeded[s][metric] - theirs[s][metric]) for s in shared]
                per_seed = ", ".join(f"s{s}: {d:+.2f}" for s, d in zip(shared, diffs, strict=True))
                how = "unpadded" if metric == "map_unpadded" else "padded (ultralytics' val)"
                print(
                    f"| {_label(*key)} | {_label(*control)} | {how} | "
                    f"{statistics.mean(diffs):+.2f} +- {statistics.stdev(diffs):.2f} | {per_seed} |"
                )


def _step_timer(model, device: str) -> list[float]:
    """Per-iteration seconds of ``model``'s next training run (between batch-end callbacks)."""
    import torch

    marks: list[float] = []

    def on_train_batch_end(trainer) -> None:
        if device != "cpu":
            torch.cuda.synchronize()
        marks.append(time.perf_counter())
        if not all(bool(torch.isfinite(v).all()) for v in _loss_values(trainer)):
            raise FloatingPointError(f"non-finite training loss at iteration {len(marks)}: {trainer.loss_items}")

    model.add_callback("on_train_batch_end", on_train_batch_end)
    return marks


def _loss_values(trainer) -> list:
    items = trainer.loss_items
    return list(items.values()) if isinstance(items, dict) else [items]


def overhead(args: argparse.Namespace) -> None:
    """Median step time of the student alone, with ultralytics' distillation and with ICD."""
    import statistics as stats

    import ultralytics.engine.trainer as base_trainer
    from ultralytics import YOLO
    from ultralytics.utils import SETTINGS

    from icd.data.shapes import generate
    from icd.data.yolo import export_yolo
    from icd.integrations.ultralytics import ICDTrainer

    SETTINGS.update(sync=False)
    # ultralytics' AMP self-check loads a downloaded yolo26n.pt; offline, AMP is used as configured
    base_trainer.check_amp = lambda model: True
    out = os.path.abspath(args.out)
    os.makedirs(out, exist_ok=True)
    images = args.iters * args.batch  # one epoch of --iters iterations
    data_dir = os.path.join(out, "data")
    paths = generate(os.path.join(data_dir, "shapes"), num_train=images, num_val=args.batch, image_size=args.imgsz,
                     seed=0, overwrite=True)  # fmt: skip
    image_dirs = {s: os.path.join(data_dir, "shapes", s) for s in paths}
    args.data = export_yolo(paths, image_dirs, os.path.join(data_dir, "yolo"))
    teacher = os.path.join(out, "teacher.pt")
    _random_teacher(args.teacher_cfg, args.data, teacher)
    runs = {
        "student alone": {},
        "ultralytics distillation (dis=6)": {"distill_model": teacher, "dis": 6.0},
        "ICD": {"trainer": ICDTrainer.configure(teacher, warmup_iters=0)},
    }
    rows = []
    for name, extra in runs.items():
        model = YOLO(args.student_cfg)
        marks = _step_timer(model, args.device)
        start = time.time()
        error = ""
        try:
            # deterministic algorithms only on CPU: on a GPU they would time slower kernels than training uses
            kwargs = {**_common(args, 0), "deterministic": args.device == "cpu", **extra}
            model.train(epochs=1, name=name.split()[0], **kwargs)
        except Exception as exc:  # recorded; the next method runs
            error = f"{type(exc).__name__}: {' '.join(str(exc).split())[:160]}"
        steps = [b - a for a, b in zip(marks, marks[1:], strict=False)][args.warmup :]
        median = stats.median(steps) * 1e3 if steps else float("nan")
        rows.append((name, len(marks), median, time.time() - start, error))
        print(f"{name}: {len(marks)} iterations, median step {median:.1f} ms {error}", flush=True)
        _write_overhead(out, args, rows)
    times = {r[0]: r[2] for r in rows if not r[4]}
    base = times.get("ultralytics distillation (dis=6)")
    icd_ms = times.get("ICD")
    if base and icd_ms:
        print(f"OVERHEAD icd/ultralytics {icd_ms / base:.2f} (ICD {icd_ms:.1f} ms, ultralytics distillation "
              f"{base:.1f} ms per step)")  # fmt: skip
    if any(r[4] for r in rows):
        raise SystemExit("overhead: a run failed (see ultralytics.md)")


def _random_teacher(cfg: str, data_yaml: str, path: str) -> None:
    """A random-initialised detector of ``cfg`` with the dataset's classes, saved as ultralytics
    saves a model (the step time does not depend on what the teacher learned)."""
    import yaml
    from ultralytics import YOLO
    from ultralytics.nn.tasks import DetectionModel

    with open(data_yaml, encoding="utf-8") as f:
        names = yaml.safe_load(f)["names"]
    names = dict(enumerate(names)) if isinstance(names, list) else names
    model = YOLO(cfg)
    model.model = DetectionModel(cfg, nc=len(names), verbose=False)
    model.model.names = names
    model.save(path)


def _write_overhead(out: str, args: argparse.Namespace, rows: list[tuple]) -> None:
    alone = next((r[2] for r in rows if r[0] == "student alone" and not r[4]), None)
    lines = [f"YOLOv8n student, YOLOv8s teacher (random init), {args.imgsz} px, batch {args.batch}, device "
             f"{args.device}, AMP {'on' if args.device != 'cpu' else 'off'}; median step after {args.warmup} "
             "warm-up iterations.", "", "| run | iterations | median step ms | vs student alone | seconds | error |",
             "| --- | ---: | ---: | ---: | ---: | --- |"]  # fmt: skip
    for name, count, median, seconds, error in rows:
        ratio = f"{median / alone:.2f}" if alone and not error else ""
        lines.append(f"| {name} | {count} | {median:.1f} | {ratio} | {seconds:.0f} | {error} |")
    tmp = os.path.join(out, ".ultralytics.md.tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        f.write("\n".join(lines) + "\n")
    os.replace(tmp, os.path.join(out, "ultralytics.md"))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("command", choices=("teacher", "student", "summary", "revalidate", "overhead"))
    p.add_argument("--data", default="shapes64/yolo/data.yaml")
    p.add_argument("--out", default="ultralytics_study")
    p.add_argument("--imgsz", type=int, default=64)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--teacher-cfg", default="yolov8s.yaml")
    p.add_argument("--teacher-epochs", type=int, default=30)
    p.add_argument("--student-cfg", default="yolov8n.yaml")
    p.add_argument("--epochs", type=int, default=15)
    p.add_argument("--method", default="baseline")
    p.add_argument("--weight", type=float, default=None, help="dis= for ultralytics, loss_weight for icd")
    p.add_argument("--icd-warmup", type=int, default=20, help="ICD warm-up (optimiser steps)")
    p.add_argument("--icd-lr", type=float, default=1e-3, help="teacher-side AdamW lr (short schedules)")
    p.add_argument("--nbs", type=int, default=64, help="ultralytics' nominal batch (accumulation)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="cpu", help="cpu, or a CUDA device index such as 0 (AMP on)")
    p.add_argument("--iters", type=int, default=100, help="overhead: training iterations per run")
    p.add_argument("--warmup", type=int, default=10, help="overhead: iterations left out of the median")
    args = p.parse_args(argv)
    commands = {"teacher": train_teacher, "student": train_student, "summary": summary, "revalidate": revalidate,
                "overhead": overhead}  # fmt: skip
    commands[args.command](args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
