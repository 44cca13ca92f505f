"""Issue 18: what cost a new user a retrain or left clutter, each reproduced and fixed."""

import json
from pathlib import Path

import pytest
import yaml

from distill import ConfigError, DistillError
from distill.cli import main
from distill.run.config import load_yaml
from distill.run.rundir import RunDir
from helpers import tiny_recipe


def _write(tmp_path, cfg, name="tiny.yaml") -> Path:
    p = tmp_path / name
    p.write_text(cfg.to_yaml())
    return p


# --------------------------------------------------------------------------- bug 2: empty recipes


def test_empty_or_near_empty_recipe_is_an_error_naming_what_is_missing(tmp_path, capsys):
    empty = tmp_path / "empty.yaml"
    empty.write_text("")
    with pytest.raises(ConfigError, match="is empty: a recipe names at least its teacher: and student:"):
        load_yaml(empty)
    assert main(["run", str(empty), "--out", str(tmp_path / "r")]) == 2
    err = capsys.readouterr().err
    assert "is empty" in err and err.count("\n") == 1
    assert not (tmp_path / "r").exists()  # nothing trained, nothing written

    near = tmp_path / "near.yaml"
    near.write_text("name: mine\nteacher: {name: cnn}\n")
    assert main(["run", str(near), "--out", str(tmp_path / "r")]) == 2
    err = capsys.readouterr().err
    assert "missing: student" in err and err.count("\n") == 1


# --------------------------------------------------------------------------- bug 3: failed runs


