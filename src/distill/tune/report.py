"""What a study leaves behind: trial table, importances, the best recipe, history and Pareto plots."""

from __future__ import annotations

import json
import warnings
from pathlib import Path
from typing import Any

import yaml

from distill.checkpoint import atomic_write, atomic_write_text
from distill.run.config import RecipeConfig
from distill.tune.config import TuneObjective, TuneRecipe
from distill.tune.space import suggest

# --------------------------------------------------------------------------- outputs


COSTS = ("params", "size_mb", "latency_ms_", "tokens_per_s", "sentences_per_s")


def _metric_key(o: TuneObjective) -> str:
    """The row key of an objective: a cost measured on the trial's model as is; anything else is
    the validation value the study optimised, `val_<metric>`, kept apart from the test value of
    the same name in the row (a language model's `perplexity` is measured on both)."""
    return o.metric if o.metric.startswith(COSTS) else f"val_{o.metric}"


def trial_rows(cfg: TuneRecipe, study) -> list[dict[str, Any]]:
    """One row per trial: state, objective values, sampled values, test-split measurements."""
    rows = []
    for t in study.get_trials(deepcopy=False):
        row: dict[str, Any] = {"name": f"trial_{t.number}", "number": t.number, "state": t.state.name.lower()}
        if t.values is not None:
            for o, v in zip(cfg.tune.objectives, t.values):
                row[_metric_key(o)] = v
        elif t.intermediate_values:
            last = max(t.intermediate_values)
            row[_metric_key(cfg.tune.objectives[0])] = t.intermediate_values[last]
        for k in ("pruned_at_epoch", "resume_of", "run_dir"):
            if k in t.user_attrs:
                row[k] = t.user_attrs[k]
        row.update({k: v for k, v in (t.user_attrs.get("test") or {}).items()})
        row["params_searched"] = dict(t.params)
        if t.datetime_complete and t.datetime_start:
            row["seconds"] = round((t.datetime_complete - t.datetime_start).total_seconds(), 1)
        rows.append(row)
    return rows


def _importances(cfg: TuneRecipe, study) -> dict[str, dict[str, float]]:
    import optuna
    from optuna.trial import TrialState

    complete = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
    out: dict[str, dict[str, float]] = {}
    if len(complete) < 3:
        return out
    for i, o in enumerate(cfg.tune.objectives):
        # the default evaluator (PED-ANOVA in Optuna 4+) ranks what leads to LOW target values
        sign = -1.0 if o.direction == "maximize" else 1.0
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                imp = optuna.importance.get_param_importances(
                    study, target=(lambda t, i=i, sign=sign: sign * t.values[i])
                )
            out[_metric_key(o)] = {k: round(float(v), 4) for k, v in imp.items()}
        except (RuntimeError, ValueError, ZeroDivisionError, ImportError):
            continue  # e.g. a single distinct value per parameter: no importance to measure
    return out


def _best_trials(cfg: TuneRecipe, study) -> list[Any]:
    from optuna.trial import TrialState

    if not study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)):
        return []
    if len(cfg.tune.objectives) == 1:
        return [study.best_trial]
    front = list(study.best_trials)
    sign = 1 if cfg.tune.objectives[0].direction == "maximize" else -1
    return sorted(front, key=lambda t: -sign * t.values[0])  # best first objective first


def best_recipe_yaml(cfg: TuneRecipe, trial, teacher_hint: str) -> str:
    """The best trial's values applied to the recipe without search/tune: runnable with `distill run`."""
    import optuna

    class _Fixed:
        def __init__(self, params):
            self.params = params

        def suggest_float(self, key, *a, **k):
            return self.params[key]

        suggest_int = suggest_float
        suggest_categorical = suggest_float

    data, values = suggest(_Fixed(trial.params), cfg)
    RecipeConfig.model_validate(data)
    vals = ", ".join(f"{k}={v:.4g}" for k, v in zip([o.metric for o in cfg.tune.objectives], trial.values))
    head = (
        f"# The best configuration of study '{cfg.tune.study_name or cfg.name}' (trial {trial.number}: "
        f"validation {vals}), written by `distill tune` (optuna {optuna.__version__}).\n"
        "# Run it with `distill run <this file>`. Tuned keys:\n"
        + "".join(f"#   {k}: {json.dumps(v)}\n" for k, v in values.items())
        + teacher_hint
    )
    return head + yaml.safe_dump(data, sort_keys=False)


