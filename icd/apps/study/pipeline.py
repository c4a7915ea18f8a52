"""The whole study: the folder claimed, the teacher checked, weights calibrated, the runs, study.md and curves.png.

The output folder (``--out``) is the study's own: it is locked for the whole study (the
``flock`` of :mod:`icd.engine.output_dir`, so two live studies never share it), a folder of
someone else's files or of an ``icd train`` run is refused, and a finished or interrupted
study there is continued only with ``--resume``, which reuses every run whose identity (the
hash of its command, :func:`icd.apps.demo.stamps.run_id`) matches the plan and refuses a
folder whose finished runs were made by another plan.
"""

from __future__ import annotations

import json
import os
import signal
import threading
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass

from icd.apps.demo.plan import Run
from icd.apps.demo.scheduler import execute
from icd.apps.demo.stamps import OWNER_FILE, STAMP_FILE, finished_stamp, mark_owned, reuse_if_finished, run_id
from icd.apps.study import calibrate as cal
from icd.apps.study.plan import TEACHER_EVAL, plan_runs, pretrain_name, run_name, teacher_eval_argv
from icd.apps.study.report import collect, last_eval_of, run_records, write_study_md
from icd.apps.study.settings import StudyConfig
from icd.apps.study.stats import mean_std
from icd.errors import OutputDirError

STUDY_FILE = "study.json"  # the settings and plan of the study in OUT
_OURS = {
    STUDY_FILE,
    OWNER_FILE,
    ".icd_lock",
    "icd_run.json",
    "runs",
    "study.md",
    "curves.png",
    "calibration.json",
    "data",
    "teacher",
}  # the last two: --shapes


@dataclass
class Preset:
    """A study on data and a teacher that a preset makes (``icd study --shapes``, ``icd demo``).

    ``prepare`` runs once the folder is claimed: it makes the data and returns the number of
    training images and the teacher's ``icd train`` run. The study schedules that run with its
    students (reused when finished with the same command): the runs that need no teacher (the
    baselines) go beside it, and the teacher check reads the teacher's own evaluation on val at
    its end instead of a separate ``icd eval``.
    """

    prepare: Callable[[], tuple[int, Run]]
    files: tuple[str, ...] = ()  # names the preset writes at the top of --out besides the study's
    # icd demo: a study in --out is run again without --resume, its teacher reused when finished
    # with the same command and every student trained again
    again: bool = False


def check_out_dir(cfg: StudyConfig, resume: bool, preset: Preset | None = None) -> None:
    """OutputDirError when ``cfg.out_dir`` may not take this study (reads only): files of someone
    else's, a study there without ``--resume`` (unless the preset runs ``again``), ``--resume``
    without one, or finished runs of another plan."""
    where = f"--out {cfg.out_dir}"
    names = sorted(os.listdir(cfg.out_dir)) if os.path.isdir(cfg.out_dir) else []
    if os.path.exists(cfg.out_dir) and not os.path.isdir(cfg.out_dir):
        raise OutputDirError(where, "is a file, not a folder")
    has_study = STUDY_FILE in names
    ours = _OURS | set(cfg.folders.values()) | set(preset.files if preset else ())
    foreign = [n for n in names if n not in ours]
    if foreign and not has_study:
        shown = ", ".join(foreign[:4]) + (f" and {len(foreign) - 4} more" if len(foreign) > 4 else "")
        raise OutputDirError(where, f"holds files the study did not create ({shown}); choose another --out")
    if has_study and not resume and not (preset and preset.again):
        raise OutputDirError(
            where,
            "holds a study already (study.json); pass --resume to finish what is missing, or choose another --out",
        )
    if resume and not has_study:
        raise OutputDirError("--resume", f"{cfg.out_dir} holds no study to resume (no {STUDY_FILE})")


def check_plan(runs: list[Run], cfg: StudyConfig) -> None:
    """OutputDirError when a run folder of the plan holds a run finished with another command
    (``--resume`` after the flags changed: that run is not this plan's)."""
    for run in runs:
        stamp = finished_stamp(cfg.run_dir(run.name))
        if stamp is not None and run_id(stamp) != run_id(run.stamp(cfg)):
            raise OutputDirError(
                "--resume",
                f"{cfg.run_dir(run.name)} finished with another command than this study's plan (run id "
                f"{run_id(stamp)}, the plan's {run_id(run.stamp(cfg))}): the flags or the teacher file changed "
                "since; give the study's own flags again, or choose another --out",
            )


def _reuse(runs: list[Run], cfg: StudyConfig, resume: bool) -> None:
    if resume:
        check_plan(runs, cfg)
    for run in runs:
        reuse_if_finished(run, cfg)


