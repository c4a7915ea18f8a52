"""``icd study``: the plan from flags and TOML, its errors, the verdict arithmetic, and a tiny study end to end."""

from __future__ import annotations

import json
import math
import os

import pytest
from tiny_runs import TINY_MODEL

from icd import cli
from icd.apps.demo.stamps import STAMP_FILE, run_id
from icd.apps.study import interval, plan_runs, seeds_needed, t975, teacher_warning, verdict
from icd.apps.study.calibrate import loss_ratio, matched_weight
from icd.apps.study.command import config_from_args
from icd.apps.study.report import headline

SIZES = "--fpn-channels 32 --min-size 64 --max-size 64 --batch-size 2"


def _args(argv: str, preset: str | None = None):
    parser = cli.build_parser(commands=("study",), study_preset=preset)
    return parser.parse_args(["study", *argv.split()])


def _flag(argv: list[str], name: str) -> str | None:
    return argv[argv.index(name) + 1] if name in argv else None


# -- the plan ------------------------------------------------------------------------------------


def test_plan_from_flags(tmp_path):
    args = _args(
        f"--data-path {tmp_path} --teacher t.pth --methods baseline fpn-mse icd-pre inherit icd+inherit "
        f"--seeds 3 4 --epochs 2 6 --weight fpn-mse=4 icd=2 --jobs 2 --device cpu --out {tmp_path}/s"
    )
    args.train_flags = "--icd-mask-temperature 2 --norm gn"  # --train-flags '...' on a shell's command line
    cfg = config_from_args(args)
    runs = plan_runs(cfg, num_train=10)
    names = [r.name for r in runs]
    assert names[:2] == ["pretrain_s3", "pretrain_s4"]  # icd-pre's teacher sides first
    assert len(names) == 2 + 5 * 2 * 2 and len(set(names)) == len(names)
    by_name = {r.name: r for r in runs}
    base = by_name["baseline_e6_s4"].argv
    assert _flag(base, "--epochs") == "6" and _flag(base, "--seed") == "4" and "--teacher" not in base
    assert base[-2:] == ["--norm", "gn"]  # the user's train flags last: they win
    assert "--icd-mask-temperature" not in base  # a distillation flag: icd train refuses it without --teacher
    assert by_name["baseline_e6_s4"].total_iters == 6 * 2  # 10 images in batches of 8: 2 iterations an epoch
    fpn = by_name["fpn-mse_e2_s3"].argv
    assert _flag(fpn, "--distill") == "fpn-mse" and _flag(fpn, "--distill-weight") == "4"
    assert _flag(fpn, "--teacher") == os.path.abspath("t.pth")
    pre = by_name["icd-pre_e2_s4"]
    assert pre.needs == ("pretrain_s4",) and _flag(pre.argv, "--icd-init").endswith("pretrain_s4/teacher_side.pth")
    assert _flag(pre.argv, "--distill-weight") == "2"  # icd-pre takes icd's weight
    assert pre.argv[-4:] == ["--icd-mask-temperature", "2", "--norm", "gn"]
    inherit = by_name["inherit_e2_s3"].argv
    assert _flag(inherit, "--distill") == "none" and _flag(inherit, "--inherit-teacher") == "neck,head"
    both = by_name["icd+inherit_e2_s3"].argv
    assert _flag(both, "--distill") == "icd" and _flag(both, "--inherit-teacher") == "neck,head"
    assert _flag(by_name["pretrain_s3"].argv, "--iters") == "600"
    # the identity: the same plan, the same ids; another weight, another id
    again = {r.name: r for r in plan_runs(config_from_args(args), 10)}
    assert run_id(again["fpn-mse_e2_s3"].stamp(cfg)) == run_id(by_name["fpn-mse_e2_s3"].stamp(cfg))
    args.weight = ["fpn-mse=16"]
    other = {r.name: r for r in plan_runs(config_from_args(args), 10)}
    assert run_id(other["fpn-mse_e2_s3"].stamp(cfg)) != run_id(by_name["fpn-mse_e2_s3"].stamp(cfg))
    assert run_id(other["baseline_e2_s3"].stamp(cfg)) == run_id(by_name["baseline_e2_s3"].stamp(cfg))