def _teacher_hint(base: RecipeConfig, out: Path) -> str:
    """Comment lines of best_recipe.yaml: where the study's trained teacher weights are."""
    named = (
        [("teacher", base.teacher)]
        if not base.teachers
        else [(f"teachers[{i}]", tc) for i, tc in enumerate(base.teachers)]
    )
    lines = []
    for i, (name, tc) in enumerate(named):
        stem = "teacher" if not base.teachers else f"teacher{i}"
        path = tc.checkpoint or (
            str((out / f"{stem}.safetensors").resolve()) if tc.train is not None else None
        )
        if path and not tc.checkpoint:
            lines.append(f"#   {name}.checkpoint: {path}\n")
    if not lines:
        return ""
    return "# To reuse the study's trained teacher weights instead of training again, set:\n" + "".join(lines)


def _plot_history(cfg: TuneRecipe, rows: list[dict[str, Any]], path: Path) -> bool:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    o = cfg.tune.objectives[0]
    key = _metric_key(o)
    pts = [(r["number"], r[key], r["state"]) for r in rows if isinstance(r.get(key), int | float)]
    if not pts:
        return False
    fig, ax = plt.subplots(figsize=(6, 3.6))
    for state, marker, color in (("complete", "o", "C0"), ("pruned", "x", "C3")):
        xs = [n for n, _, s in pts if s == state]
        ys = [v for _, v, s in pts if s == state]
        if xs:
            ax.scatter(xs, ys, marker=marker, color=color, label=state)
    best, bx, by = None, [], []
    for n, v, s in sorted(pts):
        if s != "complete":
            continue
        if best is None or (v > best if o.direction == "maximize" else v < best):
            best = v
        bx.append(n)
        by.append(best)
    if bx:
        ax.step(bx, by, where="post", color="C2", label="best so far")
    ax.set_xlabel("trial")
    ax.set_ylabel(key)
    ax.set_title("optimization history")
    ax.legend(fontsize=8)
    fig.tight_layout()
    atomic_write(path, lambda f: fig.savefig(f, format="png", dpi=110))
    plt.close(fig)
    return True


def _plot_pareto(cfg: TuneRecipe, rows: list[dict[str, Any]], front: set[int], path: Path) -> bool:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    kx, ky = _metric_key(cfg.tune.objectives[1]), _metric_key(cfg.tune.objectives[0])
    pts = [(r[kx], r[ky], r["number"]) for r in rows if r["state"] == "complete" and kx in r and ky in r]
    if not pts:
        return False
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.scatter(
        [x for x, _, n in pts if n not in front],
        [y for _, y, n in pts if n not in front],
        color="0.6",
        label="trial",
    )
    fr = sorted((x, y, n) for x, y, n in pts if n in front)
    ax.plot([x for x, _, _ in fr], [y for _, y, _ in fr], "o-", color="C3", label="Pareto front")
    labels: dict[tuple[float, float], list[str]] = {}
    for x, y, n in fr:  # trials with equal values share one label
        labels.setdefault((x, y), []).append(str(n))
    for (x, y), ns in labels.items():
        ax.annotate(",".join(ns), (x, y), fontsize=7, xytext=(3, 3), textcoords="offset points")
    if kx in ("params", "size_mb") or (
        pts and max(p[0] for p in pts) > 20 * max(min(p[0] for p in pts), 1e-12)
    ):
        ax.set_xscale("log")
    ax.set_xlabel(kx)
    ax.set_ylabel(ky)
    ax.set_title("Pareto front")
    ax.legend(fontsize=8)
    fig.tight_layout()
    atomic_write(path, lambda f: fig.savefig(f, format="png", dpi=110))
    plt.close(fig)
    return True


def _fmt(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:.4g}"
    if isinstance(v, int | str):
        return str(v)
    return json.dumps(v, separators=(",", ":"))


def _short_names(keys: list[str]) -> list[str]:
    """The shortest dotted suffix of each key that tells it apart from the others."""
    names = []
    for key in keys:
        parts = key.split(".")
        for n in range(1, len(parts) + 1):
            suffix = ".".join(parts[-n:])
            if sum(k == suffix or k.endswith("." + suffix) for k in keys) == 1:
                break
        names.append(suffix)
    return names


