"""`distill eval TARGET`: score a checkpoint on a recipe's data with the recipe's evaluator."""

from __future__ import annotations

import json
from pathlib import Path

from distill.errors import DistillError


def add_parser(sub) -> None:
    p = sub.add_parser(
        "eval",
        help="score a checkpoint on a recipe's data",
        description="Evaluates a checkpoint (default: the run's distilled student) on the "
        "test split of the run's recipe with the recipe's evaluator and adapters (accuracy, NLL, "
        "perplexity, mAP, ... and agreement with the run's teacher). On a --seeds N folder, scores "
        "every seed and their mean. Prints JSON.",
    )
    p.add_argument("target", help="a run folder (holding config.yaml) or a recipe YAML file")
    p.add_argument("--checkpoint", help="weights to score (.safetensors, or a weights-only torch file)")
    p.add_argument(
        "--model",
        choices=["student", "teacher"],
        default="student",
        help="which architecture of the recipe the checkpoint is (default student)",
    )
    p.add_argument("--split", choices=["train", "val", "test"], default="test")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="dotted overrides of recipe keys")


def main(args) -> int:
    from distill.run.config import apply_overrides, load_yaml, parse_recipe
    from distill.run.pipeline import evaluate_checkpoint

    target = Path(args.target)
    run_dir = target if target.is_dir() else None
    recipe = target / "config.yaml" if run_dir else target
    if run_dir and not recipe.exists():
        raise DistillError(f"{target} has no config.yaml: give a run folder or a recipe file")
    seed_dirs = _seed_dirs(run_dir) if run_dir and args.checkpoint is None else []
    if seed_dirs:  # a `--seeds N` folder: score every seed's checkpoint, and their mean
        per_seed = []
        for d in seed_dirs:
            cfg = parse_recipe(apply_overrides(load_yaml(d / "config.yaml"), args.overrides), source=str(d))
            per_seed.append({"seed": cfg.seed, **evaluate_checkpoint(cfg, d, None, args.model, args.split)})
        print(json.dumps({**_mean(per_seed), "split": args.split, "seeds": per_seed}, indent=2))
        return 0
    cfg = parse_recipe(apply_overrides(load_yaml(recipe), args.overrides), source=str(recipe))
    metrics = evaluate_checkpoint(cfg, run_dir, args.checkpoint, args.model, args.split)
    print(json.dumps(metrics, indent=2))
    return 0


def _seed_dirs(run_dir: Path) -> list[Path]:
    """The per-seed run folders (`seed0/`, `seed1/`, ...) of a `--seeds N` run, in seed order."""
    if (run_dir / "checkpoints").exists():
        return []
    found = [d for d in run_dir.glob("seed*") if d.name[4:].isdigit() and (d / "config.yaml").exists()]
    return sorted(found, key=lambda d: int(d.name[4:]))


def _mean(rows: list[dict]) -> dict:
    """Each numeric metric's mean over seeds (ints every seed agrees on, such as params, stay as is)."""
    out: dict = {}
    for k, v in rows[0].items():
        if k == "seed" or isinstance(v, bool) or not isinstance(v, int | float):
            continue
        vals = [r[k] for r in rows if k in r]
        out[k] = v if all(x == v for x in vals) and isinstance(v, int) else sum(vals) / len(vals)
    return out
