"""report.md and its learning curves, from a run folder written here: each stage's loss in its own
panel, whole epochs on the axis, every seed of a multi-seed run, and no sentence about a column
the table lacks."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

pytest.importorskip("matplotlib")

from distill.run.report import curves_figure, write_report  # noqa: E402

STAGES = {"teacher": 0.2, "student_scratch": 1.0, "student_kd": 3.0}  # loss scales differ by objective


def metrics(seed: int, epochs: int = 3, steps: int = 4) -> list[dict]:
    out = []
    for stage, scale in STAGES.items():
        for e in range(1, epochs + 1):
            for s in range(steps):
                step = (e - 1) * steps + s + 1
                out.append(
                    {"stage": stage, "split": "train", "epoch": e, "step": step, "loss": scale / step + seed}
                )
            out.append({"stage": stage, "split": "val", "epoch": e, "accuracy": 0.5 + 0.1 * e + 0.01 * seed})
    return out


def write_run(folder: Path, rows: list[dict], seeds: list[int] | None = None) -> Path:
    folder.mkdir(parents=True)
    summary = {"command": "run", "recipe": "t", "rows": rows, "wall_seconds": 1.0}
    if seeds:
        summary["seeds"] = seeds
        for seed in seeds:
            (folder / f"seed{seed}").mkdir()
            text = "\n".join(json.dumps(m) for m in metrics(seed))
            (folder / f"seed{seed}" / "metrics.jsonl").write_text(text + "\n")
    else:
        (folder / "metrics.jsonl").write_text("\n".join(json.dumps(m) for m in metrics(0)) + "\n")
    (folder / "summary.json").write_text(json.dumps(summary))
    return folder


def test_each_stage_loss_has_its_own_panel_and_epochs_are_whole():
    fig = curves_figure([metrics(0)])
    loss_axes, val_ax = fig.axes[:-1], fig.axes[-1]
    assert [ax.get_title() for ax in loss_axes] == [f"{s}: training loss" for s in STAGES]
    for ax in loss_axes:
        assert len(ax.get_lines()) == 1  # the teacher's curve never shares the student's axis
    assert {line.get_label() for line in val_ax.get_lines()} == set(STAGES)
    fig.canvas.draw()
    ticks = [t for t in val_ax.get_xticks() if val_ax.get_xlim()[0] <= t <= val_ax.get_xlim()[1]]
    assert ticks and all(float(t).is_integer() for t in ticks), ticks


def test_multi_seed_report_plots_mean_and_band_of_every_seed(tmp_path):
    run = write_run(tmp_path / "run", [{"name": "student_kd", "accuracy": 0.8}], seeds=[0, 1, 2])
    fig = curves_figure([metrics(s) for s in (0, 1, 2)])
    val_ax = fig.axes[-1]
    kd = next(line for line in val_ax.get_lines() if line.get_label() == "student_kd")
    assert list(kd.get_ydata()) == pytest.approx([0.61, 0.71, 0.81])  # mean of seeds 0, 1, 2
    assert len(val_ax.collections) == len(STAGES)  # one band per stage
    assert "mean over 3 seeds" in fig.texts[0].get_text()
    report = write_report(run).read_text()
    assert "learning_curves.png" in report and (run / "learning_curves.png").stat().st_size > 1000


def test_one_seed_has_no_band():
    fig = curves_figure([metrics(0)])
    assert len(fig.axes[-1].collections) == 0 and not fig.texts


@pytest.mark.parametrize(
    ("row", "says", "never"),
    [
        ({"perplexity": 18.8, "params": 10}, "Perplexity on the test split.", "atency"),
        (
            {"accuracy": 0.9, "agreement": 0.95, "latency_ms_b1": 0.2},
            "Accuracy and agreement (top-1 with the teacher) on the test split. Latency is CPU",
            "erplexity",
        ),
    ],
)
def test_report_sentence_names_only_the_columns_it_has(tmp_path, row, says, never):
    run = write_run(tmp_path / "run", [{"name": "student_kd", **row}])
    text = write_report(run).read_text()
    assert says in text and never not in text.split("|")[0]


# --------------------------------------------------------------------------- issue 28.11: readable plots


def _label_boxes(fig):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.text import Text

    FigureCanvasAgg(fig)  # the saved figure was closed: draw it again as it was saved
    fig.canvas.draw()
    renderer = fig.canvas.get_renderer()
    ax = fig.axes[0]
    return [Text.get_window_extent(t, renderer) for t in ax.texts], ax


ROWS = [
    {"name": "teacher", "params": 11_181_642, "accuracy": 0.69, "latency_ms_b64": 120.0},
    {"name": "student_scratch", "params": 352_808, "accuracy": 0.25, "latency_ms_b64": 11.6},
    {"name": "student_kd", "params": 352_808, "accuracy": 0.25, "latency_ms_b64": 11.65},
    {"name": "student_small", "params": 90_000, "accuracy": 0.262, "latency_ms_b64": 12.5},
    {"name": "student_tiny", "params": 40_000, "accuracy": 0.255, "latency_ms_b64": 13.0},
]


def _tradeoff(rows, tmp_path, monkeypatch):
    """The figure `report.md`'s tradeoff.png is saved from."""
    from matplotlib.figure import Figure

    from distill.run.report import _plot_tradeoff

    saved, real = [], Figure.savefig
    monkeypatch.setattr(Figure, "savefig", lambda fig, *a, **k: (saved.append(fig), real(fig, *a, **k)))
    assert _plot_tradeoff(rows, tmp_path / "tradeoff.png")
    return saved[0]