def teacher_warning(teacher_ap: float, student_ap: float | None, margin: float) -> str | None:
    """The teacher check: a warning when the teacher's val AP is not at least ``margin`` times
    what the student reaches (``student_ap``; None: unknown, only a near-zero teacher is flagged)."""
    if teacher_ap < 1.0:
        return f"the teacher reaches {teacher_ap:.2f} AP on val: it has barely learned, distillation cannot help"
    if student_ap is not None and teacher_ap < margin * student_ap:
        return (
            f"the teacher ({teacher_ap:.2f} AP on val) is not clearly ahead of the student ({student_ap:.2f} AP): "
            f"below the margin of {margin:g}x ({margin * student_ap:.2f} AP); distillation is unlikely to help"
        )
    return None


def teacher_section(cfg: StudyConfig, teacher_ap: float, before: str | None) -> str:
    """study.md's teacher check: before the students (``before``), and against each schedule's baseline."""
    lines = [
        "## Teacher check",
        "",
        f"Teacher {cfg.teacher}: {teacher_ap:.2f} AP on val. Margin: the teacher's AP at least "
        f"{cfg.teacher_margin:g}x the student's (a teacher barely above its students gave nothing on the "
        "shapes data, results/README.md).",
    ]
    if before:
        lines.append(f"\n**Warning (before the distilled students ran):** {before}.")
    results = collect(cfg)
    for epochs in cfg.epochs:
        base = results.get(epochs, {}).get("baseline")
        if base:
            mean = mean_std([e["AP"] for e in base.values()])[0]
            after = teacher_warning(teacher_ap, mean, cfg.teacher_margin)
            ratio = f", the teacher {teacher_ap / mean:.2f}x it" if mean > 0 else ""
            lines.append(
                f"\n{epochs} epoch(s): baseline {mean:.2f} AP{ratio}"
                + (f". **Warning:** {after}." if after else ": clearly ahead.")
            )
    return "\n".join(lines) + "\n"


def claim(cfg: StudyConfig, resume: bool, preset: Preset | None = None):
    """Check and lock ``cfg.out_dir`` for this study (released by the returned claim's release())."""
    from icd.engine.output_dir import claim_output_dir

    check_out_dir(cfg, resume, preset)
    try:
        held = claim_output_dir(cfg.out_dir, None, False, command="study")
    except OutputDirError as err:  # the lock of a live study (or a run's files at the top)
        raise OutputDirError(f"--out {cfg.out_dir}", err.what or str(err)) from None
    try:
        check_out_dir(cfg, resume, preset)  # again, under the lock
        mark_owned(cfg.out_dir)
    except BaseException:
        held.release()
        raise
    return held


def _stop_on_sigterm():
    """SIGTERM (``kill PID``) as Ctrl-C: the scheduler then stops the runs it started rather than
    leaving them behind; returns the previous handler (None off the main thread)."""
    if threading.current_thread() is not threading.main_thread():
        return None

    def stop(signum, frame):
        raise KeyboardInterrupt

    return signal.signal(signal.SIGTERM, stop)


def _write_json(path: str, data: dict) -> None:
    with open(f"{path}.tmp", "w") as f:
        json.dump(data, f, indent=1)
    os.replace(f"{path}.tmp", path)


def _teacher_check(cfg: StudyConfig, folder: str) -> tuple[float, str | None]:
    """The teacher's val AP (its last evaluation in ``folder``) and the warning of the check, both printed."""
    teacher_ap = float(last_eval_of(run_records(folder))["AP"])
    before = teacher_warning(teacher_ap, cfg.student_ap, cfg.teacher_margin)
    print(
        f"[{cfg.label}] teacher: {teacher_ap:.2f} AP on val"
        + (f"\n[{cfg.label}] WARNING: {before}" if before else ""),
        flush=True,
    )
    return teacher_ap, before


