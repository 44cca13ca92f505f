"""A teacher and a student with different tokenizers in `distill run` / `distill check`
(recipes/cross_tokenizer_chat.yaml with a tiny teacher and tiny configs)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

pytest.importorskip("transformers", reason="pip install 'distill[nlp]'")
pytest.importorskip("tokenizers", reason="pip install 'distill[nlp]'")

ROOT = Path(__file__).resolve().parents[1]
PROMPTS = [
    "Tell me about the cat.",
    "What is a good day?",
    "Say something kind.",
    "Why is the sky blue?",
    "Name a fruit.",
    "Write one line about the sea.",
    "What do people believe?",
    "Give me a short proverb.",
    "Describe the moon.",
    "What is unbelievable?",
    "Count to three.",
    "Say hello to the world.",
]


@pytest.fixture(scope="module")
def teacher_dir(tmp_path_factory):
    """A tiny chat teacher saved as a model folder: its own BPE tokenizer with a chat template."""
    import torch
    import transformers

    from distill.data.text import train_tokenizer
    from distill.nlp.text_data import SIMPLE_CHAT_TEMPLATE

    folder = tmp_path_factory.mktemp("teacher")
    texts = PROMPTS * 4 + ["the cat sat on the mat and the sea was blue, people say hello."] * 8
    tok = train_tokenizer(texts, vocab_size=400, kind="bpe")
    tok.chat_template = SIMPLE_CHAT_TEMPLATE
    cfg = transformers.GPT2Config(
        vocab_size=len(tok), n_embd=32, n_layer=1, n_head=2, n_positions=256,
        pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id, bos_token_id=tok.eos_token_id,
    )  # fmt: skip
    torch.manual_seed(0)
    transformers.GPT2LMHeadModel(cfg).save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder


def _recipe(tmp_path, teacher_dir, **over):
    from distill.run.config import load_yaml, parse_recipe

    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": p}) + "\n" for p in PROMPTS))
    flat = {
        "data.init_args.path": str(prompts),
        "data.init_args.answers": str(tmp_path.parent / "answers"),  # shared by the tests: answered once
        "data.init_args.max_new_tokens": 12,
        "data.init_args.max_length": 96,
        "data.init_args.test_count": 3,
        "data.init_args.val_fraction": 0.2,
        "data.init_args.tokenizer": {"train": {"vocab_size": 300, "kind": "bpe"}},
        "data.batch_size": 4,
        "teacher.init_args": {"path": str(teacher_dir), "task": "causal_lm"},
        "teacher.cross_k": 8,
        "student.init_args.config": {"model_type": "gpt2", "n_layer": 1, "n_embd": 16, "n_head": 2, "n_positions": 128},
        "trainer.max_steps": 3,
        "trainer.threads": 1,
        "trainer.tensorboard": False,
        "report.latency_batch_sizes": [1],
        "report.latency_repeats": 2,
        **over,
    }  # fmt: skip
    raw = load_yaml(ROOT / "recipes" / "cross_tokenizer_chat.yaml")
    for key, value in flat.items():
        *path, last = key.split(".")
        node = raw
        for p in path:
            node = node.setdefault(p, {})
        node[last] = value
    return parse_recipe(raw)


def test_check_says_how_the_tokenizers_fit_and_run_trains_live_and_from_a_store(tmp_path, teacher_dir):
    from distill.run.pipeline import preflight_recipe, run_recipe

    cfg = _recipe(tmp_path, teacher_dir)
    report = preflight_recipe(cfg)
    line = report["tokenizers"]
    assert line.startswith("tokenizers: teacher ") and "of the student's vocabulary maps exactly" in line
    assert "shared characters" in line and "aligned_kd" in line and "\n" not in line
    assert "with teacher.cross_map: prefix" in line
    assert set(report["stages"]) == {"student_scratch", "student_kd"}
    assert report["stages"]["student_kd"]["losses"]["kd"] > 0

    live = run_recipe(cfg, tmp_path / "live")
    rows = {r["name"]: r for r in live["rows"]}
    assert set(rows) == {"teacher", "student_scratch", "student_kd"}
    for r in rows.values():  # comparable across the two tokenizers; no token agreement across vocabularies
        assert 0 < r["bits_per_char"] < 50 and "agreement" not in r
    # the teacher is measured on its own tokens of the same texts: another token count, same characters
    assert rows["teacher"]["params"] != rows["student_kd"]["params"]
    assert (tmp_path / "live" / "student_hf" / "tokenizer.json").is_file()

    # the store: written once over every split's texts by the first run that names it
    store = tmp_path / "xt_store"
    first = run_recipe(
        cfg.model_copy(update={"teacher": cfg.teacher.model_copy(update={"cache": str(store)})}),
        tmp_path / "s1",
    )
    manifest = json.loads((store / "manifest.json").read_text())
    assert manifest["kind"] == "cross_tokenizer" and manifest["k"] == 8
    # online and stored teachers give the same targets: the same first training losses
    kd = lambda out: [  # noqa: E731
        json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()
    ]
    on = [m for m in kd(tmp_path / "live") if m.get("stage") == "student_kd" and "kd" in m]
    off = [m for m in kd(tmp_path / "s1") if m.get("stage") == "student_kd" and "kd" in m]
    assert on and off and on[0]["kd"] == pytest.approx(off[0]["kd"], rel=2e-3)
    assert {r["name"] for r in first["rows"]} == set(rows)

    # a student with another tokenizer trains from the same store, not written again
    mtime = (store / "probs.npy").stat().st_mtime_ns
    other = _recipe(
        tmp_path, teacher_dir,
        **{"data.init_args.tokenizer": {"train": {"vocab_size": 260, "kind": "bpe"}}, "teacher.cache": str(store)},
    )  # fmt: skip
    run_recipe(other, tmp_path / "s2")
    assert (store / "probs.npy").stat().st_mtime_ns == mtime


def test_cache_teacher_writes_the_cross_tokenizer_store_run_reads(tmp_path, teacher_dir, capsys):
    """`distill cache-teacher` on a cross-tokenizer recipe writes the store of texts in the
    teacher's tokens (not a store of the student's token ids), refuses to replace it without
    --overwrite, and never deletes a folder that is not a store."""
    import argparse

    from distill.cli import cache as cli_cache

    def cli(*argv):
        parser = argparse.ArgumentParser(prog="distill")
        cli_cache.add_parser(parser.add_subparsers(dest="command"))
        return cli_cache.main(parser.parse_args(["cache-teacher", str(tmp_path / "r.yaml"), *argv]))

    (tmp_path / "r.yaml").write_text(_recipe(tmp_path, teacher_dir).to_yaml())
    store = tmp_path / "xt"
    assert cli("--out", str(store), "--topk", "6") == 0
    manifest = json.loads((store / "manifest.json").read_text())
    assert manifest["kind"] == "cross_tokenizer" and manifest["k"] == 6
    assert f"teacher.cache={store}" in capsys.readouterr().out
    assert cli("--out", str(store)) == 2
    assert "already; train from it with teacher.cache=" in capsys.readouterr().err
    assert cli("--out", str(store), "--overwrite") == 0  # the recipe's cross_k: 8
    assert json.loads((store / "manifest.json").read_text())["k"] == 8
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("keep me")
    assert cli("--out", str(mine), "--overwrite") == 2
    assert (mine / "notes.txt").read_text() == "keep me"
    assert "is not a teacher store" in capsys.readouterr().err


def test_a_student_tokenizer_with_no_common_character_is_refused_in_one_line():
    from distill.data.text import train_tokenizer
    from distill.errors import DistillError
    from distill.run.cross import fit_line, tokenizer_fit

    latin = train_tokenizer(["the cat sat on the mat"] * 5, vocab_size=280, kind="bpe")
    greek = train_tokenizer(["αβγαβδγαβ"] * 5, kind="char")
    with pytest.raises(DistillError, match="share no characters") as e:
        tokenizer_fit(latin, greek, ["the cat"])
    assert "\n" not in str(e.value)
    fit = tokenizer_fit(latin, latin, ["the cat sat"])
    assert fit["same_tokenizer"] and fit["student_vocab_exact"] == 1.0 and fit["aligned_positions"] == 1.0
    # a student vocabulary too small for most teacher tokens: the prefix map carries every one
    small = train_tokenizer(["the cat sat on the mat"] * 5, vocab_size=262, kind="bpe")
    fit = tokenizer_fit(latin, small, ["the cat sat"])
    assert fit["teacher_vocab_mapped"] < 1.0 and fit["teacher_vocab_prefix"] == 1.0
    few = {**fit, "teacher_vocab_mapped": 0.04}  # as SmolLM2 onto a 2,000-entry BPE: 3.7%
    assert "teacher.cross_map: prefix carries" in fit_line(few, ["kd"])
    assert "prefix carries" not in fit_line({**fit, "teacher_vocab_mapped": 0.9}, ["kd"])


def test_feature_taps_on_a_teacher_of_another_tokenizer_are_refused():
    from distill.errors import DistillError
    from distill.nlp.cross import NoTaps

    NoTaps().add_taps([])  # no feature terms: nothing to refuse
    with pytest.raises(DistillError, match="teacher of another tokenizer"):
        NoTaps().add_taps(["transformer.h.0"])


def test_teacher_cross_map_prefix_reaches_the_live_and_the_stored_teacher(tmp_path, teacher_dir):
    """teacher.cross_map: prefix carries a teacher token the student has no token for onto the
    first student token of its spelling; the run's live teacher and its store both use it."""
    from distill.data.bundle import build_data
    from distill.nlp.hf_models import hf
    from distill.run.cross import cross_teacher
    from distill.run.hf import resolve_recipe

    maps = {}
    for mode, cache in (("exact", None), ("prefix", None), ("prefix", str(tmp_path / "store"))):
        cfg = resolve_recipe(
            _recipe(tmp_path, teacher_dir, **{"teacher.cross_map": mode, "teacher.cache": cache})
        )
        data = build_data(cfg.data.name, None, cfg.data.init_args, seed=cfg.seed)
        maps[mode, cache] = cross_teacher(cfg, data, hf(**cfg.teacher.init_args)).map
    exact, prefix = maps["exact", None], maps["prefix", None]
    assert (prefix[exact >= 0] == exact[exact >= 0]).all()  # where the student has the bytes: the same
    assert int((prefix >= 0).sum()) > int((exact >= 0).sum())  # and more teacher tokens carried
    assert (maps["prefix", str(tmp_path / "store")] == prefix).all()


