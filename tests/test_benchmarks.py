"""Smoke tests of the op benchmarks (benchmarks/run_attention.py and the bench_*.py scripts it
runs) on a tiny size, and of the memory and timing helpers they share (seconds)."""

from __future__ import annotations

import csv
import inspect
import os
import runpy
import sys
from pathlib import Path

import pytest
import torch

from icd.profiling import profile_cpu_allocations

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"
OP_SCRIPTS = ("bench_attention.py", "bench_value_mask.py", "bench_feature_mse.py")
MIB = 2**20


@pytest.fixture(scope="module")
def benchmarks():
    """The benchmark modules, imported as the scripts import each other (benchmarks/ on sys.path)."""
    sys.path.insert(0, str(BENCHMARKS))
    try:
        import common
        import run_attention
        import workload

        yield run_attention, workload, common
    finally:
        sys.path.remove(str(BENCHMARKS))


def test_level_shapes_give_the_documented_token_counts(benchmarks):
    _, workload, _ = benchmarks
    # 800x1333 padded to 800x1344: P3-P7 100x168 + 50x84 + 25x42 + 13x21 + 7x11
    assert workload.Workload("p3-p7", 800, 1333, 300).s == 22400
    assert workload.Workload("p2-p6", 800, 1333, 100).s == 89523
    assert workload.level_shapes(512, 853, (5, 6, 7)) == [(16, 27), (8, 14), (4, 7)]


def test_padding_masks_about_a_fifth_of_the_keys(benchmarks):
    _, workload, _ = benchmarks
    mask = workload.Workload("p3-p7", 800, 1333, 300).key_padding_mask()
    assert mask.shape == (2, 22400)
    assert 0.17 < mask.float().mean().item() < 0.23
    assert mask[1].float().mean() > 0.3 > mask[0].float().mean()  # the second image is padded


