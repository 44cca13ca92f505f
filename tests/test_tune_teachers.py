"""`distill tune` over a recipe with `teachers:` (the ensemble's rule, tau and member weights in the
search space) and over a language-model recipe (perplexity, minimised)."""

from __future__ import annotations

import json

import pytest
import torch
import yaml

from distill.errors import ConfigError, DistillError
from distill.run.config import parse_recipe

optuna = pytest.importorskip("optuna", reason="pip install 'distill[tune]'")

from distill import tune  # noqa: E402

MEMBER = {"name": "mlp", "train": {"epochs": 1, "progress": "off", "tensorboard": False}}


def _ensemble_recipe(**search) -> dict:
    return {
        "name": "tiny_ens",
        "data": {"name": "digits", "init_args": {"train_limit": 200}, "batch_size": 64},
        "teachers": [
            {**MEMBER, "init_args": {"hidden": [32]}},
            {**MEMBER, "init_args": {"hidden": [24, 24]}},
        ],
        "ensemble": {"rule": "mean_probs"},
        "student": {"name": "mlp", "init_args": {"hidden": [16]}},
        "trainer": {"epochs": 2, "progress": "off", "tensorboard": False},
        "report": {"latency_batch_sizes": [1], "latency_repeats": 2},
        "search": search
        or {
            "ensemble.rule": {"type": "categorical", "choices": ["mean_logits", "mean_probs", "entropy"]},
            "ensemble.tau": {"type": "float", "low": 0.5, "high": 4.0, "log": True},
            "ensemble.weights.0": {"type": "float", "low": 0.1, "high": 1.0},
            "ensemble.weights.1": {"type": "float", "low": 0.1, "high": 1.0},
        },
        "tune": {"seed": 0, "pruner": "none"},
    }


def test_ensemble_study_trains_each_teacher_once_and_samples_how_they_combine(tmp_path):
    cfg = tune.parse_tune_recipe(_ensemble_recipe())
    assert cfg.base_data()["ensemble"]["weights"] == [1.0, 1.0] and "teacher" not in cfg.base_data()
    out = tmp_path / "study"
    summary = tune.run_tune(cfg, out, trials=2, log=lambda *_: None)
    assert [r["state"] for r in summary["rows"]] == ["complete", "complete"]
    assert (out / "teacher0.safetensors").exists() and (out / "teacher1.safetensors").exists()
    for r in summary["rows"]:
        ran = yaml.safe_load((out / "trials" / str(r["number"]) / "config.yaml").read_text())
        ps = r["params_searched"]
        assert ran["ensemble"]["rule"] == ps["ensemble.rule"]
        assert ran["ensemble"]["tau"] == pytest.approx(ps["ensemble.tau"])
        assert ran["ensemble"]["weights"] == pytest.approx(
            [ps["ensemble.weights.0"], ps["ensemble.weights.1"]]
        )
        assert [t["checkpoint"] for t in ran["teachers"]] == [
            str((out / f"teacher{i}.safetensors").resolve()) for i in range(2)
        ]
        assert all(t["train"] is None for t in ran["teachers"])
    mtimes = [(out / f"teacher{i}.safetensors").stat().st_mtime_ns for i in range(2)]
    tune.run_tune(cfg, out, trials=3, log=lambda *_: None)  # continued: the teachers are reused
    assert [(out / f"teacher{i}.safetensors").stat().st_mtime_ns for i in range(2)] == mtimes
    best = yaml.safe_load((out / "best_recipe.yaml").read_text())
    parse_recipe(best)  # runs as is
    assert "teachers[1].checkpoint" in (out / "best_recipe.yaml").read_text()


@pytest.mark.parametrize(
    "search, message",
    [
        ({"teachers.0.train.epochs": {"type": "int", "low": 1, "high": 3}}, "trained once and shared"),
        ({"ensemble.weights.2": {"type": "float", "low": 0.1, "high": 1.0}}, "unknown recipe key"),
        ({"ensemble.rule": {"type": "categorical", "choices": ["mean", "entropy"]}}, "'mean' is not one of"),
    ],
)
def test_ensemble_search_mistakes_are_one_line(search, message):
    with pytest.raises(ConfigError, match=message) as e:
        tune.parse_tune_recipe(_ensemble_recipe(**search))
    assert "\n" not in str(e.value)