def test_cross_tokenizer_terms_with_an_ensemble_of_teachers_are_refused(tmp_path, teacher_dir):
    from distill.errors import ConfigError
    from distill.run.config import parse_recipe
    from distill.run.cross import resolve_cross

    hf = {"name": "hf", "init_args": {"path": str(teacher_dir), "task": "causal_lm"}}
    cfg, _ = _served_recipe(tmp_path, teacher_dir)
    raw = cfg.model_dump(mode="json", exclude={"teacher"})
    raw["teachers"] = [hf, hf]
    raw["data"] = {"name": "chat_prompts", "init_args": {"path": str(tmp_path / "p.jsonl")}}
    with pytest.raises(ConfigError, match="objective terms kd align the student's tokens with one teacher's"):
        resolve_cross(parse_recipe(raw))


def _served_recipe(tmp_path, teacher_dir, **over):
    """A served teacher in a recipe: the tiny teacher recorded as a server answers (top-6)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from distill.nlp.served import record_model
    from distill.run.config import parse_recipe

    tok = AutoTokenizer.from_pretrained(teacher_dir)
    model = AutoModelForCausalLM.from_pretrained(teacher_dir)
    answers = [f"the cat sat on the mat {i} times, and people say hello." for i in range(len(PROMPTS))]
    recs = record_model(model, tok, list(zip(PROMPTS, answers)), k=6, prompt_template="Q: {prompt}\nA: ")
    f = tmp_path / "responses.jsonl"
    f.write_text("".join(json.dumps(r) + "\n" for r in recs))
    raw = {
        "name": "served_tiny",
        "data": {
            "name": "served_responses",
            "init_args": {"tokenizer": {"train": {"vocab_size": 280, "kind": "bpe"}}, "max_length": 64},
            "batch_size": 4,
            "eval_batch_size": 8,
        },
        "teacher": {"served": {"file": str(f), "top_logprobs": 6, "prompt_template": "Q: {prompt}\nA: "}},
        "student": {"name": "hf", "init_args": {"config": {"model_type": "gpt2", "n_layer": 1, "n_embd": 16, "n_head": 2, "n_positions": 128}}},
        "objective": {"terms": {"ce": {"name": "lm_ce", "weight": 0.5}, "kd": {"name": "aligned_kd"}}},
        "trainer": {"max_steps": 3, "threads": 1, "tensorboard": False},
        "baselines": ["scratch"],
        "report": {"latency_batch_sizes": [1], "latency_repeats": 2},
    }  # fmt: skip
    for key, value in over.items():
        *path, last = key.split(".")
        node = raw
        for p in path:
            node = node.setdefault(p, {})
        node[last] = value
    return parse_recipe(raw), f


def test_a_served_teacher_in_check_and_run(tmp_path, teacher_dir):
    from distill.run.pipeline import preflight_recipe, run_recipe

    cfg, _ = _served_recipe(tmp_path, teacher_dir)
    report = preflight_recipe(cfg)
    assert report["teacher"]["class"] == "ServedTeacher" and report["teacher"]["params"] == 0
    line = report["tokenizers"]
    assert line.startswith("served teacher: 12 responses") and "k=6" in line and "mass kept" in line
    assert report["stages"]["student_kd"]["losses"]["kd"] > 0
    summary = run_recipe(cfg, tmp_path / "run")
    assert [r["name"] for r in summary["rows"]] == ["student_scratch", "student_kd"]
    assert all(0 < r["bits_per_char"] < 50 for r in summary["rows"])
    assert summary["served_teacher"]["responses"] == 12 and summary["served_teacher"]["k"] == 6


def test_served_teacher_sections_are_refused_in_one_line(tmp_path, teacher_dir):
    from distill.errors import ConfigError, DistillError
    from distill.run.pipeline import preflight_recipe

    cfg, f = _served_recipe(tmp_path, teacher_dir, **{"teacher.served.k": 9})
    with pytest.raises(ConfigError, match=r"teacher.served.*k \(9\) is more than the top_logprobs \(6\)"):
        preflight_recipe(cfg)
    with pytest.raises(Exception, match="a served teacher is its responses; drop name"):
        _served_recipe(tmp_path, teacher_dir, **{"teacher.name": "hf"})
    cfg, _ = _served_recipe(tmp_path, teacher_dir, **{"objective.terms": {"kd": {"name": "fkl"}}})
    with pytest.raises(ConfigError, match="distil with aligned_kd or uld"):
        preflight_recipe(cfg)
    # a responses file cut mid-line (an interrupted fetch): one line naming the fix
    cfg, f = _served_recipe(tmp_path, teacher_dir)
    f.write_bytes(f.read_bytes()[:-30])
    with pytest.raises(DistillError, match="last line is truncated") as e:
        preflight_recipe(cfg)
    assert "\n" not in str(e.value)
