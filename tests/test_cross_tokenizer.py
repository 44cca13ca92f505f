"""Teachers with another tokenizer: ULD, the character alignment, the token map, the store."""

from __future__ import annotations

import math

import pytest
import torch

from distill.errors import DistillError
from distill.losses.cross_tokenizer import ULD, AlignedKD, mapped_kl, sparse_teacher, uld_loss
from distill.outputs import Batch, Outputs
from distill.registry import LOSSES

# --------------------------------------------------------------------------- plain math, by hand


def test_uld_against_hand_computed_value():
    # teacher V=3, student V=4: sorted p = .7 .2 .1 0, sorted q = .5 .3 .1 .1
    p = torch.tensor([[0.7, 0.2, 0.1]])
    q = torch.tensor([[0.1, 0.3, 0.5, 0.1]])
    expected = 0.2 + 0.1 + 0.0 + 0.1
    assert float(uld_loss(q.log(), p.log())) == pytest.approx(expected, abs=1e-6)
    # top-1 teacher: |.7 - .5| + |tail .3 - rest .5|
    assert float(uld_loss(q.log(), p.log(), k=1)) == pytest.approx(0.2 + 0.2, abs=1e-6)
    # top-2 teacher: |.7-.5| + |.2-.3| + |.1 - .2|
    assert float(uld_loss(q.log(), p.log(), k=2)) == pytest.approx(0.4, abs=1e-6)


def test_uld_ignores_token_order_and_is_zero_for_a_permutation():
    t = torch.randn(5, 7)
    s = t[:, torch.randperm(7)]
    assert float(uld_loss(s, t)) == pytest.approx(0.0, abs=1e-6)
    assert float(uld_loss(torch.randn(5, 11), t)) > 0.01


def test_mapped_kl_against_hand_computed_value():
    # teacher ids 0 "a", 1 "b", 2 "xy"; student ids 0 "a", 1 "b", 2 "x", 3 "y"
    vmap = torch.tensor([0, 1, -1])
    probs, ids, tail = sparse_teacher(torch.tensor([[0.5, 0.2, 0.3]]).log())
    q = torch.tensor([[0.4, 0.1, 0.3, 0.2]])
    kl, uld = mapped_kl(q.log(), probs, ids, tail, vmap)
    expected_kl = 0.5 * math.log(0.5 / 0.4) + 0.2 * math.log(0.2 / 0.1) + 0.3 * math.log(0.3 / 0.5)
    assert float(kl) == pytest.approx(expected_kl, abs=1e-6)
    # unmapped teacher mass [.3] vs the student's mass off "a", "b": sorted [.3, .2]
    assert float(uld) == pytest.approx(0.0 + 0.2, abs=1e-6)


def test_mapped_kl_with_identity_map_is_forward_kl():
    from distill.losses.sequence import forward_kl

    s, t = torch.randn(6, 9), torch.randn(6, 9)
    probs, ids, tail = sparse_teacher(t)
    kl, uld = mapped_kl(s, probs, ids, tail, torch.arange(9))
    assert float(kl.mean()) == pytest.approx(float(forward_kl(s, t)), abs=1e-5)
    assert float(uld.max()) < 1e-6


def test_mapped_kl_gradient_flows_into_the_student_only():
    s = torch.randn(4, 5, requires_grad=True)
    probs, ids, tail = sparse_teacher(torch.randn(4, 6), k=3)
    kl, uld = mapped_kl(s, probs, ids, tail, torch.tensor([0, 1, 2, -1, 4, -1]))
    (kl + uld).sum().backward()
    assert s.grad is not None and torch.isfinite(s.grad).all() and s.grad.abs().sum() > 0


# --------------------------------------------------------------------------- alignment, by hand


def test_align_positions_with_words_split_differently():
    from distill.nlp.align import align_positions

    # "unbelievable cats": teacher "unbel|ievable| cats", student "un|believ|able| ca|ts"
    t_ends = [5, 12, 17]
    s_ends = [2, 8, 12, 15, 17]
    align, fallback = align_positions(s_ends, t_ends, t_len=2)  # the last teacher token predicts nothing
    assert align == [
        -1,
        -1,
        1,
        -1,
        -1,
    ]  # only "able" ends where a teacher token does (and predicts " ca"/" cats")
    assert fallback == [-1, 0, 0, 1, 1]
    # with <eos> after "cats" (span -1) the last teacher position predicts it, and aligns with "ts"
    align, fallback = align_positions(s_ends + [-1], t_ends + [-1], t_len=3)
    assert align == [-1, -1, 1, -1, 2, -1]


