"""Smoke test of benchmarks/run_attention.py: its main function on a tiny size (seconds)."""

from __future__ import annotations

import csv
import sys
from pathlib import Path

import pytest

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"


@pytest.fixture(scope="module")
def run_attention():
    sys.path.insert(0, str(BENCHMARKS))
    try:
        import run_attention

        yield run_attention
    finally:
        sys.path.remove(str(BENCHMARKS))


def test_level_shapes_give_the_documented_token_counts(run_attention):
    # 800x1333 padded to 800x1344: P3-P7 100x168 + 50x84 + 25x42 + 13x21 + 7x11
    assert run_attention.Workload("p3-p7", 800, 1333, 300).s == 22400
    assert run_attention.Workload("p2-p6", 800, 1333, 100).s == 89523
    assert run_attention.level_shapes(512, 853, (5, 6, 7)) == [(16, 27), (8, 14), (4, 7)]


def test_padding_masks_about_a_fifth_of_the_keys(run_attention):
    mask = run_attention.Workload("p3-p7", 800, 1333, 300).key_padding_mask()
    assert mask.shape == (2, 22400)
    assert 0.17 < mask.float().mean().item() < 0.23
    assert mask[1].float().mean() > 0.3 > mask[0].float().mean()  # the second image is padded


def test_main_on_a_tiny_size_writes_csv_and_plot(run_attention, tmp_path):
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
    for key in expected:
        row = measured[key]
        assert row["status"] == "ok", (key, row["status"])
        assert float(row["median_ms"]) > 0
        assert row["S"] == "171"
    # the reference is the baseline of its own ratios; peers agree with it numerically
    assert float(measured[("attention", "fwd", "reference")]["time_vs_ref"]) == 1.0
    assert float(measured[("attention", "fwd+bwd", "sdpa_math")]["rel_err"]) < 1e-4
    assert float(measured[("attention", "fwd+bwd", "reference")]["peak_mb"]) > 0
    # every other built backend was measured too, and agrees with the reference
    for (op, pass_, backend), row in measured.items():
        if backend not in ("reference", "sdpa_flash", "sdpa_math"):
            assert row["status"] == "ok", (op, pass_, backend, row["status"])
            assert float(row["rel_err"]) < 1e-4, (op, pass_, backend)
