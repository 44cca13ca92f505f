"""report.md and its plots, rebuilt from a run folder's summary.json and metrics.jsonl alone."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from distill.checkpoint import atomic_write, atomic_write_text
from distill.errors import DistillError
from distill.run.verdict import LOWER_IS_BETTER, headline_metric, verdict_markdown

_COLUMNS = [
    ("params", "params", "{:,.0f}"),
    ("size_mb", "size (MB)", "{:.3f}"),
    ("latency_ms_b1", "latency b1 (ms)", "{:.3f}"),
    ("latency_ms_b64", "latency b64 (ms)", "{:.3f}"),
    ("accuracy", "accuracy", "{:.4f}"),
    ("map", "mAP", "{:.4f}"),
    ("map_50", "mAP@0.5", "{:.4f}"),
    ("perplexity", "perplexity", "{:.2f}"),
    ("answer_ppl", "answer ppl", "{:.2f}"),
    ("teacher_nll", "teacher NLL", "{:.3f}"),
    ("rouge_l", "ROUGE-L", "{:.3f}"),
    ("eos_rate", "ends turn", "{:.2f}"),
    ("repeat_rate", "repeats", "{:.2f}"),
    ("cosine", "cosine", "{:.4f}"),
    ("agreement", "agreement", "{:.4f}"),
]

# The scores a table may hold, as the report's sentence names them.
_SCORES = [
    ("accuracy", "accuracy"),
    ("perplexity", "perplexity"),
    ("map", "mAP"),
    ("cosine", "cosine similarity to the teacher's embeddings"),
    ("agreement", "agreement (top-1 with the teacher)"),
]


def table(rows: list[dict[str, Any]], columns=None) -> str:
    """A markdown table of summary rows; `<metric>_std` is shown as ± beside its mean."""
    columns = columns or [c for c in _COLUMNS if any(c[0] in r for r in rows)]
    extra = sorted(
        {
            k
            for r in rows
            for k, v in r.items()
            if isinstance(v, int | float)
            and not k.endswith(("_std", "_iqr"))
            and k not in {c[0] for c in columns}
            and k not in ("nll",)
        }
    )
    columns = list(columns) + [(k, k, "{:.4g}") for k in extra]
    head = "| name | " + " | ".join(c[1] for c in columns) + " |"
    sep = "|---|" + "---:|" * len(columns)
    lines = [head, sep]
    for r in rows:
        cells = []
        for key, _, fmt in columns:
            v = r.get(key)
            if v is None:
                cells.append("")
                continue
            cell = fmt.format(v)
            if f"{key}_std" in r:
                cell += " ± " + fmt.format(r[f"{key}_std"]).strip()
            cells.append(cell + _latency_noise(r, key, fmt))
        lines.append(f"| {r['name']} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _latency_noise(row: dict[str, Any], key: str, fmt: str) -> str:
    """After a latency median: its spread (the interquartile range of the runs) and the letter it
    shares with rows whose spreads overlap (`~a`: their difference is within noise)."""
    if not key.startswith("latency_ms_b") or f"{key}_std" in row or f"{key}_iqr" not in row:
        return ""
    letters = row.get(key.replace("latency_ms_b", "latency_b") + "_within_noise")
    return f" (iqr {fmt.format(row[f'{key}_iqr']).strip()})" + (f" ~{letters}" if letters else "")


def read_metrics(path: Path) -> list[dict[str, Any]]:
    """Reads metrics.jsonl, skipping a line cut short by a crash; streams, so 100k lines are fine."""
    records = []
    if not path.exists():
        return records
    with open(path) as f:
        for line in f:
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError:
                continue
    return records


def _series(runs: list[list[dict[str, Any]]], stage: str, split: str, x: str, y: str):
    """One stage's curve over the runs (seeds): x values, the mean and the std (0 for one run)."""
    import numpy as np

    by_x: dict[float, list[float]] = {}
    for metrics in runs:
        for m in metrics:
            if m.get("stage") == stage and m.get("split") == split and y in m and x in m:
                by_x.setdefault(m[x], []).append(float(m[y]))
    xs = sorted(by_x)
    mean = np.array([np.mean(by_x[k]) for k in xs])
    std = np.array([np.std(by_x[k]) for k in xs])
    return np.array(xs, dtype=float), mean, std


