"""benchmarks/gpu_check.py (`make gpu-check`) and benchmarks/bench_kernels.py without a GPU: the dry
run's report, a hanging stage killed at its timeout, the report's format, the floor arithmetic
and the benchmark's CSV (seconds)."""

from __future__ import annotations

import csv
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"


@pytest.fixture(scope="module")
def mods():
    """(gpu_check, bench_kernels), imported as the scripts import each other (benchmarks/ on sys.path)."""
    sys.path.insert(0, str(BENCHMARKS))
    try:
        import bench_kernels
        import gpu_check

        yield gpu_check, bench_kernels
    finally:
        sys.path.remove(str(BENCHMARKS))


def test_dry_run_writes_a_report_naming_every_stage(mods, tmp_path, monkeypatch):
    gpu_check, _ = mods
    monkeypatch.setattr(gpu_check, "WHEELS_DIR", tmp_path / "no-wheels")  # whatever .wheels/ this clone has
    rc = gpu_check.main(["--dry-run", "--stages", "env,wheels,training,ddp", "--out", str(tmp_path)])
    reports = list(tmp_path.glob("gpu_check_*.md"))
    assert len(reports) == 1
    text = reports[0].read_text()
    table = gpu_check.parse_report(text)
    assert list(table) == [s.name for s in gpu_check.STAGES]
    assert table["env"]["status"] == "ok"
    for name in ("wheels", "training", "ddp"):  # no wheels; no GPU: planned, not run
        assert table[name]["status"] == "skipped", (name, table[name])
    for name in ("build", "tests", "extras", "kernels", "ultralytics"):
        assert table[name]["status"] == "not selected"
    assert rc == 0
    assert (tmp_path / reports[0].stem / "logs" / "env.log").exists()


def _python(code: str) -> list[str]:
    return [sys.executable, "-c", code]


def test_a_hanging_stage_is_killed_with_its_children_and_the_next_stage_runs(mods, tmp_path):
    gpu_check, _ = mods
    pid_file = tmp_path / "grandchild.pid"
    hang = (
        "import subprocess, sys, time\n"
        "child = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(600)'])\n"
        f"open({str(pid_file)!r}, 'w').write(str(child.pid))\n"
        "print('hanging', flush=True)\n"
        "time.sleep(600)\n"
    )

    def hanging(check, timeout):
        res = check.run("hang", _python(hang), timeout)
        return gpu_check.StageResult(gpu_check._status(res), "; ".join(res.lines[-2:]))

    def after(check, timeout):
        res = check.run("after", _python("print('ran after')"), timeout)
        return gpu_check.StageResult(gpu_check._status(res), res.lines[-1] if res.lines else "")

    stages = (
        gpu_check.Stage("hang", "a stage that never ends", hanging, 3, 3, reserve_s=1),
        gpu_check.Stage("after", "the next stage", after, 60, 60, reserve_s=1),
    )
    check = gpu_check.Check(out=tmp_path, budget_s=120)
    results = gpu_check.run_stages(check, stages)
    assert results["hang"].status == "timeout"
    assert "hanging" in results["hang"].summary and "killed at the 3 s timeout" in results["hang"].summary
    assert results["after"].status == "ok" and results["after"].summary == "ran after"
    _assert_gone(int(pid_file.read_text()))  # the process group went with it
    table = gpu_check.parse_report(check.report_path.read_text())
    assert table["hang"]["status"] == "timeout" and table["after"]["status"] == "ok"
    assert "killed at the 3 s timeout" in check.log("hang").read_text()


def _processes_mentioning(text: str) -> list[int]:
    found = []
    for cmdline in Path("/proc").glob("[0-9]*/cmdline"):
        try:
            if text in cmdline.read_bytes().decode(errors="replace") and Path(cmdline.parent, "stat").exists():
                state = Path(cmdline.parent, "stat").read_text().rsplit(")", 1)[1].split()[0]
                if state not in ("Z", "X"):
                    found.append(int(cmdline.parent.name))
        except OSError:
            continue
    return found


