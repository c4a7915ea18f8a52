"""``icd demo``: teacher -> student with ICD on the synthetic shapes data, end to end on a CPU.

What it does, under ``--out`` (``demo_output/``)::

    data/                       icd data shapes (seeded; kept when the same settings exist)
    teacher/  baseline/         icd train runs: the big teacher and the small student alone
    icd_pretrain/               ICD's teacher side pre-trained on the finished teacher (icd pretrain)
    icd/      fpn_mse/          the small student distilled from the teacher (ICD, FPN-MSE peer)
    results.md                  AP, AP50, AP75, lift, distinctness and training time, as markdown
    curves.png                  loss and AP curves of the four runs (``icd plot``)
    attention_maps.png          ICD attention of each real instance over the FPN levels

Every run is a separate ``python -m icd`` process. Everything else waits for the teacher, so
it runs alone with the threads of every job slot (``--jobs`` x ``--threads``, OpenMP threads
waiting passively rather than spinning); then the runs take one slot and one thread each: the
teacher-side pre-training beside the FPN-MSE student, the ICD student once the pre-training
is done, the baseline last. A finished teacher with the same settings is reused. The parent
process shows one progress bar per run, fed by the runs' ``metrics.jsonl``.
"""

from __future__ import annotations

import argparse
import glob
import json
import math
import os
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import IO

import torch
from tqdm import tqdm

RUN_NAMES = ("teacher", "baseline", "fpn_mse", "icd")  # the runs of the results table
PRETRAIN_RUN = "icd_pretrain"  # ICD's teacher side on the finished teacher, before the icd run
PRETRAIN_ITERS = 600  # --pretrain-iters without a value
STAMP_FILE = "demo_run.json"  # per run dir: the settings and wall time of a finished run
POLL_S = 0.5


@dataclass
class DemoConfig:
    """Everything the demo's result depends on (a reused run must match its part of it)."""

    out_dir: str = "demo_output"
    seed: int = 0
    student_seed: int | None = None  # None: ``seed``; another value varies only the students
    image_size: int = 96
    num_train: int = 800
    num_val: int = 200
    # Less clutter than `icd data shapes` (2-8 shapes, 6 strokes, noise 12): what a detector
    # learns in a few CPU minutes from scratch is then more than noise.
    max_shapes: int = 4
    num_strokes: int = 2
    noise_std: float = 8.0
    detector: str = "fcos"
    teacher_backbone: str = "resnet34"
    teacher_channels: int = 128
    student_backbone: str = "resnet18"
    student_channels: int = 64
    batch_size: int = 8
    lr: float = 0.02
    teacher_epochs: int = 4  # its AP at least 1.5x the baseline student's (results/README.md)
    student_epochs: int = 2
    distill_warmup_iters: int | None = None
    icd_weight: float | None = None
    fpn_mse_weight: float | None = None
    # ICD's teacher side pre-trained on the finished teacher before the ICD student starts
    # (`icd pretrain`, then `icd train --icd-init`); 0 (the default, what measured best in AP,
    # results/README.md): the paper's recipe, no pre-training
    pretrain_iters: int = 0
    jobs: int = 2
    threads: int = 1
    attention_images: int = 4
    extra_train_flags: list[str] = field(default_factory=list)

    @property
    def data_dir(self) -> str:
        return os.path.join(self.out_dir, "data")

    def run_dir(self, name: str) -> str:
        return os.path.join(self.out_dir, name)

    def data_settings(self) -> dict:
        keys = ("seed", "image_size", "num_train", "num_val", "max_shapes", "num_strokes", "noise_std")
        return {k: getattr(self, k) for k in keys}


TINY = {  # seconds-long settings for the smoke test (`--tiny`)
    "image_size": 64,
    "num_train": 8,
    "num_val": 4,
    "teacher_backbone": "resnet18",
    "teacher_channels": 64,
    "student_channels": 32,
    "batch_size": 4,
    "teacher_epochs": 1,
    "student_epochs": 1,
    "pretrain_iters": 4,
    "attention_images": 2,
}