def test_tradeoff_labels_never_overlap_and_coinciding_points_share_one(tmp_path, monkeypatch):
    """The students' labels of coinciding points were drawn on top of each other ("stuudent_kdscratch")."""
    fig = _tradeoff(ROWS, tmp_path, monkeypatch)
    boxes, ax = _label_boxes(fig)
    texts = [t.get_text() for t in ax.texts]
    assert "student_scratch\nstudent_kd\n352,808 params each" in texts and len(texts) == 4
    assert not [(i, j) for i in range(len(boxes)) for j in range(i) if boxes[i].overlaps(boxes[j])], texts
    inside = ax.get_window_extent()
    assert all(
        inside.x0 <= b.x0 and b.x1 <= inside.x1 and inside.y0 <= b.y0 and b.y1 <= inside.y1 for b in boxes
    )
    assert ax.get_xscale() == "log"  # 11.6 to 120 ms: a decade


def test_short_runs_get_linear_axes(tmp_path, monkeypatch):
    """Short runs got log axes holding 2-4 points (labelled 2.28 x 10^0, 2.27 x 10^0, ...)."""
    fig = curves_figure([metrics(0, epochs=2, steps=2)])
    assert {ax.get_yscale() for ax in fig.axes} == {"linear"}
    close = [{**r, "latency_ms_b64": 0.03 + 0.01 * i} for i, r in enumerate(ROWS)]  # 0.03 to 0.07 ms
    assert _tradeoff(close, tmp_path, monkeypatch).axes[0].get_xscale() == "linear"


def test_curve_axes_have_few_whole_tick_labels_that_do_not_touch():
    """The demo's learning-curve step labels ran together."""
    fig = curves_figure([metrics(0, epochs=30, steps=400)])
    fig.canvas.draw()
    renderer = fig.canvas.get_renderer()
    for ax in fig.axes:
        lo, hi = ax.get_xlim()
        ticks = [t for t in ax.get_xticklabels() if t.get_text() and lo <= t.get_position()[0] <= hi]
        boxes = [t.get_window_extent(renderer) for t in ticks]
        assert len(ticks) <= 7, [t.get_text() for t in ticks]
        assert all(boxes[i].x1 < boxes[i + 1].x0 for i in range(len(boxes) - 1))
