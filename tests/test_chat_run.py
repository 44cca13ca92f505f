"""The chat evaluator in a recipe (summary.json rows, answers side by side in report.md) and
`distill chat RUN`, end to end on a tiny run folder: a tiny GPT-2 teacher folder with a ChatML
tokenizer built here, a tinier student, one epoch."""

from __future__ import annotations

import io
import json
import subprocess
import sys

import pytest
import torch

transformers = pytest.importorskip("transformers")

from distill.nlp import chat_eval as ce  # noqa: E402
from helpers import CLI_ENV  # noqa: E402

CHATML = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
QA = [
    ("what is the capital of france", "paris is the capital of france."),
    ("name a red fruit", "a cherry is a red fruit."),
    ("why is the sky blue", "light scatters in the air."),
    ("what do cats say", "cats say meow."),
    ("what colour is grass", "grass is green."),
    ("how many legs has a dog", "a dog has four legs."),
]
MEASURES = {"answer_ppl", "teacher_nll", "rouge_l", "eos_rate", "repeat_rate", "gen_tokens_per_s_b1"}


@pytest.fixture(scope="module")
def chat_run(tmp_path_factory):
    from distill.data.text import train_tokenizer
    from distill.run.config import parse_recipe
    from distill.run.pipeline import run_recipe

    root = tmp_path_factory.mktemp("chat")
    texts = [t for qa in QA for t in qa]
    tok = train_tokenizer(texts * 4, vocab_size=300, kind="bpe")
    tok.add_special_tokens({"additional_special_tokens": ["<|im_start|>", "<|im_end|>"]})
    tok.chat_template = CHATML
    cfg = transformers.GPT2Config(
        vocab_size=len(tok), n_embd=32, n_layer=2, n_head=2, n_positions=96,
        pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id, bos_token_id=tok.eos_token_id,
    )  # fmt: skip
    torch.manual_seed(0)
    transformers.GPT2LMHeadModel(cfg).save_pretrained(root / "teacher")
    tok.save_pretrained(root / "teacher")
    rows = [
        {"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": a}]}
        for _ in range(4)
        for q, a in QA
    ]
    (root / "chat.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    recipe = {
        "name": "tiny_chat",
        "data": {
            "name": "chat",
            "init_args": {"path": str(root / "chat.jsonl"), "max_length": 48},
            "batch_size": 8,
        },
        "teacher": {"name": "hf", "init_args": {"path": str(root / "teacher"), "task": "causal_lm"}},
        "student": {"name": "hf", "init_args": {"config": {"n_layer": 1, "n_embd": 16}}},
        "objective": {
            "terms": {"ce": {"name": "lm_ce", "weight": 0.5}, "kd": {"name": "fkl", "weight": 0.5}}
        },
        "evaluator": {
            "name": "chat",
            "init_args": {
                "prompts": 3,
                "max_new_tokens": 6,
                "show": 2,
                "speed_batch_sizes": [1, 2],
                "speed_new_tokens": 3,
            },
        },  # fmt: skip
        "trainer": {"epochs": 1, "optimizer": {"lr": 1e-3}, "threads": 1, "progress": "off"},
        "report": {"latency_batch_sizes": [1], "latency_repeats": 3},
    }
    summary = run_recipe(parse_recipe(recipe), root / "run")
    return root, summary


def test_the_summary_rows_hold_the_chat_measures_and_the_report_the_answers(chat_run):
    root, summary = chat_run
    rows = {r["name"]: r for r in summary["rows"]}
    assert set(rows) == {"teacher", "student_scratch", "student_kd"}
    for row in rows.values():
        assert MEASURES | {"gen_tokens_per_s_b2", "answer_tokens"} <= set(row), row
        assert row["heldout_prompts"] == 2 and "examples" not in row
        assert 0 <= row["rouge_l"] <= 1 and 0 <= row["eos_rate"] <= 1 and row["answer_ppl"] > 1
    saved = json.loads((root / "run" / "summary.json").read_text())
    assert len(saved["answers"]) == 2
    assert {"prompt", "reference", "teacher", "student_scratch", "student_kd"} == set(saved["answers"][0])
    assert saved["answers"][0]["prompt"] in {q for q, _ in QA}  # the user's words, not the template
    assert saved["answers"][0]["reference"] in {a for _, a in QA}
    report = (root / "run" / "report.md").read_text()
    assert "## Answers side by side" in report and "| student_kd |" in report and "ROUGE-L" in report