def test_member_weights_scale_the_rule():
    from distill.outputs import Batch
    from distill.teachers.ensemble import Ensemble

    torch.manual_seed(0)
    a, b = torch.nn.Linear(4, 3), torch.nn.Linear(4, 3)
    x = Batch(inputs=torch.randn(5, 4))
    only_a = Ensemble([a, b], rule="mean_logits", weights=[1.0, 0.0])(x).logits
    torch.testing.assert_close(only_a, a(x.inputs))
    mixed = Ensemble([a, b], rule="mean_probs", weights=[3.0, 1.0])(x).logits
    want = 0.75 * a(x.inputs).softmax(-1) + 0.25 * b(x.inputs).softmax(-1)
    torch.testing.assert_close(mixed.softmax(-1), want, rtol=1e-5, atol=1e-6)
    ent = Ensemble([a, b], rule="entropy", weights=[1.0, 1.0])(x).extras["member_weights"]
    torch.testing.assert_close(ent, Ensemble([a, b], rule="entropy")(x).extras["member_weights"])
    with pytest.raises(DistillError, match="one weight >= 0 per member"):
        Ensemble([a, b], weights=[1.0])
    with pytest.raises(ConfigError, match="2 weights for 3 teachers"):
        recipe = _ensemble_recipe()
        recipe["teachers"].append(recipe["teachers"][0])
        recipe["ensemble"]["weights"] = [1.0, 2.0]
        tune.parse_tune_recipe(recipe)


# --------------------------------------------------------------------------- a language model


def _lm_recipe(tmp_path) -> dict:
    import random

    rng = random.Random(0)
    words = [
        "the",
        "cat",
        "sat",
        "on",
        "a",
        "mat",
        "and",
        "a",
        "dog",
        "ran",
        "far",
        "away",
        "with",
        "happy",
        "people",
        "every",
        "day",
    ]
    texts = [" ".join(rng.choice(words) for _ in range(rng.randint(8, 20))) for _ in range(120)]
    (tmp_path / "lm.txt").write_text("\n\n".join(texts))
    gpt2 = {"model_type": "gpt2", "n_layer": 1, "n_head": 2, "n_positions": 16}
    run = {"progress": "off", "tensorboard": False, "threads": 1}
    return {
        "name": "tiny_lm",
        "data": {
            "name": "text",
            "init_args": {
                "path": str(tmp_path / "lm.txt"),
                "tokenizer": {"train": {"vocab_size": 120, "kind": "bpe"}},
                "block_size": 16,
                "val_fraction": 0.1,
            },
            "batch_size": 8,
        },
        "teacher": {
            "name": "hf",
            "init_args": {"task": "causal_lm", "config": {**gpt2, "n_embd": 16}},
            "train": {"epochs": 1, "max_steps": 4, **run},
        },
        "student": {"name": "hf", "init_args": {"task": "causal_lm", "config": {**gpt2, "n_embd": 8}}},
        "objective": {
            "terms": {"ce": {"name": "lm_ce", "weight": 0.5}, "kd": {"name": "fkl", "weight": 0.5}}
        },
        "trainer": {"epochs": 1, "max_steps": 3, **run},
        "report": {"latency_batch_sizes": [1], "latency_repeats": 1},
        "search": {
            "objective.terms.kd.weight": {"type": "float", "low": 0.1, "high": 1.0},
            "trainer.optimizer.lr": {"type": "float", "low": 1e-3, "high": 1e-2, "log": True},
        },
        "tune": {"seed": 0, "pruner": "none"},
    }


def test_language_model_study_minimises_validation_perplexity(tmp_path):
    pytest.importorskip("transformers", reason="pip install 'distill[nlp]'")
    pytest.importorskip("tokenizers", reason="pip install 'distill[nlp]'")
    cfg = tune.parse_tune_recipe(_lm_recipe(tmp_path))
    assert [(o.metric, o.direction) for o in cfg.tune.objectives] == [("perplexity", "minimize")]
    summary = tune.run_tune(cfg, tmp_path / "study", trials=2, log=lambda *_: None)
    rows = summary["rows"]
    assert [r["state"] for r in rows] == ["complete", "complete"]
    for r in rows:  # the optimised value is the validation perplexity, not the test one beside it
        recs = [
            json.loads(line)
            for line in (tmp_path / "study" / "trials" / str(r["number"]) / "metrics.jsonl")
            .read_text()
            .splitlines()
        ]
        val = [x for x in recs if x.get("stage") == "student_kd" and x.get("split") == "val"][-1]
        assert r["val_perplexity"] == pytest.approx(val["perplexity"]) and "perplexity" in r
    best = min(rows, key=lambda r: r["val_perplexity"])
    assert summary["best"][0]["number"] == best["number"]
    assert "val_perplexity" in (tmp_path / "study" / "report.md").read_text()
