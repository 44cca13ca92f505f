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
    ("cosine", "cosine", "{:.4f}"),
    ("agreement", "agreement", "{:.4f}"),
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


def _plot_curves(metrics: list[dict[str, Any]], path: Path) -> bool:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    val = [m for m in metrics if m.get("split") == "val"]
    train = [m for m in metrics if m.get("split") == "train" and "loss" in m]
    if not val and not train:
        return False
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.6))
    for stage in dict.fromkeys(m["stage"] for m in train):
        pts = [(m["step"], m["loss"]) for m in train if m["stage"] == stage]
        axes[0].plot(*zip(*pts), label=stage)
    axes[0].set(xlabel="optimizer step", ylabel="training loss", title="training loss")
    axes[0].set_yscale("log")
    key = next((k for k in ("accuracy", "map", "perplexity", "cosine") if any(k in m for m in val)), None)
    if key:
        for stage in dict.fromkeys(m["stage"] for m in val):
            pts = [(m["epoch"], m[key]) for m in val if m["stage"] == stage and key in m]
            if pts:
                axes[1].plot(*zip(*pts), marker=".", label=stage)
        axes[1].set(xlabel="epoch", ylabel=f"validation {key}", title=f"validation {key}")
    for ax in axes:
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=8)
        ax.grid(alpha=0.3)
    fig.tight_layout()
    atomic_write(path, lambda tmp: fig.savefig(tmp, dpi=110, format="png"))
    plt.close(fig)
    return True


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
    metrics = read_metrics(run_dir / "metrics.jsonl")
    if not metrics and "seeds" in summary:  # a multi-seed run: plot the first seed's curves
        metrics = read_metrics(run_dir / f"seed{summary['seeds'][0]}" / "metrics.jsonl")
    lines = [f"# {summary.get('recipe', 'run')}: {summary.get('command', 'run')}", ""]
    seeds = summary.get("seeds")
    lines.append(
        f"Seeds: {', '.join(map(str, seeds))} (mean ± std over seeds)."
        if seeds
        else f"Seed: {summary.get('seed', 0)}."
    )
    lines += [
        f"Wall time: {summary.get('wall_seconds', 0)} s. Accuracy and agreement (top-1 with the teacher) "
        "on the test split; latency is CPU forward time (median, fixed threads).",
        "",
        table(rows),
        "",
    ]
    if summary.get("verdict"):
        from distill.run.verdict import verdict_markdown

        lines += verdict_markdown(summary["verdict"])
    if _plot_curves(metrics, run_dir / "learning_curves.png"):
        lines += ["![learning curves](learning_curves.png)", ""]
    if _plot_tradeoff(rows, run_dir / "tradeoff.png"):
        lines += ["![accuracy vs latency](tradeoff.png)", ""]
    atomic_write_text(run_dir / "report.md", "\n".join(lines))
    return run_dir / "report.md"