def test_heldout_rows_split_as_the_chat_template_renders_prompt_and_answer(chat_run):
    from transformers import AutoTokenizer

    from distill.nlp.text_data import render_chat

    root, _ = chat_run
    tok = AutoTokenizer.from_pretrained(root / "teacher")
    for q, a in QA[:3]:
        msgs = [{"role": "user", "content": q}, {"role": "assistant", "content": a}]
        ids, labels = render_chat(tok, msgs)
        (held,) = ce.heldout_from_rows(tok, [{"input_ids": ids, "labels": labels}])
        assert held.prompt_ids == ce.render_prompt(tok, q)
        assert held.answer_ids == ce.render_answer(tok, q, a)
        assert held.reference == a and ce.prompt_text(tok, held.prompt_ids) == q


def _chat(*args):
    return subprocess.run(
        [sys.executable, "-m", "distill", "chat", *map(str, args)],
        capture_output=True, text=True, env=CLI_ENV, timeout=300,
    )  # fmt: skip


def test_distill_chat_answers_one_prompt_as_greedy_generation_does(chat_run):
    from distill.run.chat import load_chat_models

    root, _ = chat_run
    p = _chat(root / "run", "--prompt", "name a red fruit", "--max-new-tokens", 5, "--teacher")
    assert p.returncode == 0, p.stderr
    assert p.stdout.startswith("student: ")
    replies = p.stdout[len("student: ") :].split("\nteacher: ")  # (answers may hold newlines)
    assert len(replies) == 2
    student, tok, teacher, t_tok, _ = load_chat_models(root / "run", teacher=True)
    assert t_tok is not None and len(t_tok) == len(tok)
    for reply, model in zip(replies, (student, teacher)):
        (want,) = ce.greedy_answers(model, tok, ["name a red fruit"], max_new_tokens=5)
        assert reply.strip() == want.text


def test_distill_chat_talks_until_quit_and_reset_starts_over(chat_run, monkeypatch, capsys):
    from distill.cli import main

    root, _ = chat_run
    monkeypatch.setattr(sys, "stdin", io.StringIO("hi\nname a red fruit\n/reset\nhi\n/quit\n"))
    assert main(["chat", str(root / "run"), "--max-new-tokens", "4"]) == 0
    out = capsys.readouterr().out
    assert out.count("student: ") == 3 and "(a new conversation)" in out
    turns = out.split("you> ")  # (input() writes its prompt to stdout when stdin is a file)
    assert turns[3].startswith("(a new conversation)")
    assert turns[1] == turns[4]  # after /reset, "hi" is answered as the first time


def test_distill_chat_on_a_run_without_a_student_fails_in_one_line(chat_run, tmp_path, capsys):
    from distill.cli import main

    root, _ = chat_run
    unfinished = tmp_path / "unfinished"
    unfinished.mkdir()
    (unfinished / "config.yaml").write_text((root / "run" / "config.yaml").read_text())
    for folder, says in [
        (unfinished, "has no distilled student (no student_hf/): finish the run"),
        (tmp_path / "nothing", "is not a folder"),
        (tmp_path, "is not a distill run folder"),
    ]:
        assert main(["chat", str(folder), "--prompt", "hi"]) == 2
        err = capsys.readouterr().err
        assert err.startswith("distill chat: error: ") and says in err and err.count("\n") == 1
