import json
from pathlib import Path

import pytest
import yaml

from distill import ConfigError
from distill.cli import build_parser, main
from distill.run.config import RecipeConfig, apply_overrides, load_recipe, load_yaml, parse_recipe
from helpers import skip_without_system_package, tiny_recipe

ROOT = Path(__file__).resolve().parents[1]


def test_digits_recipe_is_the_demo_default():
    assert load_recipe(ROOT / "recipes" / "digits.yaml") == RecipeConfig()


@pytest.mark.parametrize("path", sorted(ROOT.glob("recipes/*.yaml")), ids=lambda p: p.name)
def test_every_top_level_recipe_parses_and_builds(path, tmp_path):
    """Every shipped pipeline recipe validates and its models and objective build."""
    from distill.data.bundle import build_data
    from distill.models.build import build_model
    from distill.run.pipeline import build_objective

    raw = load_yaml(path)
    if set(raw) - set(RecipeConfig.model_fields):
        pytest.skip("recipe for another command (compress, tune, federated, ...) is tested with it")
    from distill.errors import DistillError
    from distill.run.hf import resolve_recipe

    cfg = resolve_recipe(load_recipe(path))  # what an hf teacher implies (tokenizer, task)
    if cfg.data.name == "chat_prompts":  # the teacher answers a few prompts briefly, cached in tmp
        small = {"max_train": 4, "max_test": 2, "val_fraction": 0.0, "max_new_tokens": 4}
        cfg.data.init_args.update(
            small, answers=str(tmp_path / "answers"), path=str(ROOT / cfg.data.init_args["path"])
        )
    try:
        data = skip_without_system_package(build_data, cfg.data.name, cfg.data.class_path, cfg.data.init_args)
        from distill.run.cross import teacher_data  # a teacher of another tokenizer reads its own

        teachers = [build_model(t.spec(), teacher_data(cfg, data)) for t in cfg.teachers or [cfg.teacher]]
    except DistillError as e:  # recipes on pip data not installed here, or on another run's output
        if "pip install" in str(e) or "folder runs/" in str(e):
            pytest.skip(str(e))
        raise
    build_model(cfg.student.spec(), data, teacher=teachers[0])
    build_objective(cfg)


@pytest.mark.parametrize(
    "override,message",
    [
        ("trainer.epoch=3", "unknown key 'trainer.epoch' (did you mean 'trainer.epochs'?)"),
        ("trainer.epochs=0", "trainer.epochs: Input should be greater than 0"),
        ("trainer.epochs=many", "trainer.epochs: Input should be a valid integer"),
        ("trainer.precision=fp8", "trainer.precision: 'fp8' is not one of"),
        (
            "objective.terms.kd.wieght=1",
            "unknown key 'objective.terms.kd.wieght' (did you mean 'objective.terms.kd.weight'?)",
        ),
        ("teacher.name=null", "teacher: Value error, give exactly one of 'name' or 'class_path'"),
        ("tranier.epochs=1", "unknown key 'tranier' (did you mean 'trainer'?)"),
    ],
)
def test_config_errors_name_the_key(override, message):
    with pytest.raises(ConfigError) as e:
        parse_recipe(apply_overrides(RecipeConfig().model_dump(mode="json"), [override]))
    assert message in str(e.value)
    assert "\n" not in str(e.value)


def test_yaml_not_a_mapping_and_object_tags(tmp_path):
    p = tmp_path / "r.yaml"
    p.write_text("- a\n- b\n")
    with pytest.raises(ConfigError, match="must hold a mapping"):
        load_yaml(p)
    p.write_text("name: !!python/object/apply:os.system ['touch PWNED']\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_yaml(p)
    assert not Path("PWNED").exists()
    with pytest.raises(ConfigError, match="not of the form"):
        apply_overrides({}, ["novalue"])


def test_overrides_parse_values():
    d = apply_overrides({"a": {"b": 1}}, ["a.b=2.5", "a.c=[1, 2]", "x.y=null", "s=hello"])
    assert d == {"a": {"b": 2.5, "c": [1, 2]}, "x": {"y": None}, "s": "hello"}


def test_resolved_config_reruns_as_is(tmp_path):
    cfg = tiny_recipe(tmp_path)
    again = parse_recipe(yaml.safe_load(cfg.to_yaml()))
    assert again == cfg


def test_help_is_complete(capsys):
    parser = build_parser()
    for cmd in ["demo", "run", "eval", "report"]:
        with pytest.raises(SystemExit):
            parser.parse_args([cmd, "--help"])
        out = capsys.readouterr().out
        assert "usage: distill " + cmd in out and len(out) > 200
    assert main([]) == 0


def _write_tiny(tmp_path) -> Path:
    p = tmp_path / "tiny.yaml"
    p.write_text(tiny_recipe(tmp_path).to_yaml())
    return p


def test_run_eval_report_and_run_folder_guards(tmp_path, capsys):
    recipe = _write_tiny(tmp_path)
    out = tmp_path / "run"
    assert main(["run", str(recipe), "--out", str(out)]) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert [r["name"] for r in summary["rows"]] == ["teacher", "student_scratch", "student_kd"]
    for r in summary["rows"]:
        assert {"accuracy", "params", "size_mb", "latency_ms_b1", "latency_ms_b64", "agreement"} <= set(r)
    for f in [
        "config.yaml",
        "metrics.jsonl",
        "report.md",
        "learning_curves.png",
        "tradeoff.png",
        "checkpoints/student_kd/final.safetensors",
        "checkpoints/teacher/final.safetensors",
    ]:
        assert (out / f).exists(), f
    capsys.readouterr()

    assert main(["eval", str(out)]) == 0
    ev = json.loads(capsys.readouterr().out)
    kd_row = summary["rows"][2]
    assert ev["accuracy"] == pytest.approx(kd_row["accuracy"]) and ev["agreement"] == pytest.approx(
        kd_row["agreement"]
    )

    (out / "report.md").unlink()
    assert main(["report", str(out)]) == 0 and (out / "report.md").exists()

    # a second run into the same folder is refused; --resume with another config too
    assert main(["run", str(recipe), "--out", str(out)]) == 2
    assert "already holds a run" in capsys.readouterr().err
    assert main(["run", str(recipe), "--out", str(out), "--resume", "teacher.train.epochs=3"]) == 2
    assert "config differs at teacher.train.epochs" in capsys.readouterr().err
    # --resume of a finished run redoes nothing and gives the same numbers
    assert main(["run", str(recipe), "--out", str(out), "--resume"]) == 0
    again = json.loads((out / "summary.json").read_text())
    assert [r["accuracy"] for r in again["rows"]] == [r["accuracy"] for r in summary["rows"]]
    assert main(["run", str(recipe), "--out", str(out), "--overwrite", "trainer.epochs=1"]) == 0


def test_eval_of_other_architecture_is_one_line_error(tmp_path, capsys):
    recipe = _write_tiny(tmp_path)
    out = tmp_path / "run"
    assert main(["run", str(recipe), "--out", str(out), "baselines=[]"]) == 0
    capsys.readouterr()
    ckpt = out / "checkpoints" / "teacher" / "final.safetensors"
    assert main(["eval", str(out), "--checkpoint", str(ckpt)]) == 2
    err = capsys.readouterr().err
    assert "does not fit MLP" in err and "another architecture" in err and err.count("\n") == 1


def test_missing_recipe_and_bad_seeds(tmp_path, capsys):
    assert main(["run", str(tmp_path / "nope.yaml")]) == 2
    assert "does not exist" in capsys.readouterr().err
    assert main(["demo", "--seeds", "0", "--out", str(tmp_path / "d")]) == 2
