"""Hugging Face models and text data in recipes: the `hf` builder, the text data builders, the
student_hf/ folder, evaluators by task, and the one-line errors for bad input."""

from __future__ import annotations

import json
import random

import pytest
import torch

pytest.importorskip("transformers")

from distill.errors import DistillError  # noqa: E402

WORDS = ["apple", "banana", "cherry", "plum", "dog", "cat", "mouse", "horse", "red", "green", "blue", "pink"]
LABELS = ["fruit", "animal", "color"]


def _rows(n=240, seed=0):
    rng = random.Random(seed)
    rows = []
    for i in range(n):
        lab = i % 3
        ws = rng.sample(WORDS[lab * 4 : lab * 4 + 4], 2) + rng.sample(WORDS, 3)
        rng.shuffle(ws)
        rows.append({"text": " ".join(ws), "label": LABELS[lab]})
    return rows


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A word tokenizer, a tiny GPT-2 folder (tied embeddings) and a tiny BERT folder."""
    import transformers

    from distill.data.text import train_tokenizer

    root = tmp_path_factory.mktemp("hf")
    rows = _rows()
    (root / "cls.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (root / "lm.txt").write_text("".join(r["text"] + "\n" for r in rows))
    tok = train_tokenizer([r["text"] for r in rows], vocab_size=100, kind="word")
    torch.manual_seed(0)
    gcfg = transformers.GPT2Config(
        vocab_size=len(tok), n_embd=32, n_layer=2, n_head=2, n_positions=64, pad_token_id=0, eos_token_id=1
    )
    transformers.GPT2LMHeadModel(gcfg).save_pretrained(root / "gpt2")
    tok.save_pretrained(root / "gpt2")
    bcfg = transformers.BertConfig(
        vocab_size=len(tok),
        hidden_size=32,
        num_hidden_layers=4,
        num_attention_heads=2,
        intermediate_size=64,
        max_position_embeddings=64,
        pad_token_id=0,
    )
    transformers.BertModel(bcfg).save_pretrained(root / "bert")
    tok.save_pretrained(root / "bert")
    return root


# --------------------------------------------------------------------------- the hf builder


def test_folder_loads_with_its_tied_weights_and_as_a_checkpoint(tiny):
    from distill.checkpoint import load_weights
    from distill.nlp.hf_models import hf

    model = hf(path=str(tiny / "gpt2"), task="causal_lm")
    assert model.lm_head.weight.data_ptr() == model.transformer.wte.weight.data_ptr()
    assert model.distill_pretrained and model.distill_task == "causal_lm"
    # the model's own model.safetensors stores the tied weight once: it loads as a checkpoint too
    fresh = hf(config={"n_layer": 2}, task="causal_lm", teacher=model, seed=1)
    assert not torch.equal(fresh.transformer.wte.weight, model.transformer.wte.weight)
    load_weights(fresh, tiny / "gpt2" / "model.safetensors")
    assert torch.equal(fresh.lm_head.weight, model.lm_head.weight)


def test_students_cut_from_the_teacher_from_a_config_and_num_labels(tiny):
    from distill.nlp.hf_models import hf

    teacher = hf(path=str(tiny / "bert"), task="sequence_classification", num_classes=3, label_names=LABELS)
    assert teacher.config.num_labels == 3 and teacher.config.id2label[1] == "animal"
    cut = hf(task="sequence_classification", num_layers=2, teacher=teacher)
    assert cut.config.num_hidden_layers == 2 and cut.config.distill_layers == [0, 3]
    assert torch.equal(
        cut.bert.encoder.layer[1].output.dense.weight, teacher.bert.encoder.layer[3].output.dense.weight
    )
    narrow = hf(task="sequence_classification", layers=[0, 2], hidden_size=16, teacher=teacher)
    assert narrow.config.hidden_size == 16
    fresh = hf(task="sequence_classification", config={"num_hidden_layers": 1}, teacher=teacher)
    assert fresh.config.num_hidden_layers == 1 and fresh.config.num_labels == 3
    scratch = hf(task="causal_lm", config={"model_type": "gpt2", "n_layer": 1, "n_embd": 16, "n_head": 2})
    assert scratch.config.n_layer == 1
    with pytest.raises(Exception, match="exactly one of path"):
        hf(task="causal_lm")
    with pytest.raises(Exception, match="task 'chat' is not one of"):
        hf(path=str(tiny / "gpt2"), task="chat")


def test_bad_model_sources_fail_in_one_line(tiny, monkeypatch, tmp_path):
    from distill.data.text import train_tokenizer
    from distill.nlp.hf_models import hf

    with pytest.raises(DistillError, match="model folder ./no/such/folder does not exist") as e:
        hf(path="./no/such/folder", task="causal_lm")
    assert "\n" not in str(e.value)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(DistillError, match="hub id 'nobody-here/tiny-model' was not found locally") as e:
        hf(path="nobody-here/tiny-model", task="causal_lm")
    assert "\n" not in str(e.value)
    other = train_tokenizer(["zebra yak xylophone"] * 5, vocab_size=50, kind="word")
    with pytest.raises(DistillError, match="tokenizers differ at token id"):
        hf(path=str(tiny / "gpt2"), task="causal_lm", tokenizer=other)
    with pytest.raises(DistillError, match="package no_such_pkg_xyz is not installed"):
        hf(path="pkg:no_such_pkg_xyz", task="causal_lm")


# --------------------------------------------------------------------------- text data


def test_text_classification_labels_columns_and_truncation(tiny, tmp_path, capsys):
    from distill.data.bundle import build_data

    data = build_data(
        "text_classification", init_args={"path": str(tiny / "cls.jsonl"), "tokenizer": str(tiny / "bert")}
    )
    assert data.num_classes == 3 and data.meta["label_names"] == sorted(LABELS)
    assert len(data.train) + len(data.val) + len(data.test) == 240
    batch = data.collate_fn([data.train[i] for i in range(4)])
    assert batch["input_ids"].shape[0] == 4 and batch["labels"].shape == (4,)
    assert batch["attention_mask"].sum(1).min() > 0
    # a CSV with a missing label column: the columns are listed
    csv_path = tmp_path / "d.csv"
    csv_path.write_text("text,topic\nhello there,a\n")
    with pytest.raises(DistillError, match=r"has no column 'label' \(columns: text, topic\)"):
        build_data("text_classification", init_args={"path": str(csv_path), "tokenizer": str(tiny / "bert")})
    # texts longer than max_length are truncated and counted
    short = build_data(
        "text_classification",
        init_args={"path": str(tiny / "cls.jsonl"), "tokenizer": str(tiny / "bert"), "max_length": 3},
    )
    assert short.meta["truncated"] == 240 and max(len(r["input_ids"]) for r in short.train.rows) == 3
    assert "240 of 240 texts are longer than 3 tokens" in capsys.readouterr().err


def test_folder_of_label_files_and_text_blocks(tiny, tmp_path):
    from distill.data.bundle import build_data

    folder = tmp_path / "topics"
    folder.mkdir()
    (folder / "fruit").write_text("apple banana\n%\ncherry plum\n%\nplum apple\n")
    (folder / "pets").write_text("dog cat\n%\nmouse horse\n%\ncat horse\n")
    data = build_data(
        "text_classification",
        init_args={
            "path": str(folder),
            "tokenizer": str(tiny / "bert"),
            "val_fraction": 0.0,
            "test_fraction": 0.0,
        },
    )
    assert data.meta["label_names"] == ["fruit", "pets"] and len(data.train) == 6
    lm = build_data(
        "text", init_args={"path": str(tiny / "lm.txt"), "tokenizer": str(tiny / "gpt2"), "block_size": 16}
    )
    assert {len(x["input_ids"]) for x in lm.train.rows} == {16}  # whole blocks only
    assert lm.train.rows[0]["labels"] == lm.train.rows[0]["input_ids"]
    trained = build_data(
        "text",
        init_args={"path": str(tiny / "lm.txt"), "tokenizer": {"train": {"vocab_size": 60, "kind": "word"}}},
    )
    assert len(trained.tokenizer) <= 60


def test_chat_learns_assistant_turns_only(tiny, tmp_path):
    from distill.data.bundle import build_data

    path = tmp_path / "chat.jsonl"
    conv = {
        "messages": [{"role": "user", "content": "dog cat"}, {"role": "assistant", "content": "red green"}]
    }
    path.write_text(json.dumps(conv) + "\n" + json.dumps(conv) + "\n")
    data = build_data(
        "chat",
        init_args={
            "path": str(path),
            "tokenizer": str(tiny / "gpt2"),
            "val_fraction": 0.0,
            "test_fraction": 0.0,
        },
    )
    row = data.train.rows[0]
    learned = [t for t, lab in zip(row["input_ids"], row["labels"], strict=True) if lab != -100]
    text = data.tokenizer.decode(learned)
    assert "red" in text and "green" in text and "dog" not in text and "cat" not in text
    bad = tmp_path / "bad.jsonl"
    bad.write_text(
        json.dumps(conv) + "\n" + json.dumps({"messages": [{"role": "user", "content": "hi"}]}) + "\n"
    )
    with pytest.raises(DistillError, match="line 2: the conversation has no assistant turn"):
        build_data("chat", init_args={"path": str(bad), "tokenizer": str(tiny / "gpt2")})


def test_prompt_response_labels_the_response(tiny, tmp_path):
    from distill.data.bundle import build_data

    path = tmp_path / "pr.jsonl"
    path.write_text("".join(json.dumps({"prompt": "dog cat", "response": "red"}) + "\n" for _ in range(3)))
    data = build_data(
        "prompt_response",
        init_args={
            "path": str(path),
            "tokenizer": str(tiny / "gpt2"),
            "val_fraction": 0.0,
            "test_fraction": 0.0,
        },
    )
    row = data.train.rows[0]
    assert row["labels"][:2] == [-100, -100] and row["labels"][2:] == row["input_ids"][2:]


def test_fortune_dialogues():
    from distill.data.text import fortune_dialogues

    convs = fortune_dialogues()
    assert len(convs) > 500
    assert all([m["role"] for m in c] == ["user", "assistant"] and c[1]["content"] for c in convs)


# --------------------------------------------------------------------------- evaluators


def test_macro_f1_matches_the_formula():
    from distill.engine.evaluate import ClassificationEvaluator
    from distill.outputs import Batch, Outputs

    g = torch.Generator().manual_seed(0)
    logits, y = torch.randn(200, 4, generator=g), torch.randint(0, 4, (200,), generator=g)
    ev = ClassificationEvaluator()
    for i in range(0, 200, 64):
        ev.update(Outputs(logits=logits[i : i + 64]), None, Batch(inputs=None, targets=y[i : i + 64]))
    pred = logits.argmax(-1)
    f1s = []
    for c in range(4):
        tp = int(((pred == c) & (y == c)).sum())
        prec = tp / max(int((pred == c).sum()), 1)
        rec = tp / max(int((y == c).sum()), 1)
        f1s.append(0.0 if tp == 0 else 2 * prec * rec / (prec + rec))
    assert ev.compute()["macro_f1"] == pytest.approx(sum(f1s) / 4)


def test_embedding_retrieval_agreement():
    from distill.engine.evaluate import EmbeddingEvaluator
    from distill.outputs import Batch, Outputs

    t = torch.randn(50, 8, generator=torch.Generator().manual_seed(0))
    ev = EmbeddingEvaluator()
    ev.update(Outputs(extras={"embeddings": t * 2}), Outputs(extras={"embeddings": t}), Batch(inputs=None))
    m = ev.compute()
    assert m["cosine"] == pytest.approx(1.0) and m["retrieval_top1"] == 1.0 and m["retrieval_top10"] == 1.0
    ev.reset()
    ev.update(
        Outputs(extras={"embeddings": torch.randn(50, 8)}), Outputs(extras={"embeddings": t}), Batch(None)
    )
    assert ev.compute()["retrieval_top1"] < 0.5


def test_resolve_recipe_fills_tokenizer_task_and_evaluator(tiny):
    from distill.run.config import parse_recipe
    from distill.run.hf import resolve_recipe

    cfg = parse_recipe(
        {
            "data": {"name": "text", "init_args": {"path": str(tiny / "lm.txt")}},
            "teacher": {"name": "hf", "init_args": {"path": str(tiny / "gpt2"), "task": "causal_lm"}},
            "student": {"name": "hf", "init_args": {"num_layers": 1}},
            "objective": {"terms": {"ce": {"name": "lm_ce"}}},
        }
    )
    r = resolve_recipe(cfg)
    assert r.data.init_args["tokenizer"] == str(tiny / "gpt2")
    assert r.student.init_args["task"] == "causal_lm" and r.evaluator.name == "perplexity"
    assert r.trainer.monitor == "perplexity" and r.trainer.monitor_mode == "min"
    assert cfg.evaluator is None  # the input is not changed


# --------------------------------------------------------------------------- end to end


def _recipe(tiny, **over):
    recipe = {
        "name": "tiny_cls",
        "data": {
            "name": "text_classification",
            "init_args": {"path": str(tiny / "cls.jsonl"), "max_length": 16},
        },
        "teacher": {
            "name": "hf",
            "init_args": {"path": str(tiny / "bert"), "task": "sequence_classification"},
            "train": {"epochs": 2, "optimizer": {"lr": 1e-3}, "threads": 1, "progress": "off"},
        },
        "student": {"name": "hf", "init_args": {"num_layers": 2}},
        "objective": {
            "terms": {
                "ce": {"name": "ce", "weight": 0.5},
                "kd": {"name": "kd", "weight": 0.5, "init_args": {}},
            }
        },
        "trainer": {"epochs": 2, "optimizer": {"lr": 1e-3}, "threads": 1, "progress": "off"},
        "report": {"latency_batch_sizes": [1, 4], "latency_repeats": 3},
    }
    recipe.update(over)
    return recipe


@pytest.mark.slow
def test_classification_run_writes_a_loadable_student_folder_and_eval_scores_it(tiny, tmp_path):
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from distill.run.config import parse_recipe
    from distill.run.pipeline import evaluate_checkpoint, run_recipe

    cfg = parse_recipe(_recipe(tiny))
    out = tmp_path / "run"
    summary = run_recipe(cfg, out)
    rows = {r["name"]: r for r in summary["rows"]}
    assert {"accuracy", "macro_f1", "sentences_per_s_b1", "sentences_per_s_b4"} <= set(rows["student_kd"])
    assert summary["texts_truncated"] == 0
    folder = out / "student_hf"
    model = AutoModelForSequenceClassification.from_pretrained(folder)
    tok = AutoTokenizer.from_pretrained(folder)
    assert model.config.num_hidden_layers == 2 and model.config.id2label[0] == "animal"
    assert len(tok) == len(AutoTokenizer.from_pretrained(tiny / "bert"))
    assert "student_kd" in (folder / "README.md").read_text()
    scored = evaluate_checkpoint(parse_recipe(json.loads(json.dumps(cfg.model_dump()))), out, str(folder))
    assert scored["accuracy"] == pytest.approx(rows["student_kd"]["accuracy"])
    assert scored["macro_f1"] == pytest.approx(rows["student_kd"]["macro_f1"])


@pytest.mark.slow
def test_causal_lm_run_from_a_pretrained_teacher_without_training(tiny, tmp_path):
    from transformers import AutoModelForCausalLM

    from distill.run.config import parse_recipe
    from distill.run.pipeline import run_recipe

    recipe = _recipe(
        tiny,
        name="tiny_lm",
        data={
            "name": "text",
            "init_args": {"path": str(tiny / "lm.txt"), "block_size": 16, "test_fraction": 0.1},
        },
        teacher={"name": "hf", "init_args": {"path": str(tiny / "gpt2"), "task": "causal_lm"}},
        student={"name": "hf", "init_args": {"config": {"n_layer": 1, "n_embd": 16}}},
        objective={"terms": {"ce": {"name": "lm_ce", "weight": 0.5}, "kd": {"name": "fkl", "weight": 0.5}}},
    )
    summary = run_recipe(parse_recipe(recipe), tmp_path / "run")
    rows = {r["name"]: r for r in summary["rows"]}
    assert {"perplexity", "agreement", "tokens_per_s_b1", "tokens_per_s_b4"} <= set(rows["student_kd"])
    assert not (tmp_path / "run" / "checkpoints" / "teacher").exists()  # used as it is
    student = AutoModelForCausalLM.from_pretrained(tmp_path / "run" / "student_hf")
    assert student.config.n_layer == 1


def test_integer_labels_of_a_csv_are_ordered_as_numbers(tiny, tmp_path):
    from distill.data.bundle import build_data

    csv_path = tmp_path / "months.csv"
    rows = [f"{WORDS[m - 1]} {WORDS[i]},{m}" for m in range(1, 13) for i in range(3)]  # month m's word first
    csv_path.write_text("text,label\n" + "\n".join(rows) + "\n")
    data = build_data(
        "text_classification", init_args={"path": str(csv_path), "tokenizer": str(tiny / "bert")}
    )
    # as JSON numbers are: ordered as numbers and their own ids (not '1', '10', '11', '12', '2', ...)
    assert data.meta["label_names"] == [str(i) for i in range(13)] and data.num_classes == 13
    tok = data.tokenizer
    for split in (data.train, data.val, data.test):
        for i in range(len(split)):
            item = split[i]
            first = tok.decode(item["input_ids"], skip_special_tokens=True).split()[0]
            assert item["labels"] == WORDS.index(first) + 1
    jsonl = tmp_path / "months.jsonl"
    jsonl.write_text("".join(json.dumps({"text": r.rsplit(",", 1)[0], "label": m}) + "\n"
                             for r, m in zip(rows, [m for m in range(1, 13) for _ in range(3)])))  # fmt: skip
    same = build_data("text_classification", init_args={"path": str(jsonl), "tokenizer": str(tiny / "bert")})
    assert same.meta["label_names"] == data.meta["label_names"]
    # negative whole numbers cannot be ids: ordered as numbers, numbered from 0
    neg = tmp_path / "neg.csv"
    neg.write_text(
        "text,label\n" + "\n".join(f"text {i} here,{v}" for i, v in enumerate([-1, 10, 2, -1, 10, 2]))
    )
    assert build_data(
        "text_classification", init_args={"path": str(neg), "tokenizer": str(tiny / "bert")}
    ).meta["label_names"] == ["-1", "2", "10"]


@pytest.fixture(scope="module")
def named_classifier(tiny):
    """A tiny BERT classifier folder whose config names its classes fruit, animal, color."""
    import transformers

    model = transformers.BertForSequenceClassification.from_pretrained(
        tiny / "bert",
        num_labels=3,
        id2label=dict(enumerate(LABELS)),
        label2id={n: i for i, n in enumerate(LABELS)},
    )
    folder = tiny / "named"
    model.save_pretrained(folder)
    transformers.AutoTokenizer.from_pretrained(tiny / "bert").save_pretrained(folder)
    return folder


def test_a_pretrained_classifier_keeps_its_class_names(named_classifier, capsys):
    from distill.nlp.hf_models import hf

    task = "sequence_classification"
    same = hf(path=str(named_classifier), task=task, num_classes=3, label_names=LABELS)
    assert same.config.id2label == dict(enumerate(LABELS)) and "warning" not in capsys.readouterr().err
    # the data's names differ: the model's are kept, and one line says so
    other = hf(path=str(named_classifier), task=task, num_classes=3, label_names=["0", "1", "2"])
    assert other.config.id2label == dict(enumerate(LABELS))
    said = [x for x in capsys.readouterr().err.splitlines() if "distill: warning" in x]
    assert len(said) == 1 and "names its classes fruit, animal, color, the data 0, 1, 2" in said[0]
    # the model's names in another order (sorted, as the data builder gives them): ids would not match
    with pytest.raises(DistillError, match=r"set data.init_args.label_names: \[fruit, animal, color\]") as e:
        hf(path=str(named_classifier), task=task, num_classes=3, label_names=sorted(LABELS))
    assert "\n" not in str(e.value)
    # a student from a config names its classes as its teacher does
    student = hf(
        task=task, config={"num_hidden_layers": 1}, teacher=same, num_classes=3, label_names=["0", "1", "2"]
    )
    assert student.config.id2label == dict(enumerate(LABELS))


def test_mixing_token_inputs_is_refused_by_check_and_run_before_the_teacher_trains(tiny, tmp_path, capsys):
    import yaml

    from distill.cli import main
    from distill.run.config import parse_recipe
    from distill.run.pipeline import run_recipe

    recipe = _recipe(tiny)
    recipe["trainer"]["mix"] = {"name": "mixup"}
    (tmp_path / "r.yaml").write_text(yaml.safe_dump(recipe))
    assert main(["check", str(tmp_path / "r.yaml")]) == 2
    err = capsys.readouterr().err
    said = [x for x in err.splitlines() if x.startswith("distill")]
    assert len(said) == 1 and "trainer.mix: mixup interpolates floating-point inputs" in said[0], err
    with pytest.raises(DistillError, match="mixup interpolates floating-point inputs .* not dict inputs"):
        run_recipe(parse_recipe(recipe), tmp_path / "run")
    assert not (tmp_path / "run" / "checkpoints").exists()  # the teacher did not train first


def test_teacher_calibrate_of_a_causal_lm_fits_next_token_predictions(tiny, tmp_path):
    import torch.nn.functional as F

    from distill.data.bundle import build_data
    from distill.run.config import parse_recipe
    from distill.run.hf import resolve_recipe
    from distill.run.pipeline import load_teacher
    from distill.teachers.calibration import fit_temperature

    cfg = resolve_recipe(
        parse_recipe(
            {
                "data": {"name": "text", "init_args": {"path": str(tiny / "lm.txt"), "block_size": 16}},
                "teacher": {
                    "name": "hf",
                    "init_args": {"path": str(tiny / "gpt2"), "task": "causal_lm"},
                    "calibrate": True,
                },
                "student": {"name": "hf", "init_args": {"num_layers": 1}},
                "objective": {"terms": {"ce": {"name": "lm_ce"}}},
            }
        )
    )
    data = build_data("text", None, cfg.data.init_args, seed=cfg.seed)
    model, _, info = load_teacher(cfg.teacher, "teacher", data, cfg, tmp_path)
    batch = data.collate_fn([data.val[i] for i in range(len(data.val))])
    with torch.no_grad():
        z = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    nxt, y = z[:, :-1].reshape(-1, z.shape[-1]), batch["labels"][:, 1:].reshape(-1)  # t predicts t+1
    keep = (y != -100) & (batch["attention_mask"][:, 1:].reshape(-1) > 0)
    assert info["temperature"] == pytest.approx(fit_temperature(nxt[keep], y[keep]), rel=1e-6)
    same = z.reshape(-1, z.shape[-1]), batch["labels"].reshape(-1)  # what it fitted before: t against t
    assert fit_temperature(*same) != pytest.approx(info["temperature"], rel=1e-3)
    assert F.cross_entropy(nxt[keep] / info["temperature"], y[keep]) <= F.cross_entropy(nxt[keep], y[keep])