def test_train_flags_take_one_quoted_flag_as_a_shell_passes_it(tmp_path):
    # icd study --train-flags '--icd-clamp-fakes': argparse alone takes the lone value for an option
    argv = ["study", "--data-path", str(tmp_path), "--teacher", "t.pth", "--train-flags", "--icd-clamp-fakes"]
    parser = cli.build_parser(commands=("study",))
    with pytest.raises(SystemExit):
        parser.parse_args(argv)
    assert parser.parse_args(cli._glue_flag_strings(argv)).train_flags == "--icd-clamp-fakes"
    assert config_from_args(parser.parse_args(cli._glue_flag_strings(argv))).train_flags == ["--icd-clamp-fakes"]
    assert cli._glue_flag_strings(["study", "--train-flags"]) == ["study", "--train-flags"]  # argparse says it


def test_plan_from_toml_with_flags_winning(tmp_path):
    toml = tmp_path / "study.toml"
    toml.write_text(
        f'out = "{tmp_path}/s"\nteacher = "t.pth"\nseeds = [0, 1, 2, 3]\nepochs = [1]\n'
        '[data]\ndata_path = "d"\n[student]\nbackbone = "resnet34"\nfpn-channels = 48\n'
        '[methods]\nmethods = ["baseline", "icd"]\nweight = ["icd=4"]\n'
    )
    cfg = config_from_args(_args(f"--config {toml} --seeds 7 8 --device cpu", preset=str(toml)))
    assert cfg.seeds == [7, 8] and cfg.epochs == [1] and cfg.methods == ["baseline", "icd"]
    assert cfg.backbone == "resnet34" and cfg.fpn_channels == 48 and cfg.weights == {"icd": 4.0}
    assert cfg.data_flags == ["--data-path", os.path.abspath("d")]
    assert [r.name for r in plan_runs(cfg, 8)] == ["baseline_e1_s7", "icd_e1_s7", "baseline_e1_s8", "icd_e1_s8"]


@pytest.mark.parametrize(
    "argv, message",
    [
        ("--methods baseline kd", "--methods: unknown method 'kd'"),
        ("--methods icd icd", "--methods: icd is given twice"),
        ("--epochs 1 2 3", "--epochs: one or two schedules, got 3"),
        ("--seeds 0 0", "--seeds: 0 is given twice"),
        ("--weight icd-pre=3", "--weight icd-pre=3: expected fpn-mse=W or icd=W"),
        ("--weight icd=x", "--weight icd=x: 'x' is not a number"),
        ("--teacher /no/such.pth", "--teacher /no/such.pth"),
        ("--val-ann a.json", "data flags: --val-ann needs --val-images too"),
        ("--methods inherit --fpn-channels 64", "--methods inherit: inherits the teacher's neck: its FPN has 32"),
        # the runs' own command lines, parsed before the teacher check and any run
        ("--methods fpn-mse --train-flags=--nonsense", "--train-flags '--nonsense': icd train refuses the command "
         "line of run fpn-mse_e2_s0: unrecognized arguments: --nonsense"),
        ("--methods icd-pre --pretrain-flags=--attention-gain=-2", "--pretrain-flags '--attention-gain=-2': icd "
         "pretrain refuses the command line of run pretrain_s0: argument --attention-gain: -2: expected a finite"),
        ("--methods fpn-mse --train-flags=--help", "--train-flags '--help': icd train refuses the command line of "
         "run fpn-mse_e2_s0: it exits before it runs (--help?)"),
        ("--methods icd --train-flags=--icd-heads=x", "--train-flags '--icd-heads=x': icd train refuses the command "
         "line of run icd_e2_s0: argument --icd-heads: 'x': expected an integer >= 1"),
    ],
)
def test_bad_settings_are_one_line_errors_naming_the_flag(data, finished_run, tmp_path, capsys, argv, message):
    teacher = "" if "--teacher" in argv else f"--teacher {finished_run}/checkpoint.pth"
    code = cli.main(["study", "--data-path", data, *teacher.split(), "--out", str(tmp_path / "s"), *argv.split()])
    err = capsys.readouterr().err
    assert code == 2 and message in err and err.count("\n") == 1, err
    assert not (tmp_path / "s").exists()  # refused before anything was written


