"""`icd plot`: detection and distillation losses in separate panels, a colour per run and a dash
pattern per loss, legends outside the data (the figure inspected with matplotlib's Agg backend)."""

from __future__ import annotations

import json

import matplotlib
import pytest

from icd.cli import main
from icd.engine.metrics import curves_figure

matplotlib.use("Agg")

DETECTION = {"loss_classification": 1.0, "loss_bbox_regression": 0.5}
DISTILLATION = {"loss_distill": 2.0, "loss_aux_conf": 0.7, "loss_aux_reg": 0.3}


def _run(root, name: str, losses: dict[str, float], ap: float) -> str:
    run = root / name
    run.mkdir()
    lines = []
    for it in (1, 2, 3, 4):
        values = {k: v / it for k, v in losses.items()}
        lines.append({"type": "train", "iter": it, "epoch": 0, "lr": 0.01, "loss": sum(values.values()), **values})
    lines += [{"type": "eval", "iter": it, "epoch": it // 2 - 1, "AP": ap * it, "AP50": 2 * ap * it} for it in (2, 4)]
    (run / "metrics.jsonl").write_text("".join(json.dumps(line) + "\n" for line in lines))
    return str(run)


@pytest.fixture
def figure(tmp_path):
    runs = [_run(tmp_path, "baseline", DETECTION, 1.0), _run(tmp_path, "icd", {**DETECTION, **DISTILLATION}, 2.0)]
    fig = curves_figure(runs)
    fig.canvas.draw()
    yield fig
    matplotlib.pyplot.close(fig)


def _lines(ax) -> list:
    return [line for line in ax.get_lines() if len(line.get_xdata())]


def test_detection_and_distillation_losses_have_their_own_panels(figure):
    detection, distillation, ap = figure.axes
    assert detection.get_title().startswith("detection losses")
    assert distillation.get_title() == "distillation losses" and ap.get_title().startswith("COCO AP")
    # detection: total + 2 terms for each run; distillation: the 3 ICD losses of the ICD run only
    assert len(_lines(detection)) == 6 and len(_lines(distillation)) == 3 and len(_lines(ap)) == 4
    colours = {line.get_color() for line in _lines(distillation)}
    assert len(colours) == 1  # the ICD run's colour
    # the detection total is the detector's losses alone: the same for both runs at the same values
    totals = [line for line in _lines(detection) if line.get_linestyle() == "-"]
    assert len(totals) == 2
    assert [list(t.get_ydata()) for t in totals][0] == pytest.approx([1.5 / it for it in (1, 2, 3, 4)])
    assert list(totals[0].get_ydata()) == pytest.approx(list(totals[1].get_ydata()))


def _dashes(line) -> tuple:
    """A line's dash pattern (get_linestyle() says '--' for every custom pattern)."""
    offset, pattern = line._dash_pattern
    return (line.get_linestyle(), tuple(pattern or ()))


def test_a_colour_per_run_and_a_dash_pattern_per_loss(figure):
    detection, distillation, _ = figure.axes
    for ax in (detection, distillation):
        lines = _lines(ax)
        # 3 losses per panel (total and two terms; distill, aux_conf, aux_reg), each its own pattern
        assert len({_dashes(line) for line in lines}) == 3, ax.get_title()
        for colour in {line.get_color() for line in lines}:  # within a run, no pattern twice
            patterns = [_dashes(line) for line in lines if line.get_color() == colour]
            assert len(patterns) == len(set(patterns)) == 3
    assert len({line.get_color() for line in _lines(detection)}) == 2  # one colour per run


def test_legends_lie_outside_the_data(figure):
    renderer = figure.canvas.get_renderer()
    for ax in figure.axes:
        legend = ax.get_legend()
        assert legend is not None, ax.get_title()
        box, frame = legend.get_window_extent(renderer), ax.get_window_extent(renderer)
        assert box.y1 <= frame.y0, ax.get_title()  # below the panel
        names = [text.get_text() for text in legend.get_texts()]
        assert "total" in names or "distill" in names or "AP" in names
    (runs,) = figure.legends
    assert [t.get_text() for t in runs.get_texts()] == ["baseline", "icd"]
    top = max(ax.get_window_extent(renderer).y1 for ax in figure.axes)
    assert runs.get_window_extent(renderer).y0 >= top  # above the panels


def test_plot_command_writes_a_png_and_a_run_without_teacher_says_so(tmp_path, capsys):
    run = _run(tmp_path, "baseline", DETECTION, 1.0)
    out = tmp_path / "curves.png"
    assert main(["plot", run, "--out", str(out)]) == 0
    with open(out, "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"
    fig = curves_figure([run])
    texts = [t.get_text() for t in fig.axes[1].texts]
    assert texts == ["no distillation losses (no --teacher)"]
    matplotlib.pyplot.close(fig)