def test_a_stopped_driver_ends_its_running_command_and_leaves_a_report(tmp_path):
    out = tmp_path / "run"
    driver = subprocess.Popen([sys.executable, str(BENCHMARKS / "gpu_check.py"), "--dry-run", "--stages", "kernels",
                               "--out", str(out)], stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT)  # fmt: skip
    log = out / "gpu_check_cpu" / "logs" / "kernels.log"
    for _ in range(1200):  # until the kernel benchmark runs (its first lines are in its log)
        if log.exists() and "machine:" in log.read_text():
            break
        time.sleep(0.05)
    assert _processes_mentioning(str(out) + "/gpu_check_cpu")  # bench_kernels.py --out <that folder>
    driver.send_signal(signal.SIGTERM)
    assert driver.wait(timeout=60) == 128 + signal.SIGTERM
    assert _processes_mentioning(str(out) + "/gpu_check_cpu") == []
    table = {}
    for line in (out / "gpu_check_cpu.md").read_text().splitlines():
        if line.startswith("| kernels |"):
            table["kernels"] = line.split("|")[2].strip()
    assert table == {"kernels": "pending"}


def test_what_a_finished_command_leaves_running_in_its_group_is_ended(mods, tmp_path):
    gpu_check, _ = mods
    pid_file = tmp_path / "left.pid"
    code = (
        "import subprocess, sys\n"
        "child = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(600)'], stdout=subprocess.DEVNULL)\n"
        f"open({str(pid_file)!r}, 'w').write(str(child.pid))\n"
    )
    res = gpu_check.run_command(_python(code), 60, tmp_path / "log")
    assert res.ok
    _assert_gone(int(pid_file.read_text()))


def _assert_gone(pid: int) -> None:
    """The process ended (or is a zombie awaiting its reaper)."""
    status = Path(f"/proc/{pid}/status")
    if status.exists():
        state = next(line for line in status.read_text().splitlines() if line.startswith("State:"))
        assert "Z" in state.split()[1], state


def test_the_report_table_parses_back(mods, tmp_path):
    gpu_check, _ = mods
    check = gpu_check.Check(out=tmp_path, budget_s=450, command="gpu_check.py --quick")
    check.env_info.update(cuda_available=True, device_name="NVIDIA H100 80GB HBM3")
    statuses = ["ok", "failed", "timeout", "skipped", "not selected", "ok", "ok", "failed", "skipped"]
    for i, (stage, status) in enumerate(zip(gpu_check.STAGES, statuses, strict=True)):
        check.results[stage.name] = gpu_check.StageResult(status, f"summary {i} | with a bar", f"details of {i}",
                                                          seconds=i * 1.25, timeout=10 * i)  # fmt: skip
    text = gpu_check.format_report(check, gpu_check.STAGES)
    assert text.startswith("# GPU check on NVIDIA H100 80GB HBM3")
    assert check.report_path.name == "gpu_check_nvidia-h100-80gb-hbm3.md"
    table = gpu_check.parse_report(text)
    assert [table[s.name]["status"] for s in gpu_check.STAGES] == statuses
    assert [table[s.name]["timeout"] for s in gpu_check.STAGES] == [10 * i for i in range(len(statuses))]
    assert table["build"]["seconds"] == pytest.approx(2.5, abs=0.05)
    assert table["env"]["summary"] == "summary 0 / with a bar"
    assert "## build" in text and "details of 2" in text and "details of 4" not in text  # not selected: no section