def test_unknown_toml_key_and_missing_teacher_are_named(tmp_path, capsys):
    toml = tmp_path / "s.toml"
    toml.write_text("teacher = 't.pth'\nseedz = [1]\n")
    with pytest.raises(SystemExit, match="2"):  # a usage error, as icd train's preset keys
        cli.main(["study", "--config", str(toml)])
    assert "unknown key 'seedz' (not an icd study flag); did you mean 'seeds'?" in capsys.readouterr().err
    assert cli.main(["study", "--data-path", str(tmp_path)]) == 2
    assert "--teacher: a study needs the teacher checkpoint" in capsys.readouterr().err


def test_out_with_foreign_files_or_without_a_study_to_resume_is_refused(data, finished_run, tmp_path, capsys):
    out = tmp_path / "mine"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    base = ["study", "--data-path", data, "--teacher", f"{finished_run}/checkpoint.pth", "--out", str(out)]
    assert cli.main(base) == 2
    assert f"--out {out}: holds files the study did not create (notes.txt)" in capsys.readouterr().err
    assert cli.main([*base[:-1], str(tmp_path / "empty"), "--resume"]) == 2
    assert "--resume: " in capsys.readouterr().err and not (tmp_path / "empty").exists()
    assert cli.main([*base[:-1], finished_run]) == 2  # an icd train run's folder
    assert "holds files the study did not create" in capsys.readouterr().err
    assert (out / "notes.txt").read_text() == "mine"


# -- the arithmetic (pure) -------------------------------------------------------------------------


def test_t_quantiles_and_intervals():
    assert t975(1) == 12.706 and t975(2) == 4.303 and t975(30) == 2.042 and t975(200) == 1.96
    lo, hi = interval([1.0, 2.0, 3.0])  # mean 2, std 1: 2 +- 4.303 / sqrt(3)
    assert math.isclose(lo, 2 - 4.303 / math.sqrt(3)) and math.isclose(hi, 2 + 4.303 / math.sqrt(3))
    assert interval([1.0]) is None


def test_verdict_claims_only_what_the_spread_supports():
    level = verdict("icd", "fpn-mse", [1.1, -0.3, 0.4])  # mean 0.4, std 0.7
    assert level.startswith("icd ahead of fpn-mse by 0.40 ± 0.70 AP (2 of 3 seeds ahead): level within the spread")
    ahead = verdict("icd", "baseline", [5.2, 4.6, 5.2])
    assert "ahead of baseline by 5.00 ± 0.35 AP (3 of 3 seeds ahead): ahead beyond the spread" in ahead
    behind = verdict("inherit", "baseline", [-2.0, -2.5, -1.5, -2.0])
    assert "inherit behind baseline by 2.00 ± 0.41 AP (0 of 4 seeds ahead): behind beyond the spread" in behind
    # the same mean with twice the spread on 3 seeds no longer clears the interval
    assert "level within the spread" in verdict("a", "b", [0.2, 1.0, 1.8 + 1.6])
    one = verdict("icd", "baseline", [3.0])
    assert "on one seed: no spread measured, nothing can be claimed" in one and "ahead beyond" not in one
    assert "nothing to compare" in verdict("icd", "baseline", [])


def test_seeds_needed_follows_the_paired_interval():
    # 0.4 AP apart with a 0.7 AP per-seed spread: t(n-1) * 0.7 / sqrt(n) < 0.4 first at n = 15
    assert seeds_needed(0.4, 0.7) == 15
    n = seeds_needed(0.4, 0.7)
    assert t975(n - 1) * 0.7 / math.sqrt(n) < 0.4 <= t975(n - 2) * 0.7 / math.sqrt(n - 1)
    assert seeds_needed(5.0, 0.5) == 2 and seeds_needed(-1.0, 0.5) == seeds_needed(1.0, 0.5)
    assert seeds_needed(0.0, 1.0) is None and seeds_needed(0.01, 10.0) is None


