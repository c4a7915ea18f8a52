"""The whole demo: ``icd study``'s pipeline on the demo's data and teacher, then the demo's table and pictures."""

from __future__ import annotations

import json
import os
import time
from dataclasses import asdict

from icd.apps.demo.figures import draw_figures
from icd.apps.demo.plan import Run, plan_runs, student_study, teacher_run
from icd.apps.demo.report import results_table, write_results
from icd.apps.demo.settings import DemoConfig
from icd.apps.demo.stamps import data_is_current, foreign_files, mark_owned, write_data_stamp
from icd.errors import OutputDirError

CONFIG_FILE = "demo_config.json"
# what the demo writes at the top of --out besides the study's files (study.json, study.md,
# curves.png) and its run folders
FILES = (CONFIG_FILE, "results.md", "attention_maps.png")


def prepare_data(cfg: DemoConfig) -> bool:
    """Generate the shapes data unless the same settings are already there; True if generated."""
    from icd.data.shapes import ShapesConfig, write_split

    if data_is_current(cfg):
        return False
    mark_owned(cfg.data_dir)
    shapes = ShapesConfig(image_size=cfg.image_size, min_shapes=1, max_shapes=cfg.max_shapes,
                          num_strokes=cfg.num_strokes, noise_std=cfg.noise_std)  # fmt: skip
    for split, count in (("train", cfg.num_train), ("val", cfg.num_val)):
        write_split(cfg.data_dir, split, count, cfg.seed, shapes)
    write_data_stamp(cfg)
    return True


def check_out_dir(cfg: DemoConfig) -> None:
    """OutputDirError when a folder the demo writes (the data, a run) holds files it did not
    create: an ``icd train`` run or a dataset of the user's is never replaced."""
    for folder in [cfg.data_dir, *(cfg.run_dir(run.name) for run in plan_runs(cfg))]:
        names = foreign_files(folder)
        if names:
            shown = ", ".join(names[:4]) + (f" and {len(names) - 4} more" if len(names) > 4 else "")
            raise OutputDirError(
                f"--out {cfg.out_dir}",
                f"{folder} holds files the demo did not create ({shown}); the demo would replace them. "
                "Choose another --out, or move them",
            )


def demo_preset(cfg: DemoConfig):
    """The demo as a preset of ``icd study``: its data made first, its teacher run scheduled with
    the students; a demo in ``--out`` is run again (the data and a finished teacher of the same
    settings reused, the students trained again)."""
    from icd.apps.study.pipeline import Preset

    def prepare() -> tuple[int, Run]:
        print(f"[demo] data: {cfg.num_train} + {cfg.num_val} shapes images of {cfg.image_size} px", flush=True)
        if not prepare_data(cfg):
            print("[demo] data: reused", flush=True)
        return cfg.num_train, teacher_run(cfg)

    return Preset(prepare, files=FILES, again=True)


def run_demo(cfg: DemoConfig, progress: bool = True) -> dict:
    """The whole demo; returns {"rows", "table", "files"}."""
    from icd.apps.study.pipeline import run_study

    start = time.time()
    check_out_dir(cfg)
    os.makedirs(cfg.out_dir, exist_ok=True)
    with open(os.path.join(cfg.out_dir, CONFIG_FILE), "w") as f:
        json.dump(asdict(cfg), f, indent=1)
    study = run_study(student_study(cfg), cfg.num_train, progress=progress, preset=demo_preset(cfg))
    runs = study["runs"]

    rows, table = results_table(runs, cfg)
    files = {"table": write_results(cfg, table, runs), "curves": study["curves"], **draw_figures(cfg)}
    print("\n" + table)
    for what, path in files.items():
        print(f"[demo] {what}: {path}")
    print(f"[demo] done in {time.time() - start:.0f} s", flush=True)
    return {"rows": rows, "table": table, "files": files}