def trials_table(cfg: TuneRecipe, rows: list[dict[str, Any]]) -> str:
    keys = [_metric_key(o) for o in cfg.tune.objectives]
    extra = [k for k in ("accuracy", "params", "latency_ms_b1") if k not in keys]
    searched = list(cfg.search)
    head = ["trial", "state", *keys, *[f"test {k}" if k == "accuracy" else k for k in extra]]
    head += _short_names(searched)
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        cells = [
            str(r["number"]),
            r["state"] + (f" (epoch {r['pruned_at_epoch']})" if "pruned_at_epoch" in r else ""),
        ]
        cells += [_fmt(r[k]) if k in r else "" for k in keys + extra]
        ps = r["params_searched"]
        cells += [_fmt(ps[k])[:40] if k in ps else "" for k in searched]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _study_wall(study) -> float | None:
    """Seconds from the first trial's start to the last trial's end, over every session."""
    ts = study.get_trials(deepcopy=False)
    starts = [t.datetime_start for t in ts if t.datetime_start]
    ends = [t.datetime_complete for t in ts if t.datetime_complete]
    return round((max(ends) - min(starts)).total_seconds(), 1) if starts and ends else None


def write_outputs(cfg: TuneRecipe, study, out: Path, base: RecipeConfig) -> dict[str, Any]:
    """summary.json (one row per trial), report.md, plots and best_recipe.yaml."""
    import optuna

    rows = trial_rows(cfg, study)
    best = _best_trials(cfg, study)
    importances = _importances(cfg, study)
    teacher_row = json.loads((out / "teacher.json").read_text()) if (out / "teacher.json").exists() else None
    counts: dict[str, int] = {}
    for r in rows:
        counts[r["state"]] = counts.get(r["state"], 0) + 1
    summary: dict[str, Any] = {
        "command": "tune",
        "recipe": cfg.name,
        "study": study.study_name,
        "objectives": [o.model_dump() for o in cfg.tune.objectives],
        "optuna": optuna.__version__,
        "counts": counts,
        "study_wall_seconds": _study_wall(study),
        "teacher": teacher_row,
        "best": [r for r in rows if r["number"] in {t.number for t in best}][:1],
        "pareto": [t.number for t in best] if len(cfg.tune.objectives) > 1 else [],
        "importances": importances,
        "rows": rows,
    }
    md = [f"# distill tune: {cfg.name} (study '{study.study_name}')", ""]
    md.append(
        f"{len(rows)} trials: "
        + ", ".join(f"{n} {s}" for s, n in sorted(counts.items()))
        + ". Objectives: "
        + ", ".join(f"{o.direction} {_metric_key(o)}" for o in cfg.tune.objectives)
        + " (validation split; `test accuracy` is reported, never optimised)."
    )
    if teacher_row:
        md.append(
            f"\nTeacher (trained once, shared): test accuracy {teacher_row.get('accuracy', float('nan')):.4f}, "
            f"{teacher_row.get('params', 0):,} params."
        )
    if best:
        b = best[0]
        md += [
            "",
            "## Best",
            "",
            f"Trial {b.number}: "
            + ", ".join(f"{_metric_key(o)} {v:.4g}" for o, v in zip(cfg.tune.objectives, b.values))
            + f"; run folder `{b.user_attrs.get('run_dir', '')}`. Ready-to-run recipe: `best_recipe.yaml`.",
            "",
        ]
        md += [f"- `{k}`: `{_fmt(v)}`" for k, v in b.params.items()]
        atomic_write_text(out / "best_recipe.yaml", best_recipe_yaml(cfg, b, _teacher_hint(base, out)))
    if len(cfg.tune.objectives) > 1 and best:
        md += ["", "## Pareto front", "", "Trials " + ", ".join(str(t.number) for t in best) + "."]
        if _plot_pareto(cfg, rows, {t.number for t in best}, out / "pareto.png"):
            md += ["", "![Pareto front](pareto.png)"]
    if importances:
        md += ["", "## Hyperparameter importance", ""]
        for k, imp in importances.items():
            md.append(f"{k}: " + ", ".join(f"`{p}` {v:.2f}" for p, v in imp.items()))
    else:
        md += ["", "Hyperparameter importance: not available (needs 3+ complete trials with varied values)."]
    if _plot_history(cfg, rows, out / "history.png"):
        md += ["", "![optimization history](history.png)"]
    md += ["", "## Trials", "", trials_table(cfg, rows), ""]
    atomic_write_text(out / "report.md", "\n".join(md))
    return summary