def test_stage_timeouts_keep_the_later_stages_reserve(mods, tmp_path):
    gpu_check, _ = mods
    check = gpu_check.Check(out=tmp_path, budget_s=100)
    noop = gpu_check.stage_wheels
    first = gpu_check.Stage("a", "a", noop, 90, 20, reserve_s=5)
    later = [gpu_check.Stage("b", "b", noop, 50, 10, reserve_s=30),
             gpu_check.Stage("c", "c", noop, 50, 10, reserve_s=20)]  # fmt: skip
    # 100 s left - reserves 30 (at most half b's 50 s: 25) and 20: 55 s
    assert gpu_check.timeout_for(first, later, check) == pytest.approx(55, abs=1)
    assert gpu_check.timeout_for(first, [], check) == pytest.approx(90, abs=1)  # its own limit
    check.quick = True  # quick limits 10 s: each keeps 5 s
    assert gpu_check.reserve_of(later, check) == 10
    assert gpu_check.timeout_for(first, later, check) == 20
    # the real stages: every one of them starts with a time of its own, full and quick
    for quick, budget in ((False, 450.0), (True, 175.0)):
        check = gpu_check.Check(out=tmp_path, budget_s=budget, quick=quick)
        chosen = [s for s in gpu_check.STAGES if not quick or s.quick_s]
        assert gpu_check.timeout_for(chosen[0], chosen[1:], check) == gpu_check._limit(chosen[0], check)
        tests = next(i for i, s in enumerate(chosen) if s.name == "tests")
        with_extras = gpu_check.reserve_of(chosen[tests:], check)
        assert with_extras == gpu_check.reserve_of([s for s in chosen[tests:] if s.name != "extras"], check)


def test_the_wheels_the_device_lacks_are_pinned(mods):
    gpu_check, _ = mods
    pins = gpu_check.pinned_versions(gpu_check.DEVICE_LACKS)
    assert set(pins) == set(gpu_check.DEVICE_LACKS)
    assert all(v[0].isdigit() for v in pins.values())


def test_the_floor_of_the_icd_shape_by_hand(mods):
    _, bk = mods
    # bf16, N=2, h=8, K=300, S=22,400, D=32: one QK^T or PV product is 2*2*8*300*22400*32 = 6.88 GFLOP
    work = bk.floor("attention", "fwd+bwd", 2, 8, 300, 22_400, 32, 2)
    assert work["flop"] == 7 * 6_881_280_000  # fwd 2 products, bwd 5 (logits recomputed, dV, dP, dQ, dK)
    assert work["exp2"] == 2 * 2 * 8 * 300 * 22_400  # one per logit and pass
    # fwd: q + out (2 x 153,600 el) and k + v (2 x 11,468,800 el) in bf16, the bool mask (44,800 B),
    # lse in float32 (4,800 x 4 B); bwd: q, dO, out, dq and k, v, dk, dv, lse and delta (float32)
    assert work["bytes"] == 46_553_600 + 93_017_600
    fwd = bk.floor("attention", "fwd", 2, 8, 300, 22_400, 32, 2)
    assert (fwd["flop"], fwd["bytes"]) == (2 * 6_881_280_000, 46_553_600)
    h200 = bk.peak_for("NVIDIA H200")
    us, by, terms = bk.floor_us(work, h200)
    assert terms["tensor"] == pytest.approx(48_168.96e6 / 989e12 * 1e6)  # 48.7 us
    assert terms["exp2"] == pytest.approx(215.04e6 / (16 * 132 * 1.98e9) * 1e6)  # 51.4 us
    assert terms["hbm"] == pytest.approx(139.5712e6 / 4.8e12 * 1e6)  # 29.1 us
    assert (by, us) == ("exp2", terms["exp2"])
    # the value mask's work is its real slots only (7 + 12 per image pair), its output float32
    vm = bk.floor("value_mask", "fwd", 2, 8, 300, 22_400, 32, 2)
    assert vm["exp2"] == 19 * 8 * 22_400
    assert vm["bytes"] == (11_468_800 + 153_600) * 2 + 44_800 + 4 * 2 * 8 * 22_400


