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


def _norm(name: str) -> str:
    return name.lower().replace("-", "_")


def _pip_lacks(err: str) -> list[str]:
    """The distributions that the error's `pip install ...` would add and that are not installed
    (for `distill[extra]`, the extra's requirements; those the message names, when it names some)."""
    import importlib.metadata as md
    import re

    wanted = []
    for arg in re.findall(r"pip install ([^\s),;]+)", err):
        arg = arg.strip("'\"")
        extra = re.fullmatch(r"distill\[(\w+)\]", arg)
        if extra:
            reqs = md.requires("distill") or []
            wanted += [r for r in reqs if re.search(rf"extra == .{extra.group(1)}.", r)]
        else:
            wanted.append(arg)
    names = [re.match(r"[A-Za-z0-9_.-]+", w).group(0) for w in wanted]
    named = [n for n in names if _norm(n) in _norm(err.split("pip install")[0])]

    def installed(name: str) -> bool:
        try:
            md.version(name)
            return True
        except md.PackageNotFoundError:
            return False

    return [n for n in (named or names) if not installed(n)]


def _apt_lacks(err: str) -> list[str]:
    """The Debian packages the error's `apt-get install ...` names that dpkg does not list as installed."""
    import re
    import shutil
    import subprocess

    pkgs = [
        p
        for m in re.findall(r"apt-get install ((?:-\S+ )*[a-z0-9.+-]+)", err)
        for p in m.split()
        if p[0] != "-"
    ]
    if shutil.which("dpkg-query") is None:
        return pkgs  # cannot tell: taken as missing

    def installed(pkg: str) -> bool:
        status = subprocess.run(["dpkg-query", "-W", "-f=${Status}", pkg], capture_output=True, text=True)
        return (
            status.returncode == 0
            and status.stdout.endswith("installed")
            and "not-installed" not in status.stdout
        )

    from helpers import debian_hidden

    hidden = debian_hidden()  # installed, but hidden from this session as on a fresh machine
    return [p for p in pkgs if p in hidden or not installed(p)]


def _check(path: Path, capsys, *extra: str) -> str:
    code = main(["check", str(path), *_overrides(path), *extra])
    out, err = capsys.readouterr()
    if code == 2 and ("apt-get install" in err or "pip install" in err):
        # a skip only for what this machine really lacks; an install that is there but fails is a
        # broken install, and that fails the test
        lacks = _apt_lacks(err) + _pip_lacks(err)
        assert lacks, f"it asks for an install that is there (a broken install): {err.strip()}"
        pytest.skip(f"needs {', '.join(lacks)}, which this machine lacks: {err.strip()}")
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


@pytest.mark.parametrize(
    "overrides,message",
    [
        # mixing needs a store of mixed views (refused by run only after the teacher trained)
        (["trainer.mix={name: cutmix}", "teacher.cache=STORE"], "trainer.mix with teacher.cache"),
        # a store with a transfer set is allowed, but it must exist (cache-teacher writes both sets)
        (["data.transfer={name: digits}", "teacher.cache=STORE"], "store is not a teacher store"),
        # a term that needs class indices cannot learn from mixed labels (refused at the kd stage)
        (
            ["trainer.mix={name: mixup}", "objective.terms={dkd: {name: dkd}}"],
            "student_kd (one-batch preflight, before any training): trainer.mix: a mixed batch carries mixed labels",
        ),
        (["teacher.use=5"], "teacher.use: epoch 5 is past the teacher's 2 training epochs"),
        (
            ["data.transfer={name: cifar100_standin, init_args: {n_train: 8, n_test: 4}}"],
            "data.transfer: its inputs have shape (3, 32, 32) but the training data's have (1, 8, 8)",
        ),
    ],
    ids=["mix_cache", "transfer_cache", "mix_dkd", "use_epoch", "transfer_shape"],
)
def test_check_refuses_what_run_refuses_before_anything_trains(tmp_path, capsys, overrides, message):
    from distill.errors import DistillError
    from distill.run.config import apply_overrides, parse_recipe
    from distill.run.pipeline import run_recipe

    overrides = [o.replace("STORE", str(tmp_path / "store")) for o in overrides]
    recipe = tmp_path / "r.yaml"
    recipe.write_text(tiny_recipe(tmp_path).to_yaml())
    assert main(["check", str(recipe), *overrides]) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1, err
    cfg = parse_recipe(apply_overrides(tiny_recipe(tmp_path).model_dump(mode="json"), overrides))
    with pytest.raises(DistillError) as e:
        run_recipe(cfg, tmp_path / "run")
    assert message.split(": ", 1)[-1] in str(e.value)
    # refused before any training: no stage wrote a checkpoint or a metrics line
    assert not (tmp_path / "run" / "checkpoints").exists()
    metrics = tmp_path / "run" / "metrics.jsonl"
    assert not metrics.exists() or not metrics.read_text().strip()
