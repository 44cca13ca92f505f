"""Teachers with another tokenizer: ULD, the character alignment, the token map, the store."""

from __future__ import annotations

import math
import re

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


def _gpt2(tok, seed, width=16, positions=64):
    cfg = transformers.GPT2Config(
        vocab_size=len(tok),
        n_embd=width,
        n_layer=1,
        n_head=2,
        n_positions=positions,
        pad_token_id=tok.pad_token_id,
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
    assert batch["byte_ends"].shape == batch["input_ids"].shape
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
    # What each position has read is decoded from its own tokens by each tokenizer, apart from
    # the offsets and byte counts the alignment is computed from, so a wrong pair fails here.
    from distill.nlp.cross import CrossTokenizerTeacher

    t_tok, s_tok = toks
    texts = [TEXTS[0], TEXTS[1] + " unbelievably"]
    data, batch = _batch(s_tok, texts, max_length=64)
    xt = CrossTokenizerTeacher(_gpt2(t_tok, 1), t_tok, s_tok, k=4, max_length=64)(batch).extras["xt"][
        "teacher"
    ]
    n_aligned = 0
    for r, text in enumerate(texts):
        s_ids = data["input_ids"][r, : int(data["attention_mask"][r].sum()) - 1].tolist()  # without <eos>
        t_ids = t_tok(text, add_special_tokens=False)["input_ids"]
        assert len(t_ids) < 63 and len(s_ids) < 63  # not cut: every text position predicts a token
        s_read = [s_tok.decode(s_ids[: j + 1]) for j in range(len(s_ids))]
        t_read = [t_tok.decode(t_ids[: i + 1]) for i in range(len(t_ids))]
        align = xt["align"][r].tolist()
        for j, read in enumerate(s_read):
            if align[j] >= 0:
                assert t_read[align[j]] == read, (j, read)
                n_aligned += 1
            else:  # no partner only where the teacher never stopped after the same text
                assert read not in t_read, (j, read)
    assert 10 <= n_aligned < sum(len(s_tok(t)["input_ids"]) for t in texts)
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
    # a store of the character-span format (before the alignment by bytes): written again, not misread
    man = tmp_path / "s" / "manifest.json"
    man.write_text(man.read_text().replace('"version": 2', '"version": 1'))
    with pytest.raises(DistillError, match="has format 1, this distill reads 2.*write it again") as e:
        CachedCrossTokenizerTeacher(tmp_path / "s", s_tok)
    assert "\n" not in str(e.value)


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


# --------------------------------------------------------------------------- the inputs that break tokenizers
# Three tokenizer families trained here in well under a second: GPT-2 style (byte-level BPE,
# offsets trimmed of their leading space), Llama 2 style (SentencePiece BPE, `▁` marker put
# before the text, byte fallback `<0xNN>` at low ids) and T5/Gemma style (Unigram, `▁`, byte fallback).

BREAKERS = ["a 😀 b  ünïcödé", "🙂x unbelievable", "  hi   there", "Hello, café naïve 🎉!"]
CORPUS = TEXTS[:4] + ["ünïcödé text with café and naïve", "emoji 😀 and 🎉 and  two  spaces"] * 3


def _byte_fallback_vocab(pieces: list[str]) -> list[str]:
    return (
        ["<unk>", "<s>", "</s>"]
        + [f"<0x{b:02X}>" for b in range(256)]
        + [p for p in pieces if not p.startswith("<")]
    )


def _gpt2_style():
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=True)
    tok.train_from_iterator(
        CORPUS,
        trainers.BpeTrainer(
            vocab_size=320,
            special_tokens=["<|endoftext|>"],
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
            show_progress=False,
        ),
    )
    e = "<|endoftext|>"
    return transformers.PreTrainedTokenizerFast(tokenizer_object=tok, eos_token=e, bos_token=e, pad_token=e)


