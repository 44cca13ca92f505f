"""`distill check`: every shipped recipe builds and runs one batch per stage, with no training."""

from pathlib import Path

import pytest

from distill.cli import main
from helpers import tiny_recipe

ROOT = Path(__file__).resolve().parents[1]
RECIPES = sorted(ROOT.glob("recipes/*.yaml"))
CIFAR = sorted((ROOT / "recipes" / "cifar100").glob("*.yaml"))

# CIFAR-100 is not on test machines: the generated stand-in has its shapes and 100 classes.
STANDIN = ["data.name=cifar100_standin", "data.init_args={n_train: 64, n_test: 32}", "data.num_workers=0"]
STANDIN_INDEXED = [
    "data.init_args={dataset: {name: cifar100_standin, init_args: {n_train: 64, n_test: 32}}}",
    "data.num_workers=0",
    "objective.terms.crd.init_args.n_data=64",
]


# Recipes whose teacher answers prompts: a few prompts, short answers, cached under data/.
CHAT_PROMPTS = [
    "data.init_args.max_train=4", "data.init_args.max_test=2", "data.init_args.val_fraction=0.0",
    "data.init_args.max_new_tokens=4", "data.init_args.answers=data/answers",
    f"data.init_args.path={ROOT / 'recipes' / 'data' / 'chat_prompts.jsonl'}",
]  # fmt: skip


def _overrides(path: Path) -> list[str]:
    if "name: chat_prompts" in path.read_text():
        return CHAT_PROMPTS
    if path.name == "compress_cifar.yaml" or (
        path.parent.name == "cifar100" and not path.stem.endswith("_crd")
    ):
        return STANDIN
    return STANDIN_INDEXED if path.parent.name == "cifar100" else []


def _check(path: Path, capsys, *extra: str) -> str:
    code = main(["check", str(path), *_overrides(path), *extra])
    out, err = capsys.readouterr()
    if code == 2 and ("apt-get install" in err or "pip install" in err):
        pytest.skip(f"needs what this machine lacks: {err.strip()}")
    if code == 2 and "folder runs/" in err:  # a recipe that starts from another recipe's run
        pytest.skip(f"needs another run's output first: {err.strip()}")
    if "benchmark:" in path.read_text():
        assert code == 2 and "not a recipe of a distill command" in err and err.count("\n") == 1
        return err
    assert code == 0, err
    return out


@pytest.mark.parametrize("path", RECIPES, ids=lambda p: p.name)
def test_check_every_recipe(path, capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    out = _check(path, capsys)
    if "benchmark:" not in path.read_text():
        assert "ok: every component built" in out and "preflight" in out and "parameters" in out
    # nothing trained, nothing written (a recipe's own data builder may generate its data under data/)
    assert not [p.name for p in tmp_path.iterdir() if p.name != "data"]


@pytest.mark.slow
@pytest.mark.parametrize("path", CIFAR, ids=lambda p: p.stem)
def test_check_every_cifar_recipe_on_the_stand_in(path, capsys):
    assert "preflight student_kd" in _check(path, capsys)


def test_check_prints_what_it_built(tmp_path, capsys):
    recipe = tmp_path / "r.yaml"
    recipe.write_text(tiny_recipe(tmp_path).to_yaml())
    assert main(["check", str(recipe)]) == 0
    out = capsys.readouterr().out
    for line in [
        "recipe: ",
        "data: digits: train 1,077, val 360, test 360, 10 classes; one batch: inputs (64, 1, 8, 8), targets (64,)",
        "teacher: cnn (SmallCNN), 1,442 parameters, trained first (2 epochs)",
        "student: mlp (MLP), 1,210 parameters",
        "objective: ce x0.5 (CrossEntropy), kd x0.5 (KD, needs the teacher)",
        "taps: student -, teacher -",
        "preflight teacher: ce ",
        "preflight student_scratch: ce ",
        "preflight student_kd: ce ",
    ]:
        assert line in out, line


@pytest.mark.parametrize(
    "override,message",
    [
        ("student.init_args.hiddn=[64]", "hiddn"),
        ("student.init_args.num_classes=5", "student_scratch (one-batch preflight, before any training)"),
        (
            "objective.terms.fit={name: fitnets, init_args: {student_layer: nope, teacher_layer: features.2}}",
            "nope",
        ),
        ("trainer.epoch=3", "did you mean 'trainer.epochs'"),
    ],
)
def test_check_mistakes_are_one_line_exit_2(tmp_path, capsys, override, message):
    recipe = tmp_path / "r.yaml"
    recipe.write_text(tiny_recipe(tmp_path).to_yaml())
    assert main(["check", str(recipe), override]) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1, err


def test_check_detects_each_commands_recipe():
    from distill.cli.check import recipe_kind

    assert recipe_kind({"teacher": {}, "student": {}}) == "run"
    assert recipe_kind({"compress": {}}) == "compress"
    assert recipe_kind({"search": {}}) == "tune"
    assert recipe_kind({"candidates": []}) == "teachers"
    assert recipe_kind({"assistants": []}) == "chain"
    assert recipe_kind({"clients": 5, "rounds": 2}) == "federated"
    assert recipe_kind({"benchmark": "lm_fortunes"}) == "benchmark"