def test_peaks_are_matched_by_device_name(mods):
    _, bk = mods
    assert bk.peak_for("NVIDIA H100 80GB HBM3").name == "H100"
    assert bk.peak_for("NVIDIA H100 PCIe").name == "H100 PCIe"
    assert bk.peak_for("NVIDIA H100 NVL").name == "H100 NVL"
    assert bk.peak_for("NVIDIA H200").name == "H200"
    assert bk.peak_for("NVIDIA A100-SXM4-80GB") is None


def test_the_kernel_benchmark_writes_its_columns_and_error_rows(mods, tmp_path, monkeypatch):
    _, bk = mods
    real = bk.call_for

    def failing_cpu_value_mask(op, pass_, backend, x, w, attends):
        if (op, backend) == ("value_mask", "cpu"):
            raise RuntimeError("planted failure")
        return real(op, pass_, backend, x, w, attends)

    monkeypatch.setattr(bk, "call_for", failing_cpu_value_mask)
    monkeypatch.setenv("ICD_COMMIT", "abc1234")
    backends = "reference,cpu,sdpa_flash"
    assert bk.main(["--device", "cpu", "--shapes", "icd", "--backends", backends, "--repeats", "1", "--warmup", "0",
                    "--no-plot", "--out", str(tmp_path)]) == 0  # fmt: skip
    with open(tmp_path / "kernels_cpu.csv", newline="") as f:
        reader = csv.DictReader(f)
        assert tuple(reader.fieldnames) == (*bk.COLUMNS, "machine", "torch_threads")  # + common.RUN_COLUMNS
        rows = list(reader)
    got = {(r["op"], r["pass"], r["backend"]): r for r in rows}
    want = {(op, p, b) for op, p in bk.OPS for b in backends.split(",") if op == "attention" or b != "sdpa_flash"}
    assert set(got) == want
    assert got[("value_mask", "fwd", "cpu")]["status"] == "error: RuntimeError: planted failure"
    ok = [r for r in rows if r["status"] == "ok"]
    assert len(ok) == len(rows) - 1
    for r in ok:
        assert float(r["eager_ms"]) > 0 and r["gpu_ms"] == "" and r["graph_status"] == "n/a: no CUDA"
        assert (r["commit"], r["shape"], r["dtype"], r["device"]) == ("abc1234", "icd", "fp32", "cpu")
    flash = got[("attention", "fwd+bwd", "sdpa_flash")]
    assert float(flash["eager_vs_baseline"]) == 1.0
    assert float(got[("attention", "fwd+bwd", "cpu")]["rel_err"]) < 1e-4
    md = (tmp_path / "kernels_cpu.md").read_text()
    assert "TARGET 28.5 n/a" in md and "planted failure" in md
    assert os.path.getsize(tmp_path / "kernels_cpu.csv") > 0


def test_a_block_whose_inputs_fail_is_an_error_row(mods, tmp_path, monkeypatch):
    _, bk = mods

    def no_inputs(*args, **kwargs):
        raise MemoryError("planted: no room for the inputs")

    monkeypatch.setattr(bk, "make_inputs", no_inputs)
    assert bk.main(["--device", "cpu", "--shapes", "icd,d64", "--no-plot", "--out", str(tmp_path)]) == 0
    with open(tmp_path / "kernels_cpu.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert [(r["shape"], r["op"], r["status"]) for r in rows] == [
        (shape, "inputs", "error: MemoryError: planted: no room for the inputs") for shape in ("icd", "d64")
    ]
    assert "planted: no room" in (tmp_path / "kernels_cpu.md").read_text()


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--stages", "env,bild"], "--stages: bild; expected some of env, wheels, build"),
        (["--budget", "0"], "--budget: 0; expected seconds > 0"),
    ],
)
def test_command_line_mistakes_are_one_line_errors(mods, argv, message):
    gpu_check, _ = mods
    with pytest.raises(SystemExit) as err:
        gpu_check.main(argv)
    assert str(err.value).startswith(message)