def _sentencepiece_style(kind: str):
    import json

    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    meta = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first", split=kind == "unigram")
    base = Tokenizer(models.BPE(unk_token="<unk>") if kind == "bpe" else models.Unigram())
    base.pre_tokenizer = meta
    specials = ["<unk>", "<s>", "</s>"]
    if kind == "bpe":
        trainer = trainers.BpeTrainer(vocab_size=420, special_tokens=specials, show_progress=False)
    else:
        trainer = trainers.UnigramTrainer(
            vocab_size=300, special_tokens=specials, unk_token="<unk>", show_progress=False
        )
    base.train_from_iterator(CORPUS, trainer)
    spec = json.loads(base.to_str())["model"]
    if kind == "bpe":
        order = sorted(spec["vocab"], key=spec["vocab"].get)
        vocab = {p: i for i, p in enumerate(_byte_fallback_vocab(order))}
        merges = [tuple(m) if isinstance(m, list) else tuple(m.split(" ")) for m in spec["merges"]]
        model = models.BPE(vocab=vocab, merges=merges, unk_token="<unk>", byte_fallback=True)
    else:
        scores = dict(spec["vocab"])
        vocab = [
            (p, scores.get(p, -20.0 if p.startswith("<0x") else 0.0))
            for p in _byte_fallback_vocab(list(scores))
        ]
        model = models.Unigram(vocab, unk_id=0, byte_fallback=True)
    tok = Tokenizer(model)
    tok.add_special_tokens(specials)
    tok.pre_tokenizer = meta
    tok.decoder = decoders.Sequence(
        [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(), decoders.Strip(" ", 1, 0)]
    )
    return transformers.PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>", pad_token="<unk>"
    )


@pytest.fixture(scope="module")
def zoo():
    return {
        "gpt2": _gpt2_style(),
        "llama": _sentencepiece_style("bpe"),
        "unigram": _sentencepiece_style("unigram"),
    }


def _consumed(tok, ids: list[int], text: str) -> list[int]:
    """Ground truth written apart from distill: the bytes of `text` read through each token, from
    the raw tokens (a character of the byte-level alphabet is one byte, so is `<0xNN>`; `▁` is a
    space, the first one the tokenizer's own when the text does not start with one); bos 0, eos -1."""
    byte_level = "Ġ" in "".join(tok.get_vocab())
    total, out = 0, []
    for k, (i, raw) in enumerate(zip(ids, tok.convert_ids_to_tokens(ids))):
        if i in tok.all_special_ids:
            out.append(0 if k == 0 else -1)
            continue
        if byte_level:
            n = len(raw)
        elif re.fullmatch(r"<0x[0-9A-F]{2}>", raw):
            n = 1
        else:
            n = len(raw.replace("▁", " ").encode())
            if total == 0 and raw.startswith("▁") and not text.startswith(" "):
                n -= 1
        total += n
        out.append(total)
    return out


@pytest.mark.parametrize("name", ["gpt2", "llama", "unigram"])
def test_byte_ends_are_the_text_each_token_has_read(zoo, name):
    from distill.nlp.align import TokenBytes

    tok = zoo[name]
    ids, ends = TokenBytes(tok).encode(BREAKERS, 64, add_eos=True, add_bos=True)
    kinds = set()
    for text, row, got in zip(BREAKERS, ids, ends):
        assert got == _consumed(tok, row, text), tok.convert_ids_to_tokens(row)
        data = text.encode()
        assert got[-2] == len(data)  # the last text token has read all of it
        kinds |= {r for r in tok.convert_ids_to_tokens(row) if r in ("▁", "Ġ") or r.startswith("<0x")}
        kinds |= {"mid-char"} if any(0 < e < len(data) and _mid_char(data, e) for e in got) else set()
    # the texts did reach what they are for: tokens ending inside a character, byte fallback, a lone marker
    assert "mid-char" in kinds and ({"Ġ"} <= kinds if name == "gpt2" else {"▁", "<0xF0>"} <= kinds)


def _mid_char(data: bytes, e: int) -> bool:
    return (data[e] & 0xC0) == 0x80  # the next byte continues a character


@pytest.mark.parametrize("name", ["gpt2", "llama", "unigram"])
@pytest.mark.parametrize("add_bos", [True, False])
def test_aligned_loss_of_a_model_against_itself_is_zero(zoo, name, add_bos):
    from distill.nlp.align import CrossTokenizerCollator
    from distill.nlp.cross import CrossTokenizerTeacher

    tok = zoo[name]
    model = _gpt2(tok, 3, width=8)
    data = CrossTokenizerCollator(tok, max_length=40, add_bos=add_bos)(BREAKERS)
    batch = Batch(inputs=data, targets=data["labels"])
    xt = CrossTokenizerTeacher(model, tok, tok, k=None, max_length=40, add_bos=add_bos)(batch)
    out = _student_out(model, data)
    counted = data["labels"][:, 1:] != -100
    assert (xt.extras["xt"]["teacher"]["align"][:, :-1][counted] >= 0).all()  # every position has its partner
    for term in (AlignedKD(), ULD(positions="chars"), AlignedKD(unaligned="skip")):
        assert float(term(out, xt, batch)) == pytest.approx(0.0, abs=1e-5)