def test_cpu_peak_counts_what_the_call_holds_at_once_not_its_inputs():
    held_before = torch.ones(3 * MIB // 4)  # 3 MiB, freed inside the call: not counted

    def call() -> torch.Tensor:
        nonlocal held_before
        del held_before
        a = torch.ones(MIB)  # 4 MiB
        b = torch.ones(MIB // 4)  # 1 MiB -> 5 MiB held
        del a  # -> 1 MiB
        return torch.cat([b, torch.ones(MIB // 4)])  # 1 MiB temporary, 2 MiB result -> 4 MiB

    result, allocations = profile_cpu_allocations(call)
    assert result.numel() == MIB // 2
    assert allocations.peak_bytes == 5 * MIB
    assert allocations.largest_bytes == 4 * MIB
    assert sorted(allocations.sizes, reverse=True)[:2] == [4 * MIB, 2 * MIB]


def test_profiling_prints_nothing_and_keeps_stderr_working(capfd):
    """kineto prints a 'USDT: ... profiler_start/stop' line per call on fd 2: silenced, fd 2 restored."""
    profile_cpu_allocations(lambda: torch.ones(8).sum())
    print("still here", file=sys.stderr, flush=True)
    err = capfd.readouterr().err
    assert "USDT" not in err and "profiler_st" not in err, err
    assert "still here" in err


def test_measure_times_fresh_calls_and_reports_the_first_result(benchmarks):
    _, _, common = benchmarks
    leaf = torch.randn(64, 64, requires_grad=True)

    def step() -> torch.Tensor:
        (leaf @ leaf).sum().backward()
        return leaf.grad.clone()

    m = common.measure(step, torch.device("cpu"), grad_to_none=[leaf], warmup=2, repeats=3)
    assert m.calls >= len(m.times) >= 1 and all(t > 0 for t in m.times)
    assert m.peak_bytes >= 64 * 64 * 4  # at least the gradient the call makes
    (want,) = torch.autograd.grad((leaf @ leaf).sum(), leaf)
    torch.testing.assert_close(m.result, want)  # the gradient of one call, not accumulated
    assert leaf.grad is None  # dropped after the last call


def test_do_bench_takes_what_the_cuda_path_passes():
    """The CUDA timing (common._do_bench_seconds) cannot run here; its call must still match triton's API."""
    testing = pytest.importorskip("triton.testing")
    params = inspect.signature(testing.do_bench).parameters
    assert {"rep", "grad_to_none", "return_mode"} <= set(params)


def test_main_on_a_tiny_size_writes_csv_and_plot(benchmarks, tmp_path):
    run_attention, _, common = benchmarks
    argv = ["--device", "cpu", "--inputs", "64x107", "--levels", "p3-p7", "--k", "5",
            "--warmup", "1", "--repeats", "1", "--out", str(tmp_path)]  # fmt: skip
    assert run_attention.main(argv) == 0

    csv_files = list(tmp_path.glob("attention_cpu-*.csv"))
    assert len(csv_files) == 1
    assert csv_files[0].with_suffix(".png").stat().st_size > 0
    with open(csv_files[0]) as f:
        rows = list(csv.DictReader(f))
    measured = {(r["op"], r["pass"], r["backend"]): r for r in rows}
    expected = {
        ("attention", "fwd", "reference"), ("attention", "fwd+bwd", "reference"),
        ("attention", "fwd", "sdpa_flash"), ("attention", "fwd+bwd", "sdpa_math"),
        ("value_mask", "fwd", "reference"),
        ("feature_mse", "fwd", "reference"), ("feature_mse", "fwd+bwd", "reference"),
    }  # fmt: skip
    assert expected <= set(measured)
    assert {r["op"] for r in rows} == {"attention", "value_mask", "feature_mse"}
    # every row says where it was measured: machine, threads, torch and the commit
    assert {(r["machine"], r["torch_threads"], r["torch"]) for r in rows} == {
        (f"{common.cpu_model()} ({os.cpu_count()} cores)", str(torch.get_num_threads()), torch.__version__)
    }
    assert all(r["commit"] and r["commit"] == rows[0]["commit"] for r in rows)
    for key in expected:
        row = measured[key]
        assert row["status"] == "ok", (key, row["status"])
        assert float(row["median_ms"]) > 0
        assert int(row["repeats"]) >= 1
        assert row["S"] == "171"
    assert measured[("feature_mse", "fwd", "reference")]["K"] == ""  # the MSE does not depend on K
    # the reference is the baseline of its own ratios; peers agree with it numerically
    assert float(measured[("attention", "fwd", "reference")]["time_vs_ref"]) == 1.0
    assert float(measured[("attention", "fwd", "sdpa_flash")]["time_vs_sdpa"]) == 1.0
    assert float(measured[("attention", "fwd+bwd", "sdpa_math")]["rel_err"]) < 1e-4
    assert float(measured[("attention", "fwd+bwd", "reference")]["peak_mb"]) > 0
    # every other built backend was measured too, and agrees with the reference
    for (op, pass_, backend), row in measured.items():
        if backend not in ("reference", "sdpa_flash", "sdpa_math"):
            assert row["status"] == "ok", (op, pass_, backend, row["status"])
            assert float(row["rel_err"]) < 1e-4, (op, pass_, backend)


def test_run_attention_runs_every_op_script(benchmarks):
    run_attention, _, _ = benchmarks
    assert [b.name for b in run_attention.BENCHMARKS] == ["attention", "value_mask", "feature_mse"]
    assert {f"bench_{b.name}.py" for b in run_attention.BENCHMARKS} == set(OP_SCRIPTS)


@pytest.mark.parametrize("script", OP_SCRIPTS)
def test_op_script_runs_standalone(benchmarks, script, monkeypatch, capsys):
    monkeypatch.setattr(sys, "argv", [script, "--help"])
    with pytest.raises(SystemExit) as done:
        runpy.run_path(str(BENCHMARKS / script), run_name="__main__")
    assert done.value.code == 0
    assert script.removeprefix("bench_").removesuffix(".py") in capsys.readouterr().out


def test_benchmark_output_defaults_outside_the_checkout(benchmarks):
    _, _, common = benchmarks
    out = common.default_out_dir().resolve()
    assert BENCHMARKS.parent.resolve() not in (out, *out.parents)