# --------------------------------------------------------------------------- with real tokenizers

transformers = pytest.importorskip("transformers")
pytest.importorskip("tokenizers")

TEXTS = [
    "unbelievable things happen to believable people every day.",
    "the cat sat on the mat, and the cat was happy about it.",
    "people believe what they want to believe, most of the time.",
    "a happy cat is an unbelievable sight on a rainy day.",
] * 10


@pytest.fixture(scope="module")
def toks():
    from distill.data.text import train_tokenizer

    return train_tokenizer(TEXTS, vocab_size=330, kind="bpe"), train_tokenizer(
        TEXTS, vocab_size=270, kind="bpe"
    )


def _gpt2(tok, seed, width=16):
    cfg = transformers.GPT2Config(
        vocab_size=len(tok), n_embd=width, n_layer=1, n_head=2, n_positions=64, pad_token_id=tok.pad_token_id
    )
    torch.manual_seed(seed)
    return transformers.GPT2LMHeadModel(cfg).eval()


def _student_out(model, batch):
    return Outputs(logits=model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits)


def test_the_two_tokenizers_split_some_word_differently(toks):
    t_tok, s_tok = toks
    t = t_tok.convert_ids_to_tokens(t_tok(TEXTS[0])["input_ids"])
    s = s_tok.convert_ids_to_tokens(s_tok(TEXTS[0])["input_ids"])
    assert t != s and len(s) > len(t)


def test_vocab_map_exact_and_prefix(toks):
    from distill.nlp.align import vocab_map

    t_tok, s_tok = toks
    exact, prefix = vocab_map(t_tok, s_tok), vocab_map(t_tok, s_tok, mode="prefix")
    s_vocab = s_tok.get_vocab()
    for tid in range(len(t_tok)):
        raw = t_tok.convert_ids_to_tokens(tid)
        if raw in s_vocab:
            assert exact[tid] == s_vocab[raw] == prefix[tid]
    longer = [i for i in range(len(t_tok)) if t_tok.convert_ids_to_tokens(i) not in s_vocab]
    assert longer  # the teacher's vocabulary is larger
    for tid in longer:
        assert exact[tid] == -1
        text = t_tok.decode([tid])
        assert prefix[tid] == s_tok(text, add_special_tokens=False)["input_ids"][0]


def test_collator_keeps_texts_and_offsets_and_the_model_ignores_them(toks):
    from distill.nlp.adapters import hf_adapter
    from distill.nlp.align import CrossTokenizerCollator

    _, s_tok = toks
    batch = CrossTokenizerCollator(s_tok, max_length=32)(TEXTS[:3])
    assert batch["offset_mapping"].shape == (*batch["input_ids"].shape, 2)
    assert batch["text"] == TEXTS[:3]
    out = hf_adapter()(_gpt2(s_tok, 0), Batch(inputs=batch, targets=batch["labels"]))
    assert out.logits.shape[:2] == batch["input_ids"].shape


def test_same_tokenizer_aligned_kd_equals_forward_kl(toks):
    from distill.losses.sequence import ForwardKL
    from distill.nlp.align import CrossTokenizerCollator
    from distill.nlp.cross import CrossTokenizerTeacher

    tok, _ = toks
    teacher, student = _gpt2(tok, 1), _gpt2(tok, 2)
    data = CrossTokenizerCollator(tok, max_length=20)(TEXTS[:4])
    batch = Batch(inputs=data, targets=data["labels"])
    s_out = _student_out(student, data)
    xt = CrossTokenizerTeacher(teacher, tok, tok, k=None, max_length=20)(batch)
    ours = AlignedKD()(s_out, xt, batch)
    ref = ForwardKL()(s_out, _student_out(teacher, data), batch)
    assert float(ours) == pytest.approx(float(ref), rel=1e-5, abs=1e-7)


def _batch(s_tok, texts, max_length=24):
    from distill.nlp.align import CrossTokenizerCollator

    data = CrossTokenizerCollator(s_tok, max_length=max_length)(texts)
    return data, Batch(inputs=data, targets=data["labels"])