@pytest.mark.parametrize(
    "pair", [("gpt2", "llama"), ("llama", "gpt2"), ("unigram", "gpt2"), ("llama", "unigram")]
)
def test_across_families_aligned_pairs_have_read_the_same_text_and_none_is_missed(zoo, pair):
    from distill.nlp.align import CrossTokenizerCollator, bos_id
    from distill.nlp.cross import CrossTokenizerTeacher

    t_tok, s_tok = zoo[pair[0]], zoo[pair[1]]
    data = CrossTokenizerCollator(s_tok, max_length=48, add_bos=True)(BREAKERS)
    batch = Batch(inputs=data, targets=data["labels"])
    xt = CrossTokenizerTeacher(_gpt2(t_tok, 1, width=8), t_tok, s_tok, k=4, max_length=48, add_bos=True)(
        batch
    )
    align = xt.extras["xt"]["teacher"]["align"]
    n_aligned = 0
    for r, text in enumerate(BREAKERS):
        t_ids = [bos_id(t_tok)] + t_tok(text, add_special_tokens=False)["input_ids"]
        s_ids = [i for i in data["input_ids"][r].tolist()][: int(data["attention_mask"][r].sum())]
        s_read, t_read = _consumed(s_tok, s_ids, text), _consumed(t_tok, t_ids, text)
        pairs = [(j, i) for j, i in enumerate(align[r].tolist()[: len(s_ids)]) if i >= 0]
        for j, i in pairs:
            assert s_read[j] == t_read[i] >= 0, (text, j, i)
        # none missed: every text read by both sides is paired as often as the rarer side reads it
        for c in set(s_read) - {-1}:
            assert sum(s_read[j] == c for j, _ in pairs) == min(s_read.count(c), t_read.count(c)), (text, c)
        n_aligned += len(pairs)
    assert n_aligned >= 20


# --------------------------------------------------------------------------- the token map across families


def test_vocab_map_across_families_makes_the_space_explicit(zoo):
    from distill.nlp.align import vocab_map

    g, ll = zoo["gpt2"], zoo["llama"]
    g_vocab, l_vocab = g.get_vocab(), ll.get_vocab()
    words = [t[1:] for t in g_vocab if t[:1] == "Ġ" and t[1:].isalpha() and "▁" + t[1:] in l_vocab]
    assert len(words) >= 6
    for t, s, t_mark, s_mark in ((g, ll, "Ġ", "▁"), (ll, g, "▁", "Ġ")):
        m, tv, sv = vocab_map(t, s), t.get_vocab(), s.get_vocab()
        for w in words:
            assert int(m[tv[t_mark + w]]) == sv[s_mark + w], w
            if w in tv and w in sv:  # inside a word (no space) to inside a word
                assert int(m[tv[w]]) == sv[w], w
    # a byte-level fragment of a character maps to the byte-fallback token of that byte
    m = vocab_map(g, ll)
    frag = [i for t, i in g_vocab.items() if len(t) == 1 and ord(t) >= 256 and t != "Ġ"]
    for i in frag[:20]:
        b = g.convert_ids_to_tokens(i)
        assert ll.convert_ids_to_tokens(int(m[i])).startswith("<0x"), b


@pytest.mark.parametrize("name", ["gpt2", "llama", "unigram"])
def test_a_tokenizer_maps_onto_itself_on_every_id_it_emits(zoo, name):
    from distill.nlp.align import vocab_map

    tok = zoo[name]
    m = vocab_map(tok, tok)
    emitted = {
        i
        for t in CORPUS + BREAKERS + ["a", "b", " a", "Hi", "x y z"]
        for i in tok(t, add_special_tokens=False)["input_ids"]
    }
    wrong = sorted(tok.convert_ids_to_tokens(i) for i in emitted if int(m[i]) != i)
    assert not wrong
    # the ids it never emits too: a byte-fallback token to itself, not to the token of the same text
    assert (m == torch.arange(len(m))).all()
    if name != "gpt2":
        a = tok.convert_tokens_to_ids("<0x61>")
        assert int(m[a]) == a and a not in emitted