def test_headline_takes_the_best_method_against_baseline_and_runner_up():
    def evals(*aps):
        return {seed: {"AP": ap, "AP50": 2 * ap} for seed, ap in enumerate(aps)}

    text = headline({"baseline": evals(2.0, 2.5, 3.0), "fpn-mse": evals(7.1, 7.5, 8.2), "icd": evals(7.2, 7.5, 7.9)})
    assert text.startswith("fpn-mse ahead of baseline by 5.10") and "fpn-mse ahead of icd by 0.07" in text
    assert "level within the spread" in text.split("; ")[1]


def test_teacher_warning_states_the_margin():
    assert teacher_warning(9.0, 5.0, 1.5) is None
    text = teacher_warning(6.0, 5.0, 1.5)
    assert "not clearly ahead" in text and "margin of 1.5x (7.50 AP)" in text
    assert "barely learned" in teacher_warning(0.2, None, 1.5) and teacher_warning(6.0, None, 1.5) is None


def test_matched_weight_from_the_loss_ratio():
    records = [{"type": "train", "iter": i, "loss_classification": 1.0, "loss_bbox_regression": 2.0,
                "loss_distill": 0.5 if i >= 2 else 9.0, "loss": 0.0} for i in range(4)]  # fmt: skip
    assert loss_ratio(records, 1.0) == 6.0  # the second half only: (1 + 2) / 0.5
    assert loss_ratio(records, 2.0) == 12.0  # the logged loss carries the run's weight
    assert matched_weight(6.0, 0.5) == 4.0 and matched_weight(40.0, 0.5) == 16.0


# -- a tiny study end to end -------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_study(data, finished_run, tmp_path_factory):
    out = tmp_path_factory.mktemp("study") / "s"
    argv = ["study", "--data-path", data, "--teacher", f"{finished_run}/checkpoint.pth", "--methods", "baseline",
            "fpn-mse", "--seeds", "0", "1", "--epochs", "1", *SIZES.split(), "--train-flags", "--norm gn",
            "--jobs", "2", "--no-progress", "--out", str(out)]  # fmt: skip
    assert TINY_MODEL.split()[-4:] == SIZES.split()[2:6]  # the teacher's sizes
    assert cli.main(argv) == 0
    return out, argv