# --- the runs ------------------------------------------------------------------------------


@dataclass
class Run:
    """One ``icd train`` process of the demo."""

    name: str
    title: str
    argv: list[str]
    total_iters: int
    needs: tuple[str, ...] = ()
    exclusive: bool = False  # runs alone, with every job slot's threads
    process: subprocess.Popen | None = None
    log_file: IO[str] | None = None
    started: float = 0.0
    seconds: float = 0.0
    reused: bool = False

    def stamp(self, cfg: DemoConfig) -> dict:
        """What a reused run must match: its arguments (paths relative to ``cfg.out_dir``)."""
        argv = [a.replace(cfg.out_dir, "{out}", 1) if a.startswith(cfg.out_dir) else a
                for a in self.argv]  # fmt: skip
        return {"argv": argv, "data": cfg.data_settings()}


def train_argv(cfg: DemoConfig, name: str) -> list[str]:
    """The ``icd train`` arguments of one run (``--output-dir`` included)."""
    teacher = name == "teacher"
    epochs = cfg.teacher_epochs if teacher else cfg.student_epochs
    argv = [
        "train",
        "--data-path", cfg.data_dir,
        "--output-dir", cfg.run_dir(name),
        "--detector", cfg.detector,
        "--backbone", cfg.teacher_backbone if teacher else cfg.student_backbone,
        "--fpn-channels", str(cfg.teacher_channels if teacher else cfg.student_channels),
        "--min-size", str(cfg.image_size),
        "--max-size", str(cfg.image_size),
        "--batch-size", str(cfg.batch_size),
        "--lr", str(cfg.lr),
        "--epochs", str(epochs),
        "--eval-every", "1",
        "--seed", str(cfg.seed if teacher or cfg.student_seed is None else cfg.student_seed),
        "--workers", "0",
        "--device", "cpu",
        "--print-freq", "5",
        "--epoch-checkpoint-every", "0",
        "--no-progress",
    ]  # fmt: skip
    if name in ("icd", "fpn_mse"):
        argv += ["--teacher", os.path.join(cfg.run_dir("teacher"), "checkpoint.pth")]
        argv += ["--distill", "icd" if name == "icd" else "fpn-mse"]
        weight = cfg.icd_weight if name == "icd" else cfg.fpn_mse_weight
        if weight is not None:
            argv += ["--distill-weight", str(weight)]
        if name == "icd" and cfg.distill_warmup_iters is not None:
            argv += ["--distill-warmup-iters", str(cfg.distill_warmup_iters)]
        if name == "icd" and cfg.pretrain_iters:
            argv += ["--icd-init", os.path.join(cfg.run_dir(PRETRAIN_RUN), "teacher_side.pth")]
    return argv + list(cfg.extra_train_flags)


