"""Smoke tests of ``icd demo`` (the whole pipeline on a tiny setting) and benchmarks/run_distill.py."""

from __future__ import annotations

import ast
import csv
import json
import sys
from pathlib import Path

import pytest

from icd import cli
from icd.apps.demo import PRETRAIN_RUN, RUN_NAMES, DemoConfig, finished_stamp, plan_runs, results_table
from icd.apps.demo.scheduler import runs_to_start

ROOT = Path(__file__).resolve().parents[1]
BENCHMARKS = ROOT / "benchmarks"
pytestmark = pytest.mark.serial  # the demo runs its training processes side by side


@pytest.fixture(scope="module")
def tiny_demo(tmp_path_factory):
    out = tmp_path_factory.mktemp("demo")
    assert cli.main(["demo", "--tiny", "--out", str(out), "--no-progress"]) == 0
    return out


def test_tiny_demo_writes_table_curves_and_attention_maps(tiny_demo):
    text = (tiny_demo / "results.md").read_text()
    table, *sections = text.split("\n## ")  # then icd study's sections: loss health, the commands
    rows = [line for line in table.splitlines() if line.startswith("| ") and "---" not in line]
    assert [r.split("|")[1].strip() for r in rows[1:]] == ["teacher", "baseline", "fpn_mse", "icd"]
    for row in rows[1:]:
        ap, ap50, ap75 = (float(c) for c in row.split("|")[3:6])
        assert 0.0 <= ap <= ap50 <= 100.0 and 0.0 <= ap75 <= 100.0
    for png in ("curves.png", "attention_maps.png"):
        data = (tiny_demo / png).read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 10_000
    # each run trained and evaluated through `icd train`, the students from the teacher
    for name in ("teacher", "baseline", "fpn_mse", "icd"):
        records = [json.loads(x) for x in (tiny_demo / name / "metrics.jsonl").read_text().split("\n") if x]
        assert any(r["type"] == "eval" for r in records)
        assert any(r["type"] == "train" and "loss" in r for r in records)
    icd_train = [json.loads(x) for x in (tiny_demo / "icd" / "metrics.jsonl").read_text().split("\n") if x]
    assert any("loss_distill" in r and "loss_aux_conf" in r for r in icd_train)
    # the icd student started from the pre-trained teacher side, and its evaluation measured it
    from icd.apps.demo import TINY

    plan = {r.name: r for r in plan_runs(DemoConfig(out_dir=str(tiny_demo), **TINY))}
    assert "--icd-init" in plan["icd"].argv and PRETRAIN_RUN in plan["icd"].needs
    default = {r.name for r in plan_runs(DemoConfig(out_dir=str(tiny_demo)))}  # the paper's recipe
    assert PRETRAIN_RUN not in default
    assert [n for n, r in plan.items() if r.all_threads] == ["teacher"]  # the teacher has every thread
    assert (tiny_demo / PRETRAIN_RUN / "teacher_side.pth").exists()
    assert any(r["type"] == "eval" and r["lift"] > 0 and "distinctness_count" in r for r in icd_train)
    lift_column = [r.split("|")[6].strip() for r in rows[1:]]
    assert lift_column[:3] == ["", "", ""] and float(lift_column[3]) > 0
    assert [s.splitlines()[0] for s in sections] == ["Loss health", "Commands"]
    commands = [line for line in sections[1].splitlines() if "python -m icd" in line]
    assert len(commands) == len(plan)  # each run's exact command, the pre-training included
    for run in plan.values():  # the teacher ran with every slot's threads (2 slots of 1 by default)
        threads = 2 if run.name == "teacher" else 1
        assert any(c.startswith(f"OMP_NUM_THREADS={threads} python -m icd {run.argv[0]} ") and
                   f" --output-dir {run.argv[run.argv.index('--output-dir') + 1]} " in c for c in commands)