def test_tiny_study_writes_study_md_curves_and_commands(tiny_study):
    out, _ = tiny_study
    text = (out / "study.md").read_text()
    assert "## Teacher check" in text and "AP on val" in text and "barely learned" in text  # a 1-iteration teacher
    for name in ("baseline_e1_s0", "baseline_e1_s1", "fpn-mse_e1_s0", "fpn-mse_e1_s1"):
        assert f"--output-dir {out}/runs/{name} " in text
        stamp = json.loads((out / "runs" / name / STAMP_FILE).read_text())
        assert stamp["run_id"] == run_id(stamp)
    assert "| fpn-mse | baseline | s0: " in text and "of 2 seeds ahead" in text
    assert "python -m icd eval " in text and "## Loss health" in text
    png = (out / "curves.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n"
    assert json.loads((out / "study.json").read_text())["settings"]["seeds"] == [0, 1]


def test_resume_runs_only_what_is_missing_and_refuses_a_changed_plan(tiny_study, capsys):
    out, argv = tiny_study
    runs = out / "runs"
    kept = {n: (runs / n / "metrics.jsonl").stat().st_mtime_ns for n in ("baseline_e1_s0", "fpn-mse_e1_s1")}
    assert cli.main(argv) == 2  # a study is there: only --resume continues it
    assert "holds a study already (study.json); pass --resume" in capsys.readouterr().err
    (runs / "fpn-mse_e1_s0" / STAMP_FILE).unlink()  # as if killed before it finished
    assert cli.main([*argv, "--resume"]) == 0
    assert {n: (runs / n / "metrics.jsonl").stat().st_mtime_ns for n in kept} == kept  # reused, not rerun
    assert (runs / "fpn-mse_e1_s0" / STAMP_FILE).exists()
    assert "4 runs, 3 finished already; running 1" in capsys.readouterr().out
    changed = [*argv, "--resume", "--lr", "0.01"]
    assert cli.main(changed) == 2
    err = capsys.readouterr().err
    assert "--resume: " in err and "finished with another command than this study's plan" in err
    assert json.loads((out / "study.json").read_text())["settings"]["lr"] == 0.02  # the refused plan left no trace
    teacher = argv[argv.index("--teacher") + 1]
    before = os.stat(teacher)
    os.utime(teacher, ns=(before.st_atime_ns, before.st_mtime_ns + 10**9))  # the teacher trained again
    try:
        assert cli.main([*argv, "--resume"]) == 2
        assert "the flags or the teacher file changed" in capsys.readouterr().err
    finally:
        os.utime(teacher, ns=(before.st_atime_ns, before.st_mtime_ns))


def test_calibration_picks_the_best_swept_weight_or_the_matched_one(tmp_path):
    from icd.apps.study.calibrate import calibrated_methods, calibration_runs, pick_weights
    from icd.apps.study.settings import StudyConfig

    cfg = StudyConfig(out_dir=str(tmp_path), teacher="t.pth", methods=["baseline", "fpn-mse", "icd-pre"],
                      weights={}, seeds=[4, 5], match_fraction=0.5)  # fmt: skip
    assert calibrated_methods(cfg) == ["fpn-mse", "icd"]  # icd-pre's weight is icd's
    runs = calibration_runs(cfg, "sweep", epochs=1, num_train=16)
    assert [r.name for r in runs] == ["calibrate_fpn-mse_w4", "calibrate_fpn-mse_w16", "calibrate_fpn-mse_w64",
                                      "calibrate_icd_w2", "calibrate_icd_w8", "calibrate_icd_w32"]  # fmt: skip
    assert all(_flag(r.argv, "--seed") == "4" for r in runs)  # the first seed
    assert _flag(runs[1].argv, "--distill-weight") == "16" and _flag(runs[4].argv, "--distill") == "icd"
    aps = {"fpn-mse_w4": 5.0, "fpn-mse_w16": 6.5, "fpn-mse_w64": 6.0, "icd_w2": 4.0, "icd_w8": 4.0, "icd_w32": 3.0}
    for run in runs:
        folder = tmp_path / "runs" / run.name
        folder.mkdir(parents=True)
        ap = aps[run.name.removeprefix("calibrate_")]
        (folder / "metrics.jsonl").write_text(json.dumps({"type": "eval", "iter": 2, "AP": ap}) + "\n")
    picked = pick_weights(cfg, "sweep", runs)
    assert picked["fpn-mse"]["weight"] == 16.0 and picked["icd"]["weight"] == 2.0  # a tie: the smaller weight
    assert "w16: 6.50 AP" in picked["fpn-mse"]["evidence"]
    match = calibration_runs(cfg, "match", epochs=1, num_train=16)
    assert [r.name for r in match] == ["calibrate_fpn-mse_w1", "calibrate_icd_w1"]
    assert match[0].argv[-2:] == ["--stop-after-iters", "30"] and _flag(match[0].argv, "--epochs") == "2"
    for run, distill in zip(match, (0.1, 0.4), strict=True):
        folder = tmp_path / "runs" / run.name
        folder.mkdir(parents=True)
        lines = [{"type": "train", "iter": i, "loss_classification": 2.0, "loss_distill": distill} for i in range(4)]
        (folder / "metrics.jsonl").write_text("\n".join(json.dumps(x) for x in lines) + "\n")
    picked = pick_weights(cfg, "match", match)
    assert picked["fpn-mse"]["weight"] == 8.0 and picked["icd"]["weight"] == 2.0  # 0.5 x 20 -> 8, 0.5 x 5 -> 2
    cfg.weights["icd"] = 8.0
    assert calibrated_methods(cfg) == ["fpn-mse"]  # a weight given is kept


def test_a_run_folder_held_by_a_live_run_is_not_cleared(tmp_path):
    import fcntl

    from icd.apps.demo.plan import Run
    from icd.apps.demo.scheduler import execute
    from icd.apps.study.settings import StudyConfig
    from icd.engine.output_dir import LOCK_FILE, lock_holder

    cfg = StudyConfig(out_dir=str(tmp_path), jobs=1)
    folder = tmp_path / "runs" / "baseline_e1_s0"
    folder.mkdir(parents=True)
    (folder / "metrics.jsonl").write_text("{}\n")
    assert lock_holder(str(folder)) is None
    with open(folder / LOCK_FILE, "w") as held:  # as a live icd train (a killed study's orphan) holds it
        held.write("icd train, pid 1")
        held.flush()
        fcntl.flock(held, fcntl.LOCK_EX)
        assert lock_holder(str(folder)) == "icd train, pid 1"
        with pytest.raises(RuntimeError, match="is in use by a live run"):
            execute([Run("baseline_e1_s0", "b", ["train"], 1)], cfg, progress=False)
    assert (folder / "metrics.jsonl").exists() and lock_holder(str(folder)) is None


def test_verdict_of_no_difference_says_even():
    text = verdict("icd", "baseline", [0.0, 0.0])
    assert text.startswith("icd even with baseline at a difference of 0.00 ± 0.00 AP (0 of 2 seeds ahead)")
    assert "level within the spread" in text


def test_shapes_preset_takes_the_demos_data_teacher_and_student_unless_flags_say_otherwise(tmp_path, capsys):
    from icd.apps.study.command import given_student_flags

    out = tmp_path / "s"
    argv = ["--shapes", "tiny", "--out", str(out), "--fpn-channels", "48", "--device", "cpu"]
    args = _args(" ".join(argv))
    cfg = config_from_args(args, given_student_flags(argv, None))
    assert cfg.data_flags == ["--data-path", str(out / "data")] and cfg.teacher == str(out / "teacher/checkpoint.pth")
    assert (cfg.min_size, cfg.batch_size, cfg.epochs, cfg.fpn_channels) == (64, 4, [1], 48)  # the flag given wins
    full = config_from_args(_args(f"--shapes --out {out} --device cpu"), set())
    assert (full.min_size, full.fpn_channels, full.epochs) == (96, 64, [2])
    assert cli.main(["study", "--shapes", "--teacher", "t.pth", "--out", str(out)]) == 2
    assert "--shapes with --teacher: the preset makes its own data and teacher" in capsys.readouterr().err


def test_docs_seed_table_is_what_seeds_needed_gives():
    import re

    text = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "docs", "study.md")
    with open(text) as f:
        table = f.read().split("| paired spread s \\ difference d (AP) |", 1)[1].split("\n\n", 1)[0]
    header, _, *rows = table.strip().splitlines()
    diffs = [float(x) for x in re.findall(r"[\d.]+", header)]
    assert len(rows) == 4 and diffs == [0.25, 0.5, 1.0, 2.0, 5.0]
    for row in rows:
        spread, *counts = [c.strip() for c in row.strip("|").split("|")]
        assert [int(c) for c in counts] == [seeds_needed(d, float(spread)) for d in diffs], row