def pretrain_argv(cfg: DemoConfig) -> list[str]:
    """The ``icd pretrain`` arguments of the teacher-side pre-training run."""
    return [
        "pretrain",
        "--data-path", cfg.data_dir,
        "--output-dir", cfg.run_dir(PRETRAIN_RUN),
        "--teacher", os.path.join(cfg.run_dir("teacher"), "checkpoint.pth"),
        "--min-size", str(cfg.image_size),
        "--max-size", str(cfg.image_size),
        "--batch-size", str(cfg.batch_size),
        "--iters", str(cfg.pretrain_iters),
        "--eval-every", str(max(1, cfg.pretrain_iters // 6)),
        "--seed", str(cfg.seed if cfg.student_seed is None else cfg.student_seed),
        "--workers", "0",
        "--device", "cpu",
        "--print-freq", "5",
        "--no-progress",
    ]  # fmt: skip


def plan_runs(cfg: DemoConfig) -> list[Run]:
    iters_per_epoch = math.ceil(cfg.num_train / cfg.batch_size)
    titles = {
        "teacher": f"teacher {cfg.teacher_backbone}",
        "baseline": f"student {cfg.student_backbone}",
        "fpn_mse": f"{cfg.student_backbone} + FPN-MSE",
        "icd": f"{cfg.student_backbone} + ICD",
    }
    runs = {}
    for name in RUN_NAMES:
        epochs = cfg.teacher_epochs if name == "teacher" else cfg.student_epochs
        needs = ("teacher",) if name in ("icd", "fpn_mse") else ()
        if name == "icd" and cfg.pretrain_iters:
            needs += (PRETRAIN_RUN,)
        runs[name] = Run(name, titles[name], train_argv(cfg, name), epochs * iters_per_epoch, needs,
                         exclusive=name == "teacher")  # fmt: skip
    if cfg.pretrain_iters:
        runs[PRETRAIN_RUN] = Run(PRETRAIN_RUN, "ICD teacher side", pretrain_argv(cfg), cfg.pretrain_iters,
                                 ("teacher",))  # fmt: skip
    # the order runs start in: everything waits for the teacher, which has the whole CPU; then the
    # pre-training beside FPN-MSE, ICD once the pre-training is done, the baseline last (it needs
    # nothing, so it fills the slot the others leave)
    order = ["teacher", PRETRAIN_RUN, "fpn_mse", "icd", "baseline"]
    return [runs[name] for name in order if name in runs]


def finished_stamp(run_dir: str) -> dict | None:
    path = os.path.join(run_dir, STAMP_FILE)
    if not os.path.exists(path) or not os.path.exists(os.path.join(run_dir, "checkpoint.pth")):
        return None
    with open(path) as f:
        return json.load(f)


def _iterations_done(run_dir: str) -> int:
    """The last logged training iteration of a run (0 before its first metrics line)."""
    path = os.path.join(run_dir, "metrics.jsonl")
    if not os.path.exists(path):
        return 0
    done = 0
    with open(path) as f:
        for line in f:
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                continue
            if record.get("type") in ("train", "pretrain"):
                done = max(done, int(record["iter"]))
    return done


def _start(run: Run, cfg: DemoConfig) -> None:
    run_dir = cfg.run_dir(run.name)
    os.makedirs(run_dir, exist_ok=True)
    # a fresh run, not a resume: nothing of an earlier run may stay (icd train refuses to start on it)
    epoch_files = [os.path.basename(p) for p in glob.glob(os.path.join(glob.escape(run_dir), "model_*.pth"))]
    for stale in ["metrics.jsonl", STAMP_FILE, "checkpoint.pth", *epoch_files]:
        path = os.path.join(run_dir, stale)
        if os.path.exists(path):
            os.remove(path)
    threads = str(cfg.threads * (cfg.jobs if run.exclusive else 1))
    env = {**os.environ, "OMP_NUM_THREADS": threads, "MKL_NUM_THREADS": threads, "OMP_WAIT_POLICY": "PASSIVE"}
    run.log_file = open(os.path.join(run_dir, "train.log"), "w")  # noqa: SIM115 - closed in _finish
    run.process = subprocess.Popen(
        [sys.executable, "-m", "icd", *run.argv], stdout=run.log_file, stderr=subprocess.STDOUT, env=env
    )
    run.started = time.time()


def _finish(run: Run, cfg: DemoConfig) -> None:
    run.log_file.close()
    run.seconds = time.time() - run.started
    if run.process.returncode != 0:
        log_path = os.path.join(cfg.run_dir(run.name), "train.log")
        with open(log_path) as f:
            tail = "".join(f.readlines()[-20:])
        raise RuntimeError(f"demo run {run.name!r} failed (exit {run.process.returncode}); "
                           f"end of {log_path}:\n{tail}")
    with open(os.path.join(cfg.run_dir(run.name), STAMP_FILE), "w") as f:
        json.dump({**run.stamp(cfg), "seconds": run.seconds}, f, indent=1)


def execute(runs: Sequence[Run], cfg: DemoConfig, progress: bool = True) -> None:
    """Run the plan, ``cfg.jobs`` processes at a time, a run once the runs it needs are done."""
    done = {r.name for r in runs if r.reused}
    pending = [r for r in runs if not r.reused]
    active: list[Run] = []
    bars = {
        r.name: tqdm(
            total=r.total_iters,
            desc=f"{r.title:<22}",
            position=i,
            disable=not progress,
            dynamic_ncols=True,
            unit="it",
        )
        for i, r in enumerate(runs)
    }
    for r in runs:
        if r.reused:
            bars[r.name].update(r.total_iters)
            bars[r.name].set_postfix_str("reused")
    try:
        while pending or active:
            for run in [r for r in pending if set(r.needs) <= done]:
                busy = cfg.jobs if any(r.exclusive for r in active) else len(active)
                if busy + (cfg.jobs if run.exclusive else 1) > cfg.jobs:
                    break
                _start(run, cfg)
                pending.remove(run)
                active.append(run)
            time.sleep(POLL_S)
            for run in list(active):
                bar = bars[run.name]
                bar.update(_iterations_done(cfg.run_dir(run.name)) - bar.n)
                if run.process.poll() is None:
                    continue
                active.remove(run)
                _finish(run, cfg)
                bar.update(run.total_iters - bar.n)
                bar.set_postfix_str(f"{run.seconds:.0f} s")
                done.add(run.name)
            if pending and not active and not any(set(r.needs) <= done for r in pending):
                raise RuntimeError(f"demo: runs {[r.name for r in pending]} cannot start")
    finally:
        for run in active:  # an error or Ctrl-C: do not leave training processes behind
            run.process.kill()
            run.process.wait()
            run.log_file.close()
        for bar in bars.values():
            bar.close()


# --- results -------------------------------------------------------------------------------


def last_eval(run_dir: str) -> dict[str, float]:
    from icd.engine.metrics import read_metrics

    evals = [r for r in read_metrics(run_dir) if r.get("type") == "eval"]
    if not evals:
        raise RuntimeError(f"{run_dir}/metrics.jsonl has no evaluation")
    return max(evals, key=lambda r: r["iter"])


def results_table(runs: Sequence[Run], cfg: DemoConfig) -> tuple[list[dict], str]:
    """One row per run (AP, AP50, AP75 in %, training minutes) and the markdown table."""
    rows = []
    by_name = {run.name: run for run in runs}
    for run in (by_name[name] for name in RUN_NAMES if name in by_name):
        metrics = last_eval(cfg.run_dir(run.name))
        rows.append(
            {
                "run": run.name,
                "model": run.title,
                "AP": metrics["AP"],
                "AP50": metrics["AP50"],
                "AP75": metrics["AP75"],
                "lift": metrics.get("lift"),
                "distinctness": metrics.get("distinctness"),
                "iters": run.total_iters,
                "seconds": run.seconds,
                "reused": run.reused,
            }
        )
    lines = [
        "| run | model | AP | AP50 | AP75 | lift | distinctness | iterations | train + eval time |",
        "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for r in rows:
        when = f"{r['seconds']:.0f} s" + (" (reused)" if r["reused"] else "")
        lift = "" if r["lift"] is None else f"{r['lift']:.2f}"
        distinct = "" if r["distinctness"] is None else f"{r['distinctness']:.2f}"
        lines.append(
            f"| {r['run']} | {r['model']} | {r['AP']:.1f} | {r['AP50']:.1f} | {r['AP75']:.1f} | "
            f"{lift} | {distinct} | {r['iters']} | {when} |"
        )
    return rows, "\n".join(lines) + "\n"


def summarize(out_dirs: Sequence[str]) -> str:
    """Mean and spread of AP, AP50, AP75 of each run over several demo outputs (seeds), markdown.

    Spread: the sample standard deviation over the outputs, and (min, max). Also the per-output
    AP of each run, so a reader sees every number behind the mean.
    """
    import statistics

    per_run: dict[str, list[dict]] = {}
    for out in out_dirs:
        for name in RUN_NAMES:
            per_run.setdefault(name, []).append(last_eval(os.path.join(out, name)))
    lines = [
        f"| run | AP mean ± std (min-max) | AP50 mean ± std | AP75 mean ± std | AP per output ({len(out_dirs)}) |",
        "| --- | --- | --- | --- | --- |",
    ]
    for name, evals in per_run.items():
        cells = []
        for key in ("AP", "AP50", "AP75"):
            values = [e[key] for e in evals]
            std = statistics.stdev(values) if len(values) > 1 else 0.0
            cell = f"{statistics.fmean(values):.2f} ± {std:.2f}"
            if key == "AP":
                cell += f" ({min(values):.2f}-{max(values):.2f})"
            cells.append(cell)
        each = ", ".join(f"{e['AP']:.2f}" for e in evals)
        lines.append(f"| {name} | {' | '.join(cells)} | {each} |")
    return "\n".join(lines) + "\n"


# --- attention maps ------------------------------------------------------------------------


@torch.no_grad()
def attention_maps_figure(
    teacher_path: str, source: str | None, data_dir: str, out_path: str, num_images: int, title: str = ""
) -> str:
    """Validation images with each real instance's box and its ICD attention, as one PNG.

    One row per image, one panel per instance (at most 4): the image, the instance's box, and
    the attention of an ICD teacher side over the frozen teacher's FPN maps as a heat map.
    ``source`` is an ``icd train --distill icd`` checkpoint or ``icd pretrain``'s
    teacher_side.pth; None shows the untrained (freshly initialised) teacher side. Each
    level's [H_l, W_l] map is spread over its cells (mass / cell area) and the levels are
    summed, so the heat map is a density over the image; the panel title gives the share of
    the attention on each level.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.patches import Rectangle

    from icd.data.coco import CocoDetection, split_paths
    from icd.engine.checkpoint import load_checkpoint
    from icd.engine.run_spec import distiller_of_run, load_detector
    from icd.ops import unflatten_levels

    image_dir, ann = split_paths(data_dir, "val")
    dataset = CocoDetection(image_dir, ann)
    teacher, teacher_spec = load_detector(teacher_path, dataset.num_classes, what="teacher")
    teacher.eval()
    blob = load_checkpoint(source) if source else {}
    distiller = distiller_of_run(blob.get("args", {}), teacher_spec, dataset.num_classes)
    if source:
        state = blob.get("distiller", blob.get("teacher_side"))
        distiller.load_state_dict(state, strict="distiller" in blob)
    distiller.eval()

    # the images with the most instances show the most; ties by index keep it deterministic
    counts = [(-len(dataset[i][1]["boxes"]), i) for i in range(len(dataset))]
    chosen = [i for _, i in sorted(counts)[:num_images]]
    max_cols = 4
    fig, axes = plt.subplots(
        len(chosen), max_cols, figsize=(3.2 * max_cols, 3.4 * len(chosen)), squeeze=False
    )
    level_names = [f"P{lvl}" for lvl in teacher_spec.levels]
    for row, index in enumerate(chosen):
        image, target = dataset[index]
        image_list, _ = teacher.transform([image])
        features = list(teacher.backbone(image_list.tensors).values())
        resized_h, resized_w = image_list.image_sizes[0]
        height, width = image.shape[-2:]
        scale = torch.tensor([resized_w / width, resized_h / height] * 2)
        boxes = target["boxes"] * scale
        labels = target["labels"]
        maps, shapes = distiller.instance_attention_maps(
            features,
            [boxes],
            [labels],
            torch.tensor([[resized_h, resized_w]]),
            tuple(image_list.tensors.shape[-2:]),
        )
        per_level = unflatten_levels(maps[0], shapes)  # L x [n, H_l, W_l]
        padded = image_list.tensors.shape[-2:]
        shown = image.permute(1, 2, 0).numpy()
        for col in range(max_cols):
            ax = axes[row, col]
            ax.axis("off")
            if col >= len(boxes):
                continue
            density = torch.zeros(padded)
            shares = []
            for level_map in per_level:
                cell = level_map[col]
                shares.append(float(cell.sum()))
                h_l, w_l = cell.shape
                area = (padded[0] / h_l) * (padded[1] / w_l)
                density += torch.nn.functional.interpolate(
                    cell[None, None] / area, size=tuple(padded), mode="nearest"
                )[0, 0]
            density = density[:resized_h, :resized_w]
            ax.imshow(shown, extent=(0, width, height, 0))
            ax.imshow(
                density.numpy(), cmap="inferno", alpha=0.6, extent=(0, width, height, 0),
                interpolation="bilinear",
            )  # fmt: skip
            x1, y1, x2, y2 = target["boxes"][col].tolist()
            ax.add_patch(
                Rectangle((x1, y1), x2 - x1, y2 - y1, fill=False, edgecolor="cyan", linewidth=1.5)
            )
            name = dataset.category_names[int(labels[col])]
            levels = " ".join(f"{n} {s:.0%}" for n, s in zip(level_names, shares, strict=True))
            ax.set_title(f"val {index}: {name}\n{levels}", fontsize=7)
    fig.suptitle(
        (title or "ICD instance attention") + " over the frozen teacher's FPN levels; cyan: the instance's box",
        fontsize=9,
    )
    fig.tight_layout()
    fig.savefig(out_path, dpi=72)
    plt.close(fig)
    return out_path


# --- the whole demo ------------------------------------------------------------------------


def prepare_data(cfg: DemoConfig) -> bool:
    """Generate the shapes data unless the same settings are already there; True if generated."""
    from icd.data.shapes import ShapesConfig, write_split

    stamp = os.path.join(cfg.data_dir, STAMP_FILE)
    if os.path.exists(stamp):
        with open(stamp) as f:
            if json.load(f) == cfg.data_settings():
                return False
    shapes = ShapesConfig(image_size=cfg.image_size, min_shapes=1, max_shapes=cfg.max_shapes,
                          num_strokes=cfg.num_strokes, noise_std=cfg.noise_std)  # fmt: skip
    for split, count in (("train", cfg.num_train), ("val", cfg.num_val)):
        write_split(cfg.data_dir, split, count, cfg.seed, shapes)
    with open(stamp, "w") as f:
        json.dump(cfg.data_settings(), f)
    return True


def run_demo(cfg: DemoConfig, progress: bool = True) -> dict:
    """The whole demo; returns {"rows", "table", "files"}."""
    start = time.time()
    os.makedirs(cfg.out_dir, exist_ok=True)
    with open(os.path.join(cfg.out_dir, "demo_config.json"), "w") as f:
        json.dump(asdict(cfg), f, indent=1)
    print(f"[demo] data: {cfg.num_train} + {cfg.num_val} shapes images of {cfg.image_size} px",
          flush=True)
    if not prepare_data(cfg):
        print("[demo] data: reused", flush=True)
    runs = plan_runs(cfg)
    teacher = runs[0]
    stamp = finished_stamp(cfg.run_dir("teacher"))
    if stamp is not None and {k: stamp[k] for k in ("argv", "data")} == teacher.stamp(cfg):
        teacher.reused, teacher.seconds = True, float(stamp["seconds"])
        print(f"[demo] teacher: reusing {cfg.run_dir('teacher')}/checkpoint.pth", flush=True)
    print(f"[demo] training: {', '.join(r.title for r in runs if not r.reused)} "
          f"({cfg.jobs} at a time, {cfg.threads} thread(s) each)", flush=True)
    execute(runs, cfg, progress)

    rows, table = results_table(runs, cfg)
    from icd.engine.metrics import plot_runs

    files = {
        "table": os.path.join(cfg.out_dir, "results.md"),
        "curves": plot_runs([cfg.run_dir(r.name) for r in runs],
                            os.path.join(cfg.out_dir, "curves.png")),
        "attention": attention_maps_figure(
            os.path.join(cfg.run_dir("teacher"), "checkpoint.pth"),
            os.path.join(cfg.run_dir("icd"), "checkpoint.pth"),  # started from the pre-trained side
            cfg.data_dir,
            os.path.join(cfg.out_dir, "attention_maps.png"),
            cfg.attention_images,
            title="ICD attention of the icd run's teacher side",
        ),
    }
    header = (
        f"# icd demo: {cfg.detector}, teacher {cfg.teacher_backbone} (FPN {cfg.teacher_channels}) "
        f"-> student {cfg.student_backbone} (FPN {cfg.student_channels})\n\n"
        f"Shapes data {cfg.num_train} train / {cfg.num_val} val images of {cfg.image_size} px, "
        f"seed {cfg.seed}; COCO bbox AP (%) on val after the last epoch.\n\n"
    )
    with open(files["table"], "w") as f:
        f.write(header + table)
    print("\n" + table)
    for what, path in files.items():
        print(f"[demo] {what}: {path}")
    print(f"[demo] done in {time.time() - start:.0f} s", flush=True)
    return {"rows": rows, "table": table, "files": files}


def add_demo_flags(p: argparse.ArgumentParser) -> None:
    """The flags of ``icd demo`` (defaults: DemoConfig's)."""
    d = DemoConfig()
    p.add_argument("--out", default=d.out_dir, metavar="DIR", help="output folder")
    p.add_argument("--tiny", action="store_true", help="seconds-long settings (smoke test)")
    p.add_argument("--seed", type=int, default=d.seed, help="data, initialisation and order")
    p.add_argument(
        "--student-seed",
        type=int,
        default=None,
        help="seed of the three student runs only (default --seed): with the data and teacher "
        "of --seed copied into --out, repeats the students over seeds",
    )
    p.add_argument("--image-size", type=int, default=None)
    p.add_argument("--num-train", type=int, default=None)
    p.add_argument("--num-val", type=int, default=None)
    p.add_argument("--teacher-epochs", type=int, default=None)
    p.add_argument("--student-epochs", type=int, default=None)
    p.add_argument("--lr", type=float, default=None)
    p.add_argument("--icd-weight", type=float, default=None, help="ICD loss weight (default 8)")
    p.add_argument("--distill-warmup-iters", type=int, default=None)
    p.add_argument("--fpn-mse-weight", type=float, default=None)
    p.add_argument(
        "--pretrain-iters",
        type=int,
        nargs="?",
        const=PRETRAIN_ITERS,
        default=None,
        help=f"pre-train ICD's teacher side first (icd pretrain, {PRETRAIN_ITERS} iterations without a value); "
        "default: the paper's recipe, which measured better in AP",
    )
    p.add_argument("--jobs", type=int, default=d.jobs, help="training runs side by side")
    p.add_argument("--threads", type=int, default=d.threads, help="intra-op threads per run")
    p.add_argument("--attention-images", type=int, default=None)
    p.add_argument("--no-progress", action="store_true")
    p.add_argument(
        "--summarize",
        nargs="+",
        metavar="DIR",
        default=None,
        help="train nothing: print mean ± std of each run's AP over these demo outputs (seeds)",
    )


def config_from_args(args: argparse.Namespace) -> DemoConfig:
    values = dict(TINY) if args.tiny else {}
    values.update(out_dir=args.out, seed=args.seed, student_seed=args.student_seed, jobs=args.jobs,
                  threads=args.threads)
    for key in ("image_size", "num_train", "num_val", "teacher_epochs", "student_epochs", "lr",
                "icd_weight", "distill_warmup_iters", "fpn_mse_weight", "attention_images", "pretrain_iters"):
        if getattr(args, key) is not None:
            values[key] = getattr(args, key)
    return DemoConfig(**values)