@pytest.mark.parametrize("term", [AlignedKD(), ULD(), ULD(positions="chars"), AlignedKD(unaligned="skip")])
def test_offline_store_equals_online_teacher_on_the_same_batch(toks, tmp_path, term):
    from distill.nlp.cross import CachedCrossTokenizerTeacher, CrossTokenizerTeacher, write_cross_store

    t_tok, s_tok = toks
    teacher, student = _gpt2(t_tok, 1), _gpt2(s_tok, 2)
    data, batch = _batch(s_tok, TEXTS[:4])
    s_out = _student_out(student, data)
    online = CrossTokenizerTeacher(teacher, t_tok, s_tok, k=8, max_length=24)(batch)
    man = write_cross_store(
        tmp_path / "s32", teacher, t_tok, TEXTS, k=8, max_length=24, dtype="float32", batch_size=3
    )
    assert man["bytes_per_token"] > 8 * 8
    offline = CachedCrossTokenizerTeacher(tmp_path / "s32", s_tok, teacher=teacher)(batch)
    a, b = term(s_out, online, batch), term(s_out, offline, batch)
    assert float(a) > 0
    assert float(a) == pytest.approx(float(b), abs=1e-5)
    write_cross_store(tmp_path / "s16", teacher, t_tok, TEXTS, k=8, max_length=24, verbose=False)
    c = term(s_out, CachedCrossTokenizerTeacher(tmp_path / "s16", s_tok)(batch), batch)
    assert float(c) == pytest.approx(float(a), abs=2e-3)  # float16 probabilities


def test_aligned_positions_see_the_same_prefix(toks):
    from distill.nlp.align import token_offsets
    from distill.nlp.cross import CrossTokenizerTeacher

    t_tok, s_tok = toks
    data, batch = _batch(s_tok, TEXTS[:2], max_length=40)
    xt = CrossTokenizerTeacher(_gpt2(t_tok, 1), t_tok, s_tok, k=4, max_length=40)(batch).extras["xt"][
        "teacher"
    ]
    _, t_offs = token_offsets(t_tok, TEXTS[:2], 40)
    n_aligned = 0
    for r, text in enumerate(TEXTS[:2]):
        for j, i in enumerate(xt["align"][r].tolist()):
            if i >= 0:
                assert text[: int(data["offset_mapping"][r, j, 1])] == text[: t_offs[r][i][1]]
                n_aligned += 1
    assert n_aligned >= 10
    # some student positions inside words have no partner, and fall back to an earlier teacher position
    fb = xt["fallback"][xt["align"] < 0]
    assert (fb >= 0).any()


def test_with_bos_the_first_positions_align_and_the_first_token_is_trained(toks):
    from distill.nlp.align import CrossTokenizerCollator
    from distill.nlp.cross import CrossTokenizerTeacher

    t_tok, s_tok = toks
    data = CrossTokenizerCollator(s_tok, max_length=24, add_bos=True)(TEXTS[:2])
    batch = Batch(inputs=data, targets=data["labels"])
    assert (data["input_ids"][:, 0] == s_tok.eos_token_id).all()
    xt = CrossTokenizerTeacher(_gpt2(t_tok, 1), t_tok, s_tok, max_length=24, add_bos=True)(batch)
    assert xt.extras["xt"]["teacher"]["align"][:, 0].tolist() == [0, 0]


def test_two_teachers_with_different_tokenizers_train_the_student(toks):
    from distill.nlp.cross import CrossTeachers, CrossTokenizerTeacher
    from distill.objective import Objective

    t_tok, s_tok = toks
    student = _gpt2(s_tok, 2)
    data, batch = _batch(s_tok, TEXTS[:4])
    both = CrossTeachers(
        CrossTokenizerTeacher(_gpt2(t_tok, 1), t_tok, s_tok, name="bpe330"),
        CrossTokenizerTeacher([_gpt2(s_tok, 3), _gpt2(s_tok, 4)], s_tok, s_tok, name="same", k=None),
    )
    out = both(batch)
    assert set(out.extras["xt"]) == {"bpe330", "same"}
    obj = Objective(
        {"a": AlignedKD(teacher="bpe330"), "b": AlignedKD(teacher="same")},
        weights={"a": {"name": "linear", "start": 0.0, "end": 1.0}, "b": 1.0},
    )
    terms = obj(_student_out(student, data), out, batch)
    terms["loss"].backward()
    assert all(p.grad is not None for p in student.lm_head.parameters())
    with pytest.raises(DistillError, match="got 2 teachers"):
        AlignedKD()(_student_out(student, data), out, batch)