def test_the_default_match_fraction_gives_the_swept_weights_at_the_measured_ratios():
    from icd.apps.study.settings import StudyConfig

    fraction = StudyConfig().match_fraction
    # detection / distillation loss at weight 1 (results/README.md: the demo's teacher after 1 and 2 epochs)
    for fpn_mse, icd in ((2.172, 1.906), (2.043, 1.465)):
        assert matched_weight(fpn_mse, fraction) == 16.0 and matched_weight(icd, fraction) == 8.0
    assert matched_weight(2.043, 5.5) == 8.0  # the window is narrow: 5.5 misses one of them


@pytest.mark.serial  # signals its own process
def test_sigterm_stops_a_study_as_ctrl_c_does():
    import signal
    import time

    from icd.apps.study.pipeline import _stop_on_sigterm

    previous = _stop_on_sigterm()
    try:
        with pytest.raises(KeyboardInterrupt):  # the scheduler's cleanup then stops the runs it started
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(5)  # the handler interrupts it at once
    finally:
        signal.signal(signal.SIGTERM, previous)


def test_a_study_folder_in_use_by_a_live_study_is_refused(data, finished_run, tmp_path, capsys):
    import fcntl

    out = tmp_path / "s"
    out.mkdir()
    (out / "study.json").write_text("{}")
    with open(out / ".icd_lock", "w") as held:  # as the live study holds it
        held.write("icd study, pid 1")
        held.flush()
        fcntl.flock(held, fcntl.LOCK_EX)
        argv = ["study", "--data-path", data, "--teacher", f"{finished_run}/checkpoint.pth", "--out", str(out)]
        assert cli.main([*argv, "--resume"]) == 2
    assert f"--out {out}: is in use by another live icd run (icd study, pid 1)" in capsys.readouterr().err
    assert sorted(os.listdir(out)) == [".icd_lock", "study.json"]