def _plot_curves(runs: list[list[dict[str, Any]]], path: Path) -> bool:
    fig = curves_figure(runs)
    if fig is None:
        return False
    import matplotlib.pyplot as plt

    atomic_write(path, lambda tmp: fig.savefig(tmp, dpi=110, format="png"))
    plt.close(fig)
    return True


def curves_figure(runs: list[list[dict[str, Any]]]):
    """The learning-curves figure (None without curves) from one metrics list per seed. Each stage's training loss in its own panel (stages optimise different objectives: the
    teacher its labels, the distilled student a weighted mix, so their losses share no scale), then
    every stage's validation metric by epoch. With several seeds, each curve is the mean over seeds
    and the band one standard deviation either side."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    flat = [m for metrics in runs for m in metrics]
    val = [m for m in flat if m.get("split") == "val"]
    train = [m for m in flat if m.get("split") == "train" and "loss" in m]
    if not val and not train:
        return None
    loss_stages = list(dict.fromkeys(m["stage"] for m in train))
    key = headline_metric(val)  # a language model's perplexity before its token accuracy
    n = len(loss_stages) + (1 if key else 0)
    fig, axes = plt.subplots(1, n, figsize=(3.4 * n + 0.6, 3.4), squeeze=False)
    axes = list(axes[0])
    band = len(runs) > 1
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    stages = list(dict.fromkeys(m["stage"] for m in flat if "stage" in m))
    color = {s: colors[i % len(colors)] for i, s in enumerate(stages)}

    def draw(ax, xs, mean, std, stage, marker=None):
        ax.plot(xs, mean, color=color[stage], marker=marker, label=stage)
        if band:
            ax.fill_between(xs, mean - std, mean + std, color=color[stage], alpha=0.2, linewidth=0)

    for ax, stage in zip(axes, loss_stages):
        xs, mean, std = _series(runs, stage, "train", "step", "loss")
        draw(ax, xs, mean, std, stage, marker="." if len(xs) < 10 else None)
        ax.set(xlabel="optimizer step", ylabel="training loss", title=f"{stage}: training loss")
        if len(xs) >= 8 and _spans_decade(mean):  # a short run's few points read better on a linear axis
            ax.set_yscale("log")
            ax.yaxis.set_major_formatter(_plain_log())  # 0.1, 1, 2: not 10^-1, 2 x 10^0
            ax.yaxis.set_minor_formatter(_plain_log(labelOnlyBase=False, minor_thresholds=(2, 0.5)))
        ax.xaxis.set_major_locator(MaxNLocator(nbins=5, integer=True))  # few labels: they never touch
    if key:
        ax = axes[-1]
        for stage in dict.fromkeys(m["stage"] for m in val):
            xs, mean, std = _series(runs, stage, "val", "epoch", key)
            if len(xs):
                draw(ax, xs, mean, std, stage, marker=".")
        ax.set(xlabel="epoch", ylabel=f"validation {key}", title=f"validation {key}")
        ax.xaxis.set_major_locator(MaxNLocator(nbins=6, integer=True))  # epochs are whole numbers
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=8)
    for ax in axes:
        ax.grid(alpha=0.3)
    if band:
        fig.suptitle(f"mean over {len(runs)} seeds, band: ± one standard deviation", fontsize=9)
    fig.tight_layout()
    return fig


def _plain_log(**kwargs):
    """matplotlib's choice of labelled ticks on a log axis, written as plain numbers (0.06, 2)."""
    from matplotlib.ticker import LogFormatter

    class Plain(LogFormatter):
        def __call__(self, x, pos=None):
            return f"{x:g}" if super().__call__(x, pos) else ""

    return Plain(**kwargs)


def _plot_tradeoff(rows: list[dict[str, Any]], path: Path) -> str | None:
    """`tradeoff_figure` saved to `path`; returns the metric plotted (None: no plot)."""
    fig = tradeoff_figure(rows)
    if fig is None:
        return None
    import matplotlib.pyplot as plt

    atomic_write(path, lambda tmp: fig.savefig(tmp, dpi=110, format="png"))
    plt.close(fig)
    return headline_metric(rows, every=True)