def test_the_demo_is_icd_studys_pipeline_and_runs_again_in_its_folder(tiny_demo):
    from icd.apps.demo import TINY
    from icd.apps.demo.pipeline import demo_preset
    from icd.apps.demo.plan import student_study
    from icd.apps.study.pipeline import check_out_dir
    from icd.errors import OutputDirError

    study = (tiny_demo / "study.md").read_text()
    # the teacher check is the teacher's own evaluation (no separate icd eval), and the study's
    # runs are the demo's folders
    assert "## Teacher check" in study and "python -m icd eval" not in study
    assert f"--output-dir {tiny_demo}/fpn_mse " in study and not (tiny_demo / "runs").exists()
    assert json.loads((tiny_demo / "study.json").read_text())["settings"]["label"] == "demo"
    cfg = DemoConfig(out_dir=str(tiny_demo), **TINY)
    check_out_dir(student_study(cfg), False, demo_preset(cfg))  # a second make demo is welcome
    with pytest.raises(OutputDirError, match="holds a study already"):  # icd study asks for --resume
        check_out_dir(student_study(cfg), False)


def test_finished_teacher_is_reused_only_with_the_same_settings(tiny_demo):
    from icd.apps.demo import TINY

    same = DemoConfig(out_dir=str(tiny_demo), **TINY)
    stamp = finished_stamp(same.run_dir("teacher"))
    assert stamp is not None and stamp["seconds"] > 0
    teacher = plan_runs(same)[0]
    assert {k: stamp[k] for k in ("argv", "data")} == teacher.stamp(same)
    other = DemoConfig(out_dir=str(tiny_demo), **{**TINY, "teacher_epochs": 2})
    assert {k: stamp[k] for k in ("argv", "data")} != plan_runs(other)[0].stamp(other)
    assert finished_stamp(str(tiny_demo / "no_such_run")) is None


def _flag(argv: list[str], name: str) -> str | None:
    return argv[argv.index(name) + 1] if name in argv else None


def test_baseline_runs_beside_the_teacher_and_the_students_of_the_teacher_wait_for_it(tmp_path):
    runs = plan_runs(DemoConfig(out_dir=str(tmp_path), pretrain_iters=10))
    by_name = {r.name: r for r in runs}
    first = runs_to_start(runs, active=0, done=set(), jobs=2)
    assert [r.name for r in first] == ["teacher", "baseline"]
    waiting = [r for r in runs if r not in first]
    assert runs_to_start(waiting, active=1, done={"baseline"}, jobs=2) == []  # all need the teacher
    after_teacher = runs_to_start(waiting, active=0, done={"baseline", "teacher"}, jobs=2)
    assert [r.name for r in after_teacher] == [PRETRAIN_RUN, "fpn_mse"]
    assert [r.name for r in runs_to_start([by_name["icd"]], 0, {"teacher", PRETRAIN_RUN}, 2)] == ["icd"]
    assert [r.name for r in runs_to_start(runs, active=0, done=set(), jobs=1)] == ["teacher"]