# --------------------------------------------------------------------------- a teacher wider than its tokenizer


def _padded_pair(tok, extra=13, seed=1):
    """The same GPT-2 twice: with an embedding `extra` rows wider than the tokenizer (Qwen, Phi,
    Pythia), padding rows loud enough to win every top-k, and cut to `len(tok)` rows."""
    wide = _gpt2(tok, seed)
    cfg = transformers.GPT2Config(**{**wide.config.to_dict(), "vocab_size": len(tok) + extra})
    padded = transformers.GPT2LMHeadModel(cfg).eval()
    sd = wide.state_dict()
    with torch.no_grad():
        for k, v in padded.state_dict().items():
            v.copy_(sd[k]) if v.shape == sd[k].shape else (
                v.copy_(torch.randn_like(v) * 50),
                v[: len(tok)].copy_(sd[k]),
            )
    return padded, wide


def test_padded_teacher_vocabulary_is_dropped_online_and_in_the_store(zoo, tmp_path):
    from distill.nlp.cross import CachedCrossTokenizerTeacher, CrossTokenizerTeacher, write_cross_store

    t_tok, s_tok = zoo["gpt2"], zoo["llama"]
    padded, plain = _padded_pair(t_tok)
    data = _collate(s_tok, BREAKERS)
    batch = Batch(inputs=data, targets=data["labels"])
    x = torch.tensor([t_tok("a cat", add_special_tokens=False)["input_ids"]])
    assert padded(input_ids=x).logits.shape[-1] > len(t_tok)
    assert padded(input_ids=x).logits[..., len(t_tok) :].abs().max() > 10  # the padding would win
    s_out = _student_out(_gpt2(s_tok, 2), data)
    for term in (AlignedKD(), ULD(), AlignedKD(temperature=2.0)):
        got = term(s_out, CrossTokenizerTeacher(padded, t_tok, s_tok, k=8, max_length=40)(batch), batch)
        ref = term(s_out, CrossTokenizerTeacher(plain, t_tok, s_tok, k=8, max_length=40)(batch), batch)
        assert float(got) == pytest.approx(float(ref), abs=1e-6)
    # two teachers of one tokenizer padded to different widths (Qwen2.5 7B and 0.5B) average fine
    both = CrossTokenizerTeacher([padded, _gpt2(t_tok, 5)], t_tok, s_tok, k=8, max_length=40)(batch)
    ref = CrossTokenizerTeacher([plain, _gpt2(t_tok, 5)], t_tok, s_tok, k=8, max_length=40)(batch)
    assert float(AlignedKD()(s_out, both, batch)) == pytest.approx(
        float(AlignedKD()(s_out, ref, batch)), abs=1e-6
    )
    write_cross_store(
        tmp_path / "s", padded, t_tok, BREAKERS, k=8, max_length=40, dtype="float32", verbose=False
    )
    stored = CachedCrossTokenizerTeacher(tmp_path / "s", s_tok, teacher=padded)(batch)
    assert int(stored.extras["xt"]["teacher"]["ids"].max()) < len(t_tok)
    online = CrossTokenizerTeacher(plain, t_tok, s_tok, k=8, max_length=40)(batch)
    assert float(AlignedKD()(s_out, stored, batch)) == pytest.approx(
        float(AlignedKD()(s_out, online, batch)), abs=1e-5
    )


def test_padded_columns_in_the_plain_functions_carry_no_token():
    logits = torch.randn(3, 5)
    wide = torch.cat([logits, torch.full((3, 4), 30.0)], dim=-1)  # 4 padding columns that would win
    probs, ids, tail = sparse_teacher(wide, k=3, vocab_size=5)
    ref = sparse_teacher(logits, k=3)
    assert all(torch.equal(a, b) for a, b in zip((probs, ids, tail), ref))
    s = torch.randn(3, 6)
    assert float(uld_loss(s, wide, teacher_vocab_size=5)) == pytest.approx(
        float(uld_loss(s, logits)), abs=1e-6
    )
    # ids past the map (a store of a padded teacher) are dropped, not an index error
    p_all, i_all, t_all = sparse_teacher(wide, k=6)
    kl, uld = mapped_kl(s, p_all, i_all, t_all, torch.arange(5))
    assert torch.isfinite(kl).all() and torch.isfinite(uld).all()


def _collate(tok, texts, max_length=40):
    from distill.nlp.align import CrossTokenizerCollator

    return CrossTokenizerCollator(tok, max_length=max_length)(texts)