def tradeoff_figure(rows: list[dict[str, Any]]):
    """The test metric (perplexity for language models, else accuracy or mAP) against CPU latency, one point per row (None without both columns). Points
    that coincide share one label; the others' labels are moved until none overlaps a label or a
    point. The latency axis is logarithmic only when the rows span a factor of 10 or more."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    lat_key = next((k for k in ("latency_ms_b64", "latency_ms_b1") if all(k in r for r in rows)), None)
    acc_key = headline_metric(rows, every=True)
    if not lat_key or acc_key not in ("perplexity", "accuracy", "map"):
        return None
    fig, ax = plt.subplots(figsize=(5.5, 4))
    xs = [float(r[lat_key]) for r in rows]
    ys = [float(r[acc_key]) for r in rows]
    log_x = _spans_decade(xs)  # a log axis only when latencies span a factor of 10 or more
    for r in rows:
        ax.errorbar(r[lat_key], r[acc_key], yerr=r.get(f"{acc_key}_std", 0), fmt="o", capsize=3)
    if log_x:
        ax.set_xscale("log")
    labels = []
    for group in _nearby(xs, ys, log_x):  # points on top of each other: one label naming them all
        params = {rows[i].get("params", 0) for i in group}
        names = [
            rows[i]["name"] + ("" if len(params) == 1 else f" ({rows[i].get('params', 0):,.0f})")
            for i in group
        ]
        if len(params) == 1:
            names.append(f"{params.pop():,.0f} params" + (" each" if len(group) > 1 else ""))
        i = group[0]
        right = _position(xs[i], xs, log_x) > 0.7  # near the right edge: the label goes left of the point
        labels.append(
            ax.annotate(
                "\n".join(names),
                (xs[i], ys[i]),
                fontsize=8,
                xytext=(-7 if right else 7, 0),
                textcoords="offset points",
                ha="right" if right else "left",
                va="center",
                arrowprops={"arrowstyle": "-", "color": "0.6", "lw": 0.6, "shrinkA": 0, "shrinkB": 4},
            )
        )
    lower = " (lower is better)" if acc_key in LOWER_IS_BETTER else ""
    ax.set(
        xlabel=f"CPU {lat_key.replace('_', ' ')}",
        ylabel=f"test {acc_key}{lower}",
        title=f"{acc_key} vs latency",
    )
    ax.margins(x=0.15, y=0.15)
    ax.grid(alpha=0.3)
    fig.set_dpi(110)  # the saved resolution, so labels are placed in the pixels they are drawn in
    fig.tight_layout()
    _separate(fig, ax, labels)
    return fig


def _separate(fig, ax, labels: list) -> None:
    """Moves each label up or down, the least it can, until it covers no other label and no point
    and stays inside the axes (a thin line still joins it to its point)."""
    from matplotlib.text import Text
    from matplotlib.transforms import Bbox

    renderer = fig.canvas.get_renderer()
    to_points = 72 / fig.dpi

    def text_box(label):  # the text alone (an annotation's own extent includes its line)
        label.update_positions(renderer)
        return Text.get_window_extent(label, renderer).expanded(1.0, 1.1)

    inside = ax.get_window_extent(renderer)
    r = 6  # pixels around each marker
    placed = [
        Bbox.from_extents(x - r, y - r, x + r, y + r)
        for x, y in (ax.transData.transform(a.xy) for a in labels)
    ]
    for label in sorted(labels, key=lambda a: -ax.transData.transform(a.xy)[1]):  # top to bottom
        dx, dy0 = label.xyann
        step = text_box(label).height / 3
        for k in range(61):  # 0, -1, +1, -2, +2, ... thirds of the label's height
            shift = (k + 1) // 2 * (-1 if k % 2 else 1) * step
            label.xyann = (dx, dy0 + shift * to_points)
            box = text_box(label)
            fits = inside.x0 <= box.x0 and box.x1 <= inside.x1 and inside.y0 <= box.y0 and box.y1 <= inside.y1
            if fits and not any(box.overlaps(b) for b in placed):
                break
        else:
            label.xyann = (dx, dy0)  # nowhere free: leave it beside its point
        placed.append(text_box(label))


def _spans_decade(values) -> bool:
    """Positive values spanning a factor of 10 or more: what a log axis is for."""
    vals = [float(v) for v in values]
    return bool(vals) and min(vals) > 0 and max(vals) / min(vals) >= 10


def _position(v: float, values: list[float], log: bool) -> float:
    """Where `v` sits between the smallest and largest of `values`, from 0 to 1 (log or linear)."""
    import math

    f = math.log10 if log else float
    lo, hi = f(min(values)), f(max(values))
    return 0.5 if hi == lo else (f(v) - lo) / (hi - lo)


def _nearby(xs: list[float], ys: list[float], log_x: bool, within: float = 0.015) -> list[list[int]]:
    """Indices of points grouped when they lie within `within` of the axis span of the group's
    first point in both directions: points on top of each other get one label, not several."""
    px = [_position(x, xs, log_x) for x in xs]
    py = [_position(y, ys, False) for y in ys]
    groups: list[list[int]] = []
    for i in range(len(xs)):
        home = next(
            (g for g in groups if abs(px[i] - px[g[0]]) < within and abs(py[i] - py[g[0]]) < within), None
        )
        if home is None:
            groups.append([i])
        else:
            home.append(i)
    return groups


def _explain(rows: list[dict[str, Any]]) -> str:
    """What the table's measured columns mean, naming only the columns the table has."""
    has = {k for r in rows for k in r}
    scores = [name for key, name in _SCORES if key in has]
    parts = []
    if scores:
        joined = ", ".join(scores[:-1]) + (" and " if len(scores) > 1 else "") + scores[-1]
        parts.append(f"{joined[0].upper()}{joined[1:]} on the test split.")
    if "answer_ppl" in has:
        parts.append(
            "On held-out prompts: answer ppl is the perplexity of the reference (teacher's) answers; "
            "teacher NLL the teacher's mean NLL per token of the model's greedy answers; ROUGE-L "
            "against the reference; the shares of answers that end their turn and that repeat themselves; gen tokens/s: new "
            "tokens per second generating with the KV cache (docs/nlp.md)."
        )
    if has & {"latency_ms_b1", "latency_ms_b64"}:
        parts.append(
            "Latency is CPU forward time (median, fixed threads; the models measured in turns, with the "
            "interquartile range of the runs; rows sharing a letter, ~a, differ by less than that noise)."
            if any(k.endswith("_iqr") for k in has)
            else "Latency is CPU forward time (median, fixed threads)."
        )
    return " ".join(parts)