def test_a_run_that_failed_before_finishing_anything_is_reclaimed(tmp_path, capsys):
    recipe = _write(
        tmp_path, tiny_recipe(tmp_path, **{"teacher.class_path": "nowhere.Model", "teacher.name": "null"})
    )
    out = tmp_path / "run"
    assert main(["run", str(recipe), "--out", str(out)]) == 2
    assert not out.exists()  # a failed start leaves no half-made run folder (issue 28 #4)
    capsys.readouterr()
    # the rerun meets the same error again, not "already holds a run"
    assert main(["run", str(recipe), "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert "already holds" not in err and "nowhere" in err

    # the folder of a run killed before it finished anything is reclaimed; one with a finished
    # stage is still protected
    with RunDir(out, "name: killed\n"):
        pass
    (out / "checkpoints" / "teacher").mkdir(parents=True)
    (out / "checkpoints" / "teacher" / "final.safetensors").write_bytes(b"x")
    with pytest.raises(DistillError, match="already holds a run"):
        RunDir(out, "name: other\n")
    # a folder with only the config, the log and TensorBoard files is reclaimed, emptied
    (out / "checkpoints" / "teacher" / "final.safetensors").unlink()
    (out / "metrics.jsonl").write_text('{"stage": "teacher", "step": 1}\n')
    (out / "tensorboard" / "teacher").mkdir(parents=True)
    (out / "tensorboard" / "teacher" / "events").write_text("x")
    with RunDir(out, "name: other\n"):
        assert sorted(p.name for p in out.iterdir()) == [".distill-run", ".lock", "config.yaml"]
    assert yaml.safe_load((out / "config.yaml").read_text()) == {"name": "other"}


# --------------------------------------------------------------------------- bug 6: threads


def test_trainer_threads_reach_the_teachers_own_training(tmp_path):
    import torch

    from distill.engine.trainer import use_callbacks
    from distill.run.pipeline import run_recipe

    seen = {}

    class Threads:
        def on_evaluate(self, trainer, metrics):
            seen[trainer.stage] = torch.get_num_threads()

    before = torch.get_num_threads()
    torch.set_num_threads(2)
    cfg = tiny_recipe(tmp_path, **{"trainer.threads": 1, "teacher.train.threads": "null", "baselines": "[]"})
    assert cfg.teacher.train.threads is None
    try:
        with use_callbacks(Threads()):
            run_recipe(cfg, tmp_path / "run")
    finally:
        torch.set_num_threads(before)
    assert seen == {"teacher": 1, "student_kd": 1}


# --------------------------------------------------------------------------- bugs 1 and 7: distill eval


def _kd_row(summary):
    return next(r for r in summary["rows"] if r["name"] == "student_kd")


def test_eval_uses_the_recipes_evaluator(tmp_path, capsys):
    """`distill eval` scored with plain accuracy whatever the recipe's evaluator (LM: no perplexity)."""
    cfg = tiny_recipe(
        tmp_path, **{"evaluator": "{name: perplexity, init_args: {shift: false}}", "baselines": "[]"}
    )
    recipe, out = _write(tmp_path, cfg), tmp_path / "run"
    assert main(["run", str(recipe), "--out", str(out)]) == 0
    row = _kd_row(json.loads((out / "summary.json").read_text()))
    capsys.readouterr()
    assert main(["eval", str(out)]) == 0
    ev = json.loads(capsys.readouterr().out)
    assert "perplexity" in ev
    for k in ("perplexity", "nll", "accuracy", "agreement"):
        assert ev[k] == pytest.approx(row[k]), k


def test_eval_scores_every_seed_of_a_multi_seed_run(tmp_path, capsys):
    recipe, out = _write(tmp_path, tiny_recipe(tmp_path, baselines="[]")), tmp_path / "run"
    assert main(["run", str(recipe), "--out", str(out), "--seeds", "2"]) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert all(isinstance(r["params"], int) for r in summary["rows"])  # was written as a float
    capsys.readouterr()
    assert main(["eval", str(out)]) == 0
    ev = json.loads(capsys.readouterr().out)
    assert [s["seed"] for s in ev["seeds"]] == [0, 1]
    per_seed = [_kd_row(json.loads((out / f"seed{k}" / "summary.json").read_text())) for k in (0, 1)]
    for s, row in zip(ev["seeds"], per_seed):
        assert s["accuracy"] == pytest.approx(row["accuracy"])
    assert ev["accuracy"] == pytest.approx(sum(r["accuracy"] for r in per_seed) / 2)
    assert ev["params"] == per_seed[0]["params"]
    # a folder without a finished student names what is missing
    empty = tmp_path / "unfinished"
    (empty / "checkpoints").mkdir(parents=True)
    (empty / "config.yaml").write_text((out / "seed0" / "config.yaml").read_text())
    assert main(["eval", str(empty)]) == 2
    assert "has no finished student_kd" in capsys.readouterr().err


# --------------------------------------------------------------------------- bug 8: Debian extras


def test_recipe_tests_skip_without_espeak_ng_naming_the_install(monkeypatch, tmp_path):
    """On a fresh machine without espeak-ng the README's test command raised instead of skipping."""
    import shutil

    from test_config_cli import test_every_top_level_recipe_parses_and_builds

    real = shutil.which
    monkeypatch.setattr(
        shutil, "which", lambda name, *a, **k: None if name == "espeak-ng" else real(name, *a, **k)
    )
    root = Path(__file__).resolve().parents[1]
    with pytest.raises(pytest.skip.Exception, match="apt-get install espeak-ng"):
        test_every_top_level_recipe_parses_and_builds(root / "recipes" / "speech_digits.yaml", tmp_path)


TEXT_RECIPES = ["fortune_topics.yaml", "lm_fortunes.yaml", "minilm_embeddings.yaml", "fortune_chat.yaml"]


@pytest.mark.parametrize("recipe", TEXT_RECIPES)
def test_text_recipes_build_without_debian_packages(recipe, monkeypatch, tmp_path):
    """issue 28.1: on a fresh machine (no Debian fortunes) the text recipes failed to build their
    data, and the README's test command ended in failures; their text now ships with distill."""
    from helpers import hide_debian_packages
    from test_config_cli import test_every_top_level_recipe_parses_and_builds

    hide_debian_packages(monkeypatch)
    assert not Path("/usr/share/games/fortunes").is_dir()
    root = Path(__file__).resolve().parents[1]
    test_every_top_level_recipe_parses_and_builds(root / "recipes" / recipe, tmp_path)


def test_nothing_reads_the_debian_fortunes_folder():
    """Recipes, code, benchmarks and tests name the bundled corpus, never the package's folder
    (only the script that extracts the corpus from it, and the test that compares the two)."""
    root = Path(__file__).resolve().parents[1]
    allowed = {"benchmarks/make_fortune_corpus.py", "tests/helpers.py", "tests/test_first_hour.py"}
    found = [
        str(p.relative_to(root))
        for folder in ("recipes", "src", "benchmarks", "tests")
        for p in (root / folder).rglob("*")
        if p.suffix in (".py", ".yaml") and "/usr/share/games/fortunes" in p.read_text(errors="replace")
    ]
    assert sorted(set(found) - allowed) == []


def test_the_bundled_corpus_reads_as_the_debian_package():
    """Every builder the recipes use gives the same texts on the shipped copy as on the package."""
    from distill.data.text import FORTUNES_DIR, fortune_dialogues, fortunes, load_texts

    debian = Path("/usr/share/games/fortunes")
    if not debian.is_dir():
        pytest.skip("compares with Debian's fortunes: apt-get install -y fortunes")
    from distill.nlp.text_data import _read_records

    assert fortunes(FORTUNES_DIR) == fortunes(debian)
    assert fortune_dialogues(FORTUNES_DIR) == fortune_dialogues(debian)

    def passages(texts, top):
        return [t for t in (" ".join(x.split()) for x in texts) if 20 <= len(t) <= top]

    assert passages(load_texts("bundled:fortunes"), 400) == passages(load_texts(debian), 400)
    ours, theirs = _read_records(FORTUNES_DIR)[0], _read_records(debian)[0]
    assert [(t, r["label"]) for r in ours for t in passages([r["text"]], 300)] == [
        (t, r["label"]) for r in theirs for t in passages([r["text"]], 300)
    ]


@pytest.mark.parametrize("recipe", ["fortune_topics.yaml", "lm_fortunes.yaml"])
@pytest.mark.parametrize("command", ["check", "run"])
def test_a_text_recipe_without_the_nlp_extra_names_the_install(
    recipe, command, monkeypatch, capsys, tmp_path
):
    """issue 28.7: without the nlp extra a text recipe ended in `ModuleNotFoundError: No module
    named 'transformers'`; vision builders already named their extra."""
    import sys

    for module in ("transformers", "tokenizers", "sentence_transformers"):
        monkeypatch.setitem(sys.modules, module, None)  # `import transformers` now fails as if absent
    root = Path(__file__).resolve().parents[1]
    out = ["--out", str(tmp_path / "run")] if command == "run" else []
    assert main([command, str(root / "recipes" / recipe), *out]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.endswith("is not installed: pip install 'distill[nlp]'\n"), err


@pytest.mark.parametrize("command", ["check", "run"])
def test_a_typo_inside_init_args_is_named_before_anything_is_built(command, tmp_path, capsys, monkeypatch):
    """issue 28.8: `kd: {init_args: {temprature: 2}}` got no "did you mean" and surfaced only after
    the teacher had loaded."""
    import distill.run.pipeline as pipeline

    def no_build(*a, **k):
        raise AssertionError("built data before checking init_args")

    monkeypatch.setattr(pipeline, "build_data", no_build)
    recipe = tmp_path / "r.yaml"
    recipe.write_text(tiny_recipe(tmp_path).to_yaml())
    out = ["--out", str(tmp_path / "run")] if command == "run" else []
    assert main([command, str(recipe), "objective.terms.kd.init_args.temprature=2", *out]) == 2
    err = capsys.readouterr().err
    assert err == (
        f"distill {command}: error: unknown key 'objective.terms.kd.init_args.temprature' (did you mean "
        "'objective.terms.kd.init_args.temperature'?); kd (KD) takes: temperature, form\n"
    )
    assert not (tmp_path / "run").exists()


def test_init_args_of_a_builder_taking_kwargs_are_not_checked(tmp_path, monkeypatch):
    from distill.run.config import apply_overrides, parse_recipe
    from distill.run.preflight import check_init_args

    (tmp_path / "loose.py").write_text(
        "from distill.models.small import MLP\n"
        "def student(num_classes=10, **kwargs):\n    return MLP(64, num_classes, hidden=[8])\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    cfg = tiny_recipe(tmp_path)
    data = apply_overrides(
        cfg.model_dump(mode="json"), ["student={class_path: loose.student, init_args: {anything: 1}}"]
    )
    check_init_args(parse_recipe(data))  # **kwargs: any key may be meant for what it calls
    data = apply_overrides(
        data, ["student.init_args={num_clases: 3}", "student.class_path=distill.models.small.MLP"]
    )
    with pytest.raises(ConfigError, match="did you mean 'student.init_args.num_classes'"):
        check_init_args(parse_recipe(data))


def test_an_unknown_bundled_corpus_is_one_line():
    from distill.data.text import load_texts

    with pytest.raises(
        DistillError, match="unknown bundled corpus 'bundled:fortune'; the bundled corpora are"
    ):
        load_texts("bundled:fortune")


# --------------------------------------------------------------------------- bug 4: mistakes before training


@pytest.mark.parametrize(
    "override,message",
    [
        ("student.init_args.hiddn=[64]", "hiddn"),
        ("evaluator={name: perplexty}", "perplexty"),
        # builds, but the student's 5 classes meet the teacher's 10 only in the first batch
        ("student.init_args.num_classes=5", "student_scratch (one-batch preflight, before any training)"),
    ],
)
def test_student_objective_and_evaluator_mistakes_fail_before_the_teacher_trains(
    tmp_path, capsys, override, message
):
    recipe, out = _write(tmp_path, tiny_recipe(tmp_path)), tmp_path / "run"
    assert main(["run", str(recipe), "--out", str(out), override]) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1, err
    assert not (out / "checkpoints" / "teacher").exists()  # the teacher never started


def test_a_finished_teacher_is_reused_when_only_later_sections_change(tmp_path, capsys):
    recipe, out = _write(tmp_path, tiny_recipe(tmp_path, baselines="[]")), tmp_path / "run"
    assert main(["run", str(recipe), "--out", str(out)]) == 0
    final = out / "checkpoints" / "teacher" / "final.safetensors"
    before = final.read_bytes(), final.stat().st_mtime_ns

    def teacher_lines():
        lines = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
        return [r for r in lines if r["stage"] == "teacher"]

    t_lines = teacher_lines()
    capsys.readouterr()
    # the fixed student and a new temperature: the teacher stage is kept, the student redone
    fixes = ["student.init_args.hidden=[24]", "objective.terms.kd.init_args.temperature=2"]
    assert main(["run", str(recipe), "--out", str(out), "--resume", *fixes]) == 0
    assert "reusing the finished teacher stage" in capsys.readouterr().err
    assert (final.read_bytes(), final.stat().st_mtime_ns) == before
    assert teacher_lines() == t_lines
    summary = json.loads((out / "summary.json").read_text())
    student = yaml.safe_load((out / "config.yaml").read_text())["student"]
    assert (
        student["init_args"]["hidden"] == [24]
        and summary["rows"][1]["params"] != summary["rows"][0]["params"]
    )
    kd_lines = [x for x in (out / "metrics.jsonl").read_text().splitlines() if '"student_kd"' in x]
    assert len(kd_lines) == len(set(kd_lines))  # the old student's lines are gone, not mixed in
    # a change to what the teacher learns from is still refused
    assert (
        main(
            [
                "run",
                str(recipe),
                "--out",
                str(out),
                "--resume",
                *fixes,
                "objective.terms.ce.init_args.label_smoothing=0.1",
            ]
        )
        == 2
    )
    assert "config differs at objective.terms.ce" in capsys.readouterr().err


# --------------------------------------------------------------------------- bug 9: a useless teacher


def test_a_teacher_at_chance_is_flagged_in_the_log_and_the_report(tmp_path, capsys):
    over = {"teacher.train.epochs": 1, "teacher.train.optimizer.lr": 1e-7, "trainer.epochs": 1}
    recipe, out = _write(tmp_path, tiny_recipe(tmp_path, **over)), tmp_path / "run"
    assert main(["run", str(recipe), "--out", str(out)]) == 0
    summary = json.loads((out / "summary.json").read_text())
    teacher = summary["rows"][0]
    assert teacher["accuracy"] < 0.15  # 10 classes: chance is 0.1
    assert any("at chance" in w for w in summary["warnings"])
    assert "warning: the teacher's accuracy" in capsys.readouterr().err
    assert "**Warning:** the teacher's accuracy" in (out / "report.md").read_text()


def test_teacher_warnings_rules():
    from distill.run.pipeline import teacher_warnings

    def rows(t, s):
        return [{"name": "teacher", "accuracy": t}, {"name": "student_scratch", "accuracy": s}]

    assert teacher_warnings(rows(0.98, 0.95), 10) == []
    assert "not clearly better" in teacher_warnings(rows(0.955, 0.95), 10)[0]
    assert "at chance" in teacher_warnings(rows(0.11, 0.5), 10)[0]
    lm = [
        {"name": "teacher", "perplexity": 20.0, "accuracy": 0.2},
        {"name": "student_scratch", "perplexity": 19.0},
    ]
    assert len(teacher_warnings(lm, 2000)) == 1 and "perplexity" in teacher_warnings(lm, 2000)[0]


def test_students_at_chance_are_named_with_the_likely_cause(capsys):
    """issue 28.6: the docs' image-folder example gave a teacher at 0.69 and both students at 0.25
    (chance for 4 classes) without a word."""
    from distill.run.pipeline import note_teacher_warnings

    def losses(stage, first, last):
        return [
            {"stage": stage, "split": "train", "step": s, "loss": v} for s, v in ((10, first), (80, last))
        ]

    rows = [
        {"name": "teacher", "accuracy": 0.69},
        {"name": "student_scratch", "accuracy": 0.25},
        {"name": "student_kd", "accuracy": 0.2667},
    ]
    summary = {"rows": rows}
    note_teacher_warnings(summary, 4, losses("student_scratch", 1.4, 0.3) + losses("student_kd", 1.4, 1.35))
    scratch, kd = summary["warnings"]
    assert scratch.startswith(
        "student_scratch's accuracy 0.2500 is at chance (0.2500 for 4 classes) although"
    )
    assert "fell from 1.4 to 0.3 in 80 steps" in scratch and "BatchNorm" in scratch
    assert kd.startswith("student_kd's accuracy 0.2667 is at chance") and "hardly fell" in kd
    assert capsys.readouterr().err.count("distill: warning: student_") == 2
    fine = {"rows": [{"name": "teacher", "accuracy": 0.69}, {"name": "student_kd", "accuracy": 0.5}]}
    note_teacher_warnings(fine, 4, [])
    assert "warnings" not in fine


def test_reuse_keeps_only_the_named_stages_and_nested_seed_folders(tmp_path):
    out = tmp_path / "run"
    with RunDir(out, "a: 1\n"):
        for stage in ("teacher", "student_kd"):
            (out / "checkpoints" / stage).mkdir(parents=True)
            (out / "checkpoints" / stage / "final.safetensors").write_bytes(b"x")
        (out / "metrics.jsonl").write_text(
            '{"stage": "teacher", "step": 1}\n{"stage": "student_kd", "step": 1}\n'
        )
        (out / "summary.json").write_text("{}")
        (out / "seed1").mkdir()
        (out / "seed1" / "config.yaml").write_text("a: 1\n")
    with pytest.raises(DistillError, match="config differs at a"):
        RunDir(out, "a: 2\n", resume=True, reusable=lambda saved: [])
    with RunDir(out, "a: 2\n", resume=True, reusable=lambda saved: ["teacher"] if saved == {"a": 1} else []):
        pass
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["teacher"]
    assert (out / "metrics.jsonl").read_text() == '{"stage": "teacher", "step": 1}\n'
    assert not (out / "summary.json").exists() and (out / "seed1" / "config.yaml").exists()
    assert yaml.safe_load((out / "config.yaml").read_text()) == {"a": 2}