def run_study(
    cfg: StudyConfig,
    num_train: int,
    resume: bool = False,
    calibrate: str | None = None,
    calibrate_epochs: int = 1,
    progress: bool = True,
    preset: Preset | None = None,
) -> dict:
    """The whole study (the inputs checked by the caller); returns {"study_md", "curves", "verdicts",
    "runs"} (``runs``: the preset's teacher first, when there is one).

    ``preset``: makes the data and the teacher's run once the folder is claimed (``--shapes``,
    ``icd demo``); its number of training images replaces ``num_train``.
    """
    start = time.time()
    label = cfg.label
    held = claim(cfg, resume, preset)
    previous = _stop_on_sigterm()
    try:
        teacher_run = None
        if preset is not None:
            num_train, teacher_run = preset.prepare()
        settings = {"settings": asdict(cfg), "calibrate": calibrate}
        if not resume:  # resumed: rewritten once the plan is known to be the finished runs' own
            _write_json(os.path.join(cfg.out_dir, STUDY_FILE), settings)

        # 1. the teacher check, before any distilled student: a separate icd eval, or the
        # preset's teacher run's own last evaluation (that run is scheduled with the students)
        extra: list[list[str]] = []
        checked: dict[str, tuple[float, str | None]] = {}
        trained = False  # the preset's teacher trained before the students (for --calibrate)
        if teacher_run is None:
            teacher = Run(TEACHER_EVAL, "teacher on val", teacher_eval_argv(cfg), 1)
            _reuse([teacher], cfg, resume)
            print(f"[{label}] teacher check: icd eval of {cfg.teacher} on val", flush=True)
            execute([teacher], cfg, progress)
            checked["teacher"] = _teacher_check(cfg, cfg.run_dir(TEACHER_EVAL))
            extra.append(teacher.argv)
        else:
            _reuse([teacher_run], cfg, resume)
            if teacher_run.reused:
                print(f"[{label}] teacher: reusing {cfg.run_dir(teacher_run.name)}", flush=True)
            elif calibrate:  # the calibration runs learn from it
                execute([teacher_run], cfg, progress)
                trained = True
            if teacher_run.reused or trained:
                checked["teacher"] = _teacher_check(cfg, cfg.run_dir(teacher_run.name))

        # 2. the loss weights
        calibration = ""
        if calibrate:
            runs = cal.calibration_runs(cfg, calibrate, calibrate_epochs, num_train)
            _reuse(runs, cfg, resume)
            print(f"[{label}] calibrating ({calibrate}): {', '.join(r.name for r in runs)}", flush=True)
            execute(runs, cfg, progress)
            picked = cal.pick_weights(cfg, calibrate, runs)
            cfg.weights.update({m: p["weight"] for m, p in picked.items()})
            calibration = cal.calibration_text(calibrate, picked, calibrate_epochs, cfg.seeds[0], cfg.match_fraction)
            shown_weights = ", ".join(f"{m} {p['weight']:g}" for m, p in picked.items())
            print(f"[{label}] weights: {shown_weights}", flush=True)
            extra += [r.argv for r in runs]
            _write_json(os.path.join(cfg.out_dir, "calibration.json"), picked)

        # 3. the students (beside the preset's teacher when it is still to train)
        waiting = teacher_run is not None and not trained
        students = plan_runs(cfg, num_train, teacher_run.name if waiting else None)
        runs = students if teacher_run is None else [teacher_run, *students]
        if preset is None or not preset.again:  # again: every student trained again
            _reuse(students, cfg, resume)
        _write_json(os.path.join(cfg.out_dir, STUDY_FILE), {**settings, "settings": asdict(cfg)})  # the weights used
        scheduled = runs if waiting or teacher_run is None else students  # a trained teacher is done
        todo = [r.name for r in scheduled if not r.reused]
        print(
            f"[{label}] {len(scheduled)} runs, {len(scheduled) - len(todo)} finished already; running {len(todo)} "
            f"({cfg.jobs} at a time)",
            flush=True,
        )

        def on_done(run: Run) -> None:
            if run is teacher_run:
                checked["teacher"] = _teacher_check(cfg, cfg.run_dir(run.name))

        execute(scheduled, cfg, progress, on_done)
        teacher_ap, before = checked["teacher"]

        # 4. the report
        from icd.engine.metrics import plot_runs

        pretrains = {cfg.named(pretrain_name(seed)) for seed in cfg.seeds}
        shown = [r for r in runs if r.name not in pretrains]
        if len(shown) > 10:
            first = {cfg.named(run_name(m, e, cfg.seeds[0])) for m in cfg.methods for e in cfg.epochs}
            shown = [r for r in shown if r is teacher_run or r.name in first]
        curves = plot_runs([cfg.run_dir(r.name) for r in shown], os.path.join(cfg.out_dir, "curves.png"))
        path, verdicts = write_study_md(cfg, runs, teacher_section(cfg, teacher_ap, before), calibration, extra, curves)
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)
        held.release()
    for line in verdicts:
        print(f"[{label}] {line}")
    print(f"[{label}] {path}, {curves}; done in {time.time() - start:.0f} s", flush=True)
    return {"study_md": path, "curves": curves, "verdicts": verdicts, "runs": runs}


__all__ = ["STAMP_FILE", "STUDY_FILE", "Preset", "check_out_dir", "check_plan", "run_study", "teacher_warning"]