def test_terms_are_registered_and_validate():
    assert isinstance(LOSSES.build("uld"), ULD)
    assert isinstance(LOSSES.build("aligned_kd", uld_weight=0.5), AlignedKD)
    with pytest.raises(DistillError, match="uld.positions 'word' is not one of index, chars"):
        ULD(positions="word")
    with pytest.raises(DistillError, match="needs a teacher with another tokenizer"):
        AlignedKD()(
            Outputs(logits=torch.randn(1, 3, 5)), Outputs(logits=torch.randn(1, 3, 5)), Batch(inputs={})
        )


# --------------------------------------------------------------------------- bad input, one line each


def test_tokenizer_without_offsets_is_refused_with_what_to_do(toks):
    from distill.nlp.align import CrossTokenizerCollator

    slow = transformers.PreTrainedTokenizer.__new__(transformers.PreTrainedTokenizer)
    with pytest.raises(DistillError, match=r"gives no character offsets.*use_fast=True") as e:
        CrossTokenizerCollator(slow)
    assert "\n" not in str(e.value)


def test_store_of_another_teacher_or_other_texts_is_refused(toks, tmp_path):
    from distill.nlp.cross import CachedCrossTokenizerTeacher, write_cross_store

    t_tok, s_tok = toks
    teacher = _gpt2(t_tok, 1)
    write_cross_store(tmp_path / "s", teacher, t_tok, TEXTS[:2], k=4, max_length=24, verbose=False)
    with pytest.raises(DistillError, match="written by other teacher weights"):
        CachedCrossTokenizerTeacher(tmp_path / "s", s_tok, teacher=_gpt2(t_tok, 9))
    cached = CachedCrossTokenizerTeacher(tmp_path / "s", s_tok, teacher=teacher)
    _, batch = _batch(s_tok, TEXTS[:3])
    with pytest.raises(DistillError, match="text not in teacher store .* written for other texts"):
        cached(batch)
    with pytest.raises(DistillError, match="not a cross-tokenizer teacher store"):
        CachedCrossTokenizerTeacher(tmp_path / "nothing", s_tok)


def test_tokenizers_with_no_common_characters_are_refused():
    from distill.data.text import train_tokenizer
    from distill.nlp.align import vocab_map

    latin = train_tokenizer(["abcabdcab"] * 5, kind="char")
    greek = train_tokenizer(["αβγαβδγαβ"] * 5, kind="char")
    with pytest.raises(DistillError, match="share no characters"):
        vocab_map(latin, greek)


def test_same_vocab_check_names_the_cross_tokenizer_term(toks):
    from distill.nlp import check_same_vocab

    with pytest.raises(DistillError, match="use the aligned_kd term"):
        check_same_vocab(*toks)


@pytest.mark.slow
def test_benchmark_end_to_end_store_rows_match_online_rows(tmp_path, monkeypatch):
    """The benchmark on a tiny budget: every row trains; from the store == online (same bits/char)."""
    import importlib.util
    import json
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    monkeypatch.syspath_prepend(str(root / "benchmarks"))
    spec = importlib.util.spec_from_file_location(
        "bench_cross_tokenizer", root / "benchmarks" / "cross_tokenizer.py"
    )
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    small = "--teacher-steps 10 --student-steps 5 --val 20 --timing-steps 2 --teacher-vocab 600 --second-vocab 500"
    small += f" --student-vocab 400 --eval-length 128 --out {tmp_path}"
    assert mod.main(small.split()) == 0
    rows = {r["name"]: r for r in json.loads((tmp_path / "summary.json").read_text())["rows"]}
    assert set(mod.RUNS) <= set(rows)
    assert all(math.isfinite(r["bpc"]) and r["bpc"] > 0 for r in rows.values())
    assert rows["uld_store"]["bpc"] == pytest.approx(rows["uld"]["bpc"], abs=2e-3)
    assert rows["aligned_store"]["bpc"] == pytest.approx(rows["aligned"]["bpc"], abs=2e-3)