def test_icd_pre_pretrains_with_the_teacher_side_flags_its_students_load():
    """--train-flags' teacher-side flags (here the position scale, part of the teacher side's
    signature) reach icd pretrain, so the icd-pre students' --icd-init fits; the student-only ones
    do not (icd pretrain has no --icd-lr), and both command lines parse."""
    from icd.apps.study.plan import plan_runs
    from icd.apps.study.settings import StudyConfig
    from icd.cli import build_parser

    flags = ["--icd-position-scale", "8", "--icd-lr=1e-3", "--attention-detail", "--icd-clamp-fakes"]
    cfg = StudyConfig(teacher="t.pth", methods=["icd-pre"], seeds=[0], train_flags=flags)
    pre, student = plan_runs(cfg, num_train=16)
    assert pre.argv[-3:] == ["--icd-position-scale", "8", "--icd-clamp-fakes"]
    assert student.argv[-len(flags):] == flags
    for run in (pre, student):
        args = build_parser().parse_args(run.argv)
        assert args.icd_position_scale == 8.0 and args.icd_clamp_fakes


def test_pretrain_flags_reach_only_icd_pre_teacher_sides_and_win():
    """--pretrain-flags go to every icd pretrain, after the study's own and --train-flags' teacher-side
    flags (so that they win), and to no student; a one-flag string survives the shell's quoting."""
    from icd.apps.study.plan import plan_runs

    argv = ["study", "--data-path", "d", "--teacher", "t.pth", "--methods", "icd-pre", "baseline", "--seeds", "0",
            "--train-flags", "--icd-position-scale 8", "--pretrain-flags", "--lr 2e-3 --attention-gain 1 --iters 300"]
    cfg = config_from_args(cli.build_parser().parse_args(cli._glue_flag_strings(argv)))
    pre, student, base = plan_runs(cfg, num_train=16)
    assert pre.argv[-8:] == ["--icd-position-scale", "8", "--lr", "2e-3", "--attention-gain", "1", "--iters", "300"]
    args = cli.build_parser().parse_args(pre.argv)
    assert args.iters == 300 and args.lr == 2e-3 and args.attention_gain == 1.0  # the later --iters wins
    assert "--attention-gain" not in student.argv and "--attention-gain" not in base.argv
    one = cli._glue_flag_strings(["study", "--pretrain-flags", "--attention-gain"])
    assert one == ["study", "--pretrain-flags=--attention-gain"]


def test_a_failed_run_is_one_line_with_its_last_log_line_and_log(tmp_path):
    """A run that exits with an error stops the study with RunFailedError (one line: icd prints it
    without a traceback, exit 1): the run, its exit status, its log's last line, the log's path."""
    import subprocess
    import sys
    import types

    from icd.apps.demo.plan import Run
    from icd.apps.demo.scheduler import execute
    from icd.errors import RunFailedError

    script = "import sys; print('starting'); print('icd: error: --lr: expected a number', file=sys.stderr); sys.exit(2)"
    run = Run("icd_e1_s0", "icd 1 ep s0", ["-c", script], 1, ())
    cfg = types.SimpleNamespace(run_dir=lambda name: str(tmp_path / name), jobs=1, threads=1, label="study")
    real = subprocess.Popen
    with pytest.MonkeyPatch.context() as mp:  # the run's process: python -c SCRIPT instead of python -m icd ...
        mp.setattr(subprocess, "Popen", lambda argv, **kw: real([sys.executable, *argv[3:]], **kw))
        with pytest.raises(RunFailedError) as err:
            execute([run], cfg, progress=False)
    log = tmp_path / "icd_e1_s0" / "train.log"
    assert str(err.value) == f"study run 'icd_e1_s0' failed (exit 2): --lr: expected a number (its log: {log})"
    assert err.value.exit_code == 1 and "starting" in log.read_text()