def test_the_students_and_the_pre_training_are_planned_by_icd_study(tmp_path):
    from icd.apps.demo.plan import student_study
    from icd.apps.study.plan import plan_runs as study_plan
    from icd.apps.study.plan import pretrain_argv, train_argv

    cfg = DemoConfig(out_dir=str(tmp_path), pretrain_iters=10, student_seed=3, icd_weight=4.0, image_size=80)
    runs = {r.name: r for r in plan_runs(cfg)}
    study = student_study(cfg)
    assert study.methods == ["baseline", "fpn-mse", "icd-pre"] and study.seeds == [3]
    assert runs["fpn_mse"].argv == train_argv(study, "fpn-mse", 2, 3)  # the study's run, in the demo's folder
    assert runs[PRETRAIN_RUN].argv == pretrain_argv(study, 3)
    assert [r.name for r in study_plan(study, cfg.num_train, "teacher")] == list(runs)[1:]
    assert runs["baseline"].needs == () and runs["fpn_mse"].needs == ("teacher",)
    teacher_ckpt = str(tmp_path / "teacher" / "checkpoint.pth")
    for name in ("baseline", "fpn_mse", "icd"):
        argv = runs[name].argv
        assert _flag(argv, "--output-dir") == cfg.run_dir(name) and _flag(argv, "--data-path") == cfg.data_dir
        assert _flag(argv, "--seed") == "3" and _flag(argv, "--min-size") == _flag(argv, "--max-size") == "80"
        assert _flag(argv, "--fpn-channels") == "64" and _flag(argv, "--epochs") == "2"
        assert _flag(argv, "--teacher") == (None if name == "baseline" else teacher_ckpt)
    assert _flag(runs["icd"].argv, "--distill") == "icd" and _flag(runs["icd"].argv, "--distill-weight") == "4"
    assert _flag(runs["icd"].argv, "--icd-init") == str(tmp_path / PRETRAIN_RUN / "teacher_side.pth")
    assert _flag(runs["fpn_mse"].argv, "--distill-weight") is None  # icd train's default
    assert _flag(runs["teacher"].argv, "--seed") == "0" and _flag(runs["teacher"].argv, "--fpn-channels") == "128"
    plain = {r.name: r for r in plan_runs(DemoConfig(out_dir=str(tmp_path)))}
    assert _flag(plain["icd"].argv, "--icd-init") is None and student_study(DemoConfig()).methods[-1] == "icd"


def test_teacher_keeps_its_lr_and_evaluates_once_unless_asked_to_decay(tmp_path):
    cfg = DemoConfig(out_dir=str(tmp_path), num_train=80, batch_size=8, teacher_epochs=3)
    runs = {run.name: run for run in plan_runs(cfg)}
    teacher = runs["teacher"].argv
    assert _flag(teacher, "--lr-steps") == "30"  # its last iteration: no decay inside the run
    assert _flag(teacher, "--eval-every") == "3"
    for name in ("baseline", "fpn_mse", "icd"):
        assert _flag(runs[name].argv, "--lr-steps") is None  # the students: the default decays
        assert _flag(runs[name].argv, "--eval-every") == "1"
    decaying = DemoConfig(out_dir=str(tmp_path), teacher_lr_decay=True)
    assert _flag(plan_runs(decaying)[0].argv, "--lr-steps") is None


def test_results_table_takes_each_runs_last_evaluation(tmp_path):
    cfg = DemoConfig(out_dir=str(tmp_path))
    runs = {run.name: run for run in plan_runs(cfg)}
    runs = [runs[name] for name in RUN_NAMES]  # the pre-training has no AP
    for i, run in enumerate(runs):
        (tmp_path / run.name).mkdir()
        lines = [
            {"type": "eval", "iter": 10, "AP": 1.0, "AP50": 2.0, "AP75": 0.5},
            {"type": "eval", "iter": 20, "AP": 10.0 + i, "AP50": 20.0, "AP75": 5.25},
        ]
        (tmp_path / run.name / "metrics.jsonl").write_text("\n".join(json.dumps(x) for x in lines))
        run.seconds = 60.0 * (i + 1)
    rows, table = results_table(runs, cfg)
    assert [r["AP"] for r in rows] == [10.0, 11.0, 12.0, 13.0]
    assert "| icd | resnet18 + ICD | 13.0 | 20.0 | 5.2 |" in table
    assert "| teacher | teacher resnet18 FPN 128 | 10.0 | 20.0 | 5.2 |  |  | 400 |" in table  # no lift: not ICD
    assert "240 s" in table


