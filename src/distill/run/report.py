"""report.md and its plots, rebuilt from a run folder's summary.json and metrics.jsonl alone."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from distill.checkpoint import atomic_write, atomic_write_text
from distill.errors import DistillError

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
            and not k.endswith("_std")
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
            cells.append(cell)
        lines.append(f"| {r['name']} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


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
    key = next((k for k in ("accuracy", "map", "perplexity", "cosine") if any(k in m for m in val)), None)
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
        draw(ax, *_series(runs, stage, "train", "step", "loss"), stage)
        ax.set(xlabel="optimizer step", ylabel="training loss", title=f"{stage}: training loss")
        ax.set_yscale("log")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    if key:
        ax = axes[-1]
        for stage in dict.fromkeys(m["stage"] for m in val):
            xs, mean, std = _series(runs, stage, "val", "epoch", key)
            if len(xs):
                draw(ax, xs, mean, std, stage, marker=".")
        ax.set(xlabel="epoch", ylabel=f"validation {key}", title=f"validation {key}")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))  # epochs are whole numbers
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=8)
    for ax in axes:
        ax.grid(alpha=0.3)
    if band:
        fig.suptitle(f"mean over {len(runs)} seeds, band: ± one standard deviation", fontsize=9)
    fig.tight_layout()
    return fig


def _plot_tradeoff(rows: list[dict[str, Any]], path: Path) -> bool:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    lat_key = next((k for k in ("latency_ms_b64", "latency_ms_b1") if all(k in r for r in rows)), None)
    acc_key = next((k for k in ("accuracy", "map") if all(k in r for r in rows)), None)
    if not lat_key or not acc_key:
        return False
    fig, ax = plt.subplots(figsize=(5.5, 4))
    for r in rows:
        ax.errorbar(r[lat_key], r[acc_key], yerr=r.get(f"{acc_key}_std", 0), fmt="o", capsize=3)
        ax.annotate(
            f"{r['name']}\n{r.get('params', 0):,.0f} params",
            (r[lat_key], r[acc_key]),
            fontsize=8,
            xytext=(5, -12),
            textcoords="offset points",
        )
    ax.set(xlabel=f"CPU {lat_key.replace('_', ' ')}", ylabel=f"test {acc_key}", title=f"{acc_key} vs latency")
    ax.set_xscale("log")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    atomic_write(path, lambda tmp: fig.savefig(tmp, dpi=110, format="png"))
    plt.close(fig)
    return True


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
        parts.append("Latency is CPU forward time (median, fixed threads).")
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
        from distill.run.verdict import verdict_markdown

        lines += verdict_markdown(summary["verdict"])
    if summary.get("student_cut"):
        from distill.nlp.students import cut_markdown

        lines += cut_markdown(summary["student_cut"])
    if summary.get("answers"):
        from distill.run.chat import answers_markdown

        lines += answers_markdown(summary["answers"])
    if _plot_curves(runs, run_dir / "learning_curves.png"):
        lines += ["![learning curves](learning_curves.png)", ""]
    if _plot_tradeoff(rows, run_dir / "tradeoff.png"):
        lines += ["![accuracy vs latency](tradeoff.png)", ""]
    atomic_write_text(run_dir / "report.md", "\n".join(lines))
    return run_dir / "report.md"
