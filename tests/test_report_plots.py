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
