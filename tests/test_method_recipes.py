"""Every shipped method recipe parses and builds; a CIFAR recipe runs end to end on the stand-in."""

from __future__ import annotations

from pathlib import Path

import pytest

from distill.data.bundle import build_data
from distill.models.build import build_model
from distill.run.config import load_recipe
from distill.run.pipeline import build_objective, run_recipe

RECIPES = Path(__file__).resolve().parents[1] / "recipes"
METHOD_RECIPES = sorted(RECIPES.glob("digits_*.yaml")) + sorted((RECIPES / "cifar100").glob("*.yaml"))

# CIFAR is not on test machines: swap in the generated stand-in (same shapes, 100 classes).
STANDIN = ["data.name=cifar100_standin", "data.init_args={n_train: 64, n_test: 32}", "data.num_workers=0"]
STANDIN_INDEXED = [
    "data.init_args={dataset: {name: cifar100_standin, init_args: {n_train: 64, n_test: 32}}}",
    "data.num_workers=0",
]


def _overrides(path: Path) -> list[str]:
    if path.parent.name != "cifar100":
        return []
    return (
        STANDIN_INDEXED + ["objective.terms.crd.init_args.n_data=64"]
        if path.stem.endswith("_crd")
        else STANDIN
    )


def test_method_recipes_exist():
    assert len(list(RECIPES.glob("digits_*.yaml"))) >= 13
    assert len(list((RECIPES / "cifar100").glob("*.yaml"))) == 44


@pytest.mark.slow
@pytest.mark.parametrize("path", METHOD_RECIPES, ids=lambda p: f"{p.parent.name}/{p.stem}")
def test_recipe_parses_and_builds(path):
    cfg = load_recipe(path, _overrides(path))
    data = build_data(cfg.data.name, cfg.data.class_path, cfg.data.init_args, seed=cfg.seed)
    build_model(cfg.teacher.spec(), data)
    build_model(cfg.student.spec(), data)
    objective = build_objective(cfg)
    assert objective.terms


@pytest.mark.slow
def test_cifar_crd_recipe_runs_a_step_on_the_standin(tmp_path):
    path = RECIPES / "cifar100" / "resnet32x4_resnet8x4_crd.yaml"
    steps = [
        "teacher.train.epochs=1",
        "teacher.train.max_steps=1",
        "trainer.epochs=1",
        "trainer.max_steps=1",
        "trainer.progress='off'",
        "teacher.train.progress='off'",
        "objective.terms.crd.init_args.nce_k=64",
        "baselines=[]",
        "report.latency_batch_sizes=[1]",
        "report.latency_repeats=2",
        "data.batch_size=8",
    ]
    cfg = load_recipe(path, _overrides(path) + steps)
    summary = run_recipe(cfg, tmp_path / "run")
    names = [r["name"] for r in summary["rows"]]
    assert names == ["teacher", "student_kd"]
    assert 0.0 <= summary["rows"][1]["accuracy"] <= 1.0