# --------------------------------------------------------------------------- a tokenizer without offsets


def _slow_char_tokenizer(lower: bool = False):
    """A slow (pure Python) tokenizer, one token per character: it gives no character offsets."""

    class CharTokenizer(transformers.PreTrainedTokenizer):
        def __init__(self, **kw):
            self._v = {"<pad>": 0, "<eos>": 1, "<unk>": 2}
            for c in sorted(set("".join(CORPUS + BREAKERS))):
                self._v.setdefault(c, len(self._v))
            self._inv = {i: t for t, i in self._v.items()}
            super().__init__(pad_token="<pad>", eos_token="<eos>", unk_token="<unk>", **kw)

        @property
        def vocab_size(self):
            return len(self._v)

        def get_vocab(self):
            return dict(self._v)

        def _tokenize(self, text, **kw):
            return list(text.lower() if lower else text)

        def _convert_token_to_id(self, t):
            return self._v.get(t, 2)

        def _convert_id_to_token(self, i):
            return self._inv[i]

    return CharTokenizer()


def test_a_tokenizer_without_offsets_aligns_by_its_tokens_bytes(zoo):
    from distill.nlp.align import CrossTokenizerCollator
    from distill.nlp.cross import CrossTokenizerTeacher

    slow, fast = _slow_char_tokenizer(), zoo["gpt2"]
    assert not slow.is_fast
    data = CrossTokenizerCollator(slow, max_length=48, add_bos=True)(BREAKERS)
    batch = Batch(inputs=data, targets=data["labels"])
    for r, text in enumerate(BREAKERS):
        n = int(data["attention_mask"][r].sum())
        assert data["byte_ends"][r, :n].tolist() == _consumed(slow, data["input_ids"][r, :n].tolist(), text)
    model = _gpt2(slow, 4, width=8)
    xt = CrossTokenizerTeacher(model, slow, slow, k=None, max_length=48, add_bos=True)(batch)
    assert float(AlignedKD()(_student_out(model, data), xt, batch)) == pytest.approx(0.0, abs=1e-5)
    # a fast teacher: each character boundary the teacher stops at is a pair
    xt = CrossTokenizerTeacher(_gpt2(fast, 1, width=8), fast, slow, k=4, max_length=48, add_bos=True)(batch)
    assert (xt.extras["xt"]["teacher"]["align"] >= 0).sum() >= 20
    # one whose tokens do not spell the text back (it lowercases) cannot be placed: refused in one line
    with pytest.raises(DistillError, match="gives no character offsets and its tokens do not spell") as e:
        CrossTokenizerCollator(_slow_char_tokenizer(lower=True))
    assert "\n" not in str(e.value)


@pytest.mark.parametrize("norm", ["NFKC", "Lowercase", "NFD"])
def test_a_normalising_tokenizer_places_a_token_only_where_its_read_text_is_known(norm):
    # Qwen normalises (NFC), some tokenizers lowercase: their tokens are not the text's bytes, and
    # their spans can stop short (NFKC merges "e" + a combining accent into "é" with the span of "e").
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers

    from distill.nlp.align import TokenBytes

    tok = Tokenizer(models.BPE())
    tok.normalizer = getattr(normalizers, norm)()
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    alphabet = pre_tokenizers.ByteLevel.alphabet()
    tok.train_from_iterator(
        ["the ﬁne café is naïve", "Hello WORLD ＡＢＣ"] * 10,
        trainers.BpeTrainer(
            vocab_size=300, special_tokens=["<e>"], initial_alphabet=alphabet, show_progress=False
        ),
    )
    fast = transformers.PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<e>", pad_token="<e>")
    texts = ["cafe\u0301 x ﬁne", "Hello WORLD ＡＢＣ café", "ﬁne ﬂow"]
    ids, ends = TokenBytes(fast).encode(texts, 99, add_eos=False)
    placed = 0
    for text, row, got in zip(texts, ids, ends):
        data = text.encode()
        for k, c in enumerate(got):
            if c < 0 or (c < len(data) and (data[c] & 0xC0) == 0x80):
                continue  # unknown, or inside a character (the byte tokens' own test checks those)
            read = tok.normalizer.normalize_str(data[:c].decode())
            assert read == fast.decode(row[: k + 1]), (text, k, c)
            placed += 1
    assert placed >= 10
