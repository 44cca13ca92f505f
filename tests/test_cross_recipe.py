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


def test_a_student_tokenizer_with_no_common_character_is_refused_in_one_line():
    from distill.data.text import train_tokenizer
    from distill.errors import DistillError
    from distill.run.cross import tokenizer_fit

    latin = train_tokenizer(["the cat sat on the mat"] * 5, vocab_size=280, kind="bpe")
    greek = train_tokenizer(["αβγαβδγαβ"] * 5, kind="char")
    with pytest.raises(DistillError, match="share no characters") as e:
        tokenizer_fit(latin, greek, ["the cat"])
    assert "\n" not in str(e.value)
    fit = tokenizer_fit(latin, latin, ["the cat sat"])
    assert fit["same_tokenizer"] and fit["student_vocab_exact"] == 1.0 and fit["aligned_positions"] == 1.0


def test_feature_taps_on_a_teacher_of_another_tokenizer_are_refused():
    from distill.errors import DistillError
    from distill.nlp.cross import NoTaps

    NoTaps().add_taps([])  # no feature terms: nothing to refuse
    with pytest.raises(DistillError, match="teacher of another tokenizer"):
        NoTaps().add_taps(["transformer.h.0"])