def write_report(run_dir: str | Path) -> Path:
    """Writes `report.md` (+ `learning_curves.png`, `tradeoff.png`) for a run folder."""
    run_dir = Path(run_dir)
    summary_path = run_dir / "summary.json"
    if not summary_path.exists():
        raise DistillError(f"{run_dir} has no summary.json: is it a finished distill run folder?")
    try:
        summary = json.loads(summary_path.read_text())
    except json.JSONDecodeError as e:
        raise DistillError(f"{summary_path} is not valid JSON ({e}); rerun the recipe with --resume") from e
    rows = summary.get("rows", [])
    runs = [read_metrics(run_dir / "metrics.jsonl")]
    if not runs[0] and "seeds" in summary:  # a multi-seed run: every seed's curves
        runs = [read_metrics(run_dir / f"seed{seed}" / "metrics.jsonl") for seed in summary["seeds"]]
        runs = [r for r in runs if r]
    lines = [f"# {summary.get('recipe', 'run')}: {summary.get('command', 'run')}", ""]
    seeds = summary.get("seeds")
    lines.append(
        f"Seeds: {', '.join(map(str, seeds))} (mean ± std over seeds)."
        if seeds
        else f"Seed: {summary.get('seed', 0)}."
    )
    lines += [f"> **Warning:** {w}" for w in summary.get("warnings", [])] + [""] * bool(
        summary.get("warnings")
    )
    lines += [f"Wall time: {summary.get('wall_seconds', 0)} s. {_explain(rows)}", "", table(rows), ""]
    if summary.get("verdict"):
        lines += verdict_markdown(summary["verdict"])
    if summary.get("student_cut"):
        from distill.nlp.students import cut_markdown

        lines += cut_markdown(summary["student_cut"])
    if summary.get("answers"):
        from distill.run.chat import answers_markdown

        lines += answers_markdown(summary["answers"])
    if _plot_curves(runs, run_dir / "learning_curves.png"):
        lines += ["![learning curves](learning_curves.png)", ""]
    plotted = _plot_tradeoff(rows, run_dir / "tradeoff.png")
    if plotted:
        lines += [f"![{plotted} vs latency](tradeoff.png)", ""]
    atomic_write_text(run_dir / "report.md", "\n".join(lines))
    return run_dir / "report.md"
