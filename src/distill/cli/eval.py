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
        "test split of the run's recipe: accuracy, NLL and agreement with the "
        "run's teacher. Prints JSON.",
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
    cfg = parse_recipe(apply_overrides(load_yaml(recipe), args.overrides), source=str(recipe))
    metrics = evaluate_checkpoint(cfg, run_dir, args.checkpoint, args.model, args.split)
    print(json.dumps(metrics, indent=2))
    return 0