def test_run_distill_main_on_a_tiny_step(tmp_path):
    sys.path.insert(0, str(BENCHMARKS))
    try:
        import run_distill
    finally:
        sys.path.remove(str(BENCHMARKS))
    argv = ["--quick", "--input", "64x96", "--instances", "2,3", "--fpn-channels", "32",
            "--num-classes", "5", "--repeats", "2", "--threads", "1", "--out", str(tmp_path)]  # fmt: skip
    assert run_distill.main(argv) == 0
    csv_files = list(tmp_path.glob("distill_step_cpu-*_quick.csv"))
    assert len(csv_files) == 1
    assert csv_files[0].with_suffix(".png").stat().st_size > 0
    with open(csv_files[0]) as f:
        rows = {r["variant"]: r for r in csv.DictReader(f)}
    import icd.ops

    expected = {"student", "fpn-mse", "icd:reference"} | (
        {"icd:cpu"} if "cpu" in icd.ops.available_backends() else set()
    )
    assert set(rows) == expected
    assert all(r["status"] == "ok" for r in rows.values()), rows
    assert float(rows["student"]["time_vs_student"]) == 1.0
    for name, row in rows.items():
        assert float(row["median_ms"]) > 0 and float(row["peak_mb"]) > 0
        # measure()'s timed calls (blocked_autorange: one or more, by load), then one interleaved round
        assert int(row["repeats"]) >= 2
        if name.startswith("icd"):
            # K = 6 * the most real boxes of an image (neg_ratio 5): 18 for 3 boxes
            assert int(row["K"]) == 18 and int(row["S"]) > 0
            assert float(row["time_vs_icd_ref"]) > 0


def test_summarize_gives_mean_and_sample_std_over_outputs(tmp_path):
    from icd.apps.demo import summarize

    outs = []
    for seed, ap in enumerate((10.0, 12.0, 14.0)):
        out = tmp_path / f"s{seed}"
        for i, name in enumerate(RUN_NAMES):
            (out / name).mkdir(parents=True)
            record = {"type": "eval", "iter": 5, "AP": ap + i, "AP50": 2 * ap, "AP75": ap / 2}
            (out / name / "metrics.jsonl").write_text(json.dumps(record) + "\n")
        outs.append(str(out))
    table = summarize(outs)
    assert "| teacher | 12.00 ± 2.00 (10.00-14.00) | 24.00 ± 4.00 | 6.00 ± 1.00 | 10.00, 12.00, 14.00 |" in table
    assert "| icd | 15.00 ± 2.00 (13.00-17.00) |" in table
    # every output's students differ by the same amounts: no spread, so the paired verdicts claim them
    assert "- icd ahead of baseline by 2.00 ± 0.00 AP (3 of 3 seeds ahead): ahead beyond the spread" in table
    assert "- icd ahead of fpn_mse by 1.00 ± 0.00 AP" in table


def test_the_library_never_imports_the_demo_or_the_command_line():
    """icd.apps (the demo) sits on top of the library: no module below it imports it or icd.cli."""
    offenders = []
    for layer in ("ops", "nn", "detection", "data", "engine"):
        for path in sorted((ROOT / "icd" / layer).rglob("*.py")):
            for node in ast.walk(ast.parse(path.read_text())):
                names = [a.name for a in node.names] if isinstance(node, ast.Import) else []
                if isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                    names = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
                offenders += [f"{path.relative_to(ROOT)}: {n}" for n in names
                              if n.startswith(("icd.apps", "icd.cli")) or n in ("icd.demo",)]  # fmt: skip
    assert offenders == []
    checked = sum(1 for layer in ("ops", "engine") for _ in (ROOT / "icd" / layer).rglob("*.py"))
    assert checked > 10  # the walk saw the layers


@pytest.mark.parametrize("value", ["-1", "x"])
def test_a_negative_pretrain_length_is_refused_before_anything_runs(tmp_path, value, capsys):
    with pytest.raises(SystemExit):
        cli.main(["demo", "--out", str(tmp_path / "out"), "--pretrain-iters", value])
    assert "argument --pretrain-iters" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()
