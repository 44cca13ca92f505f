"""Served / API teachers: top-k log-probabilities in the OpenAI format, from a file or a local server."""

from __future__ import annotations

import json
import math
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
import torch

from distill.errors import DistillError
from distill.losses.cross_tokenizer import AlignedKD, mapped_kl
from distill.outputs import Batch, Outputs

transformers = pytest.importorskip("transformers")

ANSWERS = [
    "the cat sat on the mat, and the cat was happy about it.",
    "people believe what they want to believe, most of the time.",
    "a happy cat is an unbelievable sight on a rainy day.",
]
PROMPTS = ["where did the cat sit?", "what do people believe?", "what is a happy cat?"]
CORPUS = ANSWERS * 10 + PROMPTS * 5 + ["unbelievable things happen to believable people every day."] * 10


@pytest.fixture(scope="module")
def toks():
    from distill.data.text import train_tokenizer

    return train_tokenizer(CORPUS, vocab_size=330, kind="bpe"), train_tokenizer(
        CORPUS, vocab_size=270, kind="bpe"
    )


def _gpt2(tok, seed, width=16):
    cfg = transformers.GPT2Config(
        vocab_size=len(tok), n_embd=width, n_layer=1, n_head=2, n_positions=96, pad_token_id=tok.pad_token_id
    )
    torch.manual_seed(seed)
    return transformers.GPT2LMHeadModel(cfg).eval()


def _write(path, records, tail: bytes = b"\n"):
    path.write_bytes(b"\n".join(json.dumps(r).encode() for r in records) + tail)
    return path


def _batch(tok, texts, add_bos=True, max_length=64):
    from distill.nlp.align import CrossTokenizerCollator

    data = CrossTokenizerCollator(tok, max_length=max_length, add_bos=add_bos)(texts)
    return data, Batch(inputs=data, targets=data["labels"])


def _hand_record(top, text="a", tokens=("a",)):
    from distill.nlp.served import record_line

    alts = [[(t.encode(), lp) for t, lp in pos] for pos in top]
    return record_line("p", text, [t.encode() for t in tokens], alts)


# ---- the format -----------------------------------------------------------------------------


def test_same_tokenizer_served_targets_equal_the_model_own_topk(toks, tmp_path):
    """A model recorded through the JSON format gives, at every aligned student position, the
    top-k the model itself gives online (same tokenizer: strings map to the same ids)."""
    from distill.nlp.cross import CrossTokenizerTeacher
    from distill.nlp.served import ServedTeacher, record_model

    tok, _ = toks
    teacher = _gpt2(tok, 1)
    f = _write(tmp_path / "r.jsonl", record_model(teacher, tok, list(zip(PROMPTS, ANSWERS)), k=5))
    served = ServedTeacher(f, tok, k=5)
    assert served.texts == ANSWERS
    _, batch = _batch(tok, ANSWERS)
    s = served(batch).extras["xt"]["teacher"]
    o = CrossTokenizerTeacher(teacher, tok, tok, k=5, max_length=64, add_bos=True)(batch).extras["xt"][
        "teacher"
    ]
    mask = batch.inputs["attention_mask"].bool() & (batch.inputs["byte_ends"] >= 0)
    both = mask & (s["align"] >= 0)
    # The same positions, but the last token's (it predicts <eos>, which a server does not return).
    inside = batch.inputs["byte_ends"] < torch.tensor([len(a.encode()) for a in ANSWERS])[:, None]
    assert both.sum() >= 20 and torch.equal(both, mask & (o["align"] >= 0) & inside)
    for b, t in both.nonzero().tolist():
        i, j = int(s["align"][b, t]), int(o["align"][b, t])
        torch.testing.assert_close(s["probs"][b, i], o["probs"][b, j], atol=1e-5, rtol=1e-5)
        sid = s["map"][s["ids"][b, i]]  # served strings -> the student's (here: the same) ids
        assert torch.equal(sid, o["ids"][b, j])
        torch.testing.assert_close(s["tail"][b, i], o["tail"][b, j], atol=1e-5, rtol=1e-4)


def test_other_student_tokenizer_trains_through_aligned_kd(toks, tmp_path):
    from distill.nlp.served import ServedTeacher, record_model

    t_tok, s_tok = toks
    f = _write(tmp_path / "r.jsonl", record_model(_gpt2(t_tok, 1), t_tok, list(zip(PROMPTS, ANSWERS)), k=4))
    served = ServedTeacher(f, s_tok, k=4, prompt_template="Q: {prompt}\nA: ")
    assert served.texts[0] == f"Q: {PROMPTS[0]}\nA: {ANSWERS[0]}"
    data, batch = _batch(s_tok, served.texts)
    xt = served(batch)
    student = _gpt2(s_tok, 2)
    logits = student(input_ids=data["input_ids"], attention_mask=data["attention_mask"]).logits
    loss = AlignedKD()(Outputs(logits=logits), xt, batch)
    assert torch.isfinite(loss.detach()) and float(loss.detach()) > 0
    loss.backward()
    assert student.lm_head.weight.grad.abs().sum() > 0
    entry = xt.extras["xt"]["teacher"]
    # Student positions inside the prompt get no teacher target; the answers' positions do.
    prompt_bytes = len(b"Q: ") + len(PROMPTS[0].encode()) + len(b"\nA: ")
    row = data["byte_ends"][0]
    assert (entry["align"][0][(row >= 0) & (row < prompt_bytes)] < 0).all()
    assert (entry["align"][0][(row >= prompt_bytes)] >= 0).sum() > 10


def test_tail_mass_is_a_bucket_not_renormalised_away(toks, tmp_path):
    from distill.nlp.served import ServedTeacher

    tok, _ = toks
    top = [
        [("the", math.log(0.5)), (" cat", math.log(0.2))],
        [(" cat", math.log(0.6)), ("the", math.log(0.1))],
    ]
    f = _write(tmp_path / "r.jsonl", [_hand_record(top, "the cat", ("the", " cat"))])
    served = ServedTeacher(f, tok, k=2)
    assert served.mass_kept == pytest.approx([0.55, 0.7])  # mean over the two tokens at k=1, k=2
    assert served.summary()["mass_kept"] == served.mass_kept
    _, batch = _batch(tok, ["the cat"])
    e = served(batch).extras["xt"]["teacher"]
    assert e["tail"][0].tolist() == pytest.approx([0.3, 0.3])
    # The tail sits in the KL's "other" bucket: with it the loss is not the renormalised one.
    logits = torch.randn(1, len(tok))
    p, ids, vmap = e["probs"][0, :1], e["ids"][0, :1], e["map"]
    with_tail, _ = mapped_kl(logits, p, ids, e["tail"][0, :1], vmap)
    renorm, _ = mapped_kl(logits, p / p.sum(-1, keepdim=True), ids, torch.zeros(1), vmap)
    log_q = torch.log_softmax(logits, -1)[0]
    sid = vmap[ids[0]]
    q_other = 1 - log_q[sid].exp().sum()
    by_hand = sum(float(pi * (pi.log() - log_q[s])) for pi, s in zip(p[0], sid)) + 0.3 * math.log(
        0.3 / q_other
    )
    assert float(with_tail) == pytest.approx(by_hand, rel=1e-5)
    assert float(with_tail) != pytest.approx(float(renorm), rel=1e-3)


def test_temperature_other_than_one_is_refused_for_a_served_teacher(toks, tmp_path):
    from distill.nlp.served import ServedTeacher

    tok, _ = toks
    f = _write(tmp_path / "r.jsonl", [_hand_record([[("a", math.log(0.5)), ("b", math.log(0.2))]])])
    data, batch = _batch(tok, ["a"])
    xt = ServedTeacher(f, tok, k=2)(batch)
    logits = torch.randn(*data["input_ids"].shape, len(tok))
    assert torch.isfinite(AlignedKD()(Outputs(logits=logits), xt, batch))
    with pytest.raises(DistillError, match="set temperature: 1") as e:
        AlignedKD(temperature=2.0)(Outputs(logits=logits), xt, batch)
    assert "\n" not in str(e.value)


# ---- bad input, one line each ------------------------------------------------------------------


def _one_line(fn, match):
    with pytest.raises(DistillError, match=match) as e:
        fn()
    assert "\n" not in str(e.value)


def test_bad_files_are_refused_in_one_line(toks, tmp_path):
    from distill.data.text import train_tokenizer
    from distill.nlp.served import ServedTeacher, read_responses

    tok, _ = toks
    good = _hand_record([[("a", -0.1), ("b", -3.0)]])
    f = _write(tmp_path / "spell.jsonl", [_hand_record([[("a", -0.1)]], text="b")])
    _one_line(lambda: read_responses(f), "do not spell the response text")
    f = _write(tmp_path / "none.jsonl", [_hand_record([[]])])
    _one_line(lambda: read_responses(f), "no alternatives")
    f = _write(tmp_path / "few.jsonl", [good])
    _one_line(lambda: ServedTeacher(f, tok, k=5), "returned 2 alternatives at token 0, fewer than k=5")
    raw = json.dumps(good).encode()
    (tmp_path / "cut.jsonl").write_bytes(raw + b"\n" + raw[: len(raw) // 2])
    _one_line(lambda: read_responses(tmp_path / "cut.jsonl"), "last line is truncated")
    (tmp_path / "mid.jsonl").write_bytes(raw[:20] + b"\n" + raw + b"\n")
    _one_line(lambda: read_responses(tmp_path / "mid.jsonl"), "mid.jsonl:1: not a complete JSON object")
    nolp = json.loads(raw)
    del nolp["response"]["choices"][0]["logprobs"]
    f = _write(tmp_path / "nolp.jsonl", [nolp])
    _one_line(lambda: read_responses(f), "logprobs: true")
    greek = train_tokenizer(["αβγαβδγαβ"] * 5, kind="char")
    f = _write(tmp_path / "latin.jsonl", [good])
    _one_line(lambda: ServedTeacher(f, greek, k=2), "share no characters")
    _, batch = _batch(tok, ["not in the file"])
    _one_line(lambda: ServedTeacher(f, tok, k=2)(batch), "text not in responses file")


# ---- fetching once from an OpenAI-compatible server ----------------------------------------------


class _Server:
    """A local OpenAI-compatible endpoint serving recorded responses by prompt (no internet)."""

    def __init__(self, answers: dict[str, dict], alternatives: int | None = None):
        self.answers, self.asked, self.alternatives = answers, [], alternatives
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):  # noqa: N802 (http.server's name)
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                prompt = body["messages"][-1]["content"]
                outer.asked.append((self.path, prompt, body["top_logprobs"], body["logprobs"]))
                if prompt not in outer.answers:
                    self.send_response(404)
                    self.end_headers()
                    self.wfile.write(b'{"error": "unknown prompt"}')
                    return
                resp = json.loads(json.dumps(outer.answers[prompt]))
                for e in resp["choices"][0]["logprobs"]["content"]:
                    e["top_logprobs"] = e["top_logprobs"][: body["top_logprobs"]][: outer.alternatives]
                data = json.dumps(resp).encode()
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def log_message(self, *a):
                pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/v1"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *a):
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture(scope="module")
def recorded(toks):
    from distill.nlp.served import record_model

    tok, _ = toks
    recs = record_model(_gpt2(tok, 1), tok, list(zip(PROMPTS, ANSWERS)), k=6)
    return {r["prompt"]: r["response"] for r in recs}


def test_fetch_once_then_resume_without_refetching(toks, tmp_path, recorded):
    from distill.nlp.served import ServedTeacher, fetch_responses, read_responses

    tok, _ = toks
    f = tmp_path / "fetched.jsonl"
    with _Server(recorded) as srv:
        assert fetch_responses(f, srv.url, "tiny", PROMPTS[:2], top_logprobs=6) == 2
        assert [a[1] for a in srv.asked] == PROMPTS[:2]
        assert srv.asked[0][0] == "/v1/chat/completions" and srv.asked[0][2:] == (6, True)
        # An interrupted fetch: the second line was being written when it stopped.
        data = f.read_bytes()
        f.write_bytes(data[: len(data) - 40])
        srv.asked.clear()
        assert fetch_responses(f, srv.url, "tiny", PROMPTS, top_logprobs=6) == 2
        assert [a[1] for a in srv.asked] == PROMPTS[1:]  # the first is not asked again
        srv.asked.clear()
        assert fetch_responses(f, srv.url, "tiny", PROMPTS, top_logprobs=6) == 0 and not srv.asked
    rs = read_responses(f, 6)
    assert [r.prompt for r in rs] == PROMPTS and [r.text for r in rs] == ANSWERS
    assert ServedTeacher(f, tok, k=6).texts == ANSWERS


def test_fetch_refuses_a_server_with_fewer_alternatives_and_writes_nothing(tmp_path, recorded):
    from distill.nlp.served import fetch_responses

    f = tmp_path / "few.jsonl"
    with _Server(recorded, alternatives=3) as srv:
        _one_line(
            lambda: fetch_responses(f, srv.url, "m", PROMPTS, top_logprobs=5), "returned 3 alternatives"
        )
    assert f.read_bytes() == b""
    with _Server(recorded, alternatives=0) as srv:
        _one_line(lambda: fetch_responses(f, srv.url, "m", PROMPTS, top_logprobs=5), "no alternatives")
    with _Server(recorded) as srv:
        _one_line(lambda: fetch_responses(f, srv.url, "m", ["unknown?"], top_logprobs=5), "answered HTTP 404")
    _one_line(lambda: fetch_responses(f, srv.url, "m", PROMPTS, top_logprobs=5), "cannot reach the server")
    _one_line(lambda: fetch_responses(f, "http://127.0.0.1:1/v1", "m", PROMPTS, top_logprobs=21), "1..20")


def test_cross_store_records_the_teacher_mass_kept_at_each_k(toks, tmp_path, capsys):
    from distill.losses.cross_tokenizer import sparse_teacher
    from distill.nlp.align import TokenBytes
    from distill.nlp.collate import pad_batch
    from distill.nlp.cross import write_cross_store

    tok, _ = toks
    teacher = _gpt2(tok, 1)
    man = write_cross_store(tmp_path / "s", teacher, tok, ANSWERS, k=4, max_length=64, dtype="float32")
    assert "teacher mass kept by the top-k (mean over tokens): k=1 " in capsys.readouterr().out
    ids, _ = TokenBytes(tok).encode(ANSWERS, 64)
    enc = pad_batch(ids, None, tok.pad_token_id)
    probs, _, _ = sparse_teacher(teacher(**enc).logits, 4)  # (B, T, 4)
    rows = probs[enc["attention_mask"].bool()]
    ref = rows.double().cumsum(-1).mean(0).tolist()
    assert man["mass_kept"] == pytest.approx(ref, abs=1e-5) and len(man["mass_kept"]) == 4


def test_recipe_spec_validates_in_one_line_and_fetches_once(toks, tmp_path, recorded):
    from distill.errors import ConfigError
    from distill.run.served import served_teacher

    tok, _ = toks
    f = str(tmp_path / "spec.jsonl")
    for spec, match in [
        ({"file": f, "top_logprobs": 21}, r"teacher\.served\.top_logprobs: .*less than or equal to 20"),
        ({"file": f, "endpoint": "http://127.0.0.1:1/v1"}, "endpoint needs model"),
        ({"file": f, "top_logprobs": 5, "k": 6}, r"k \(6\) is more than the top_logprobs \(5\)"),
        ({"file": f, "topk": 5}, r"unknown key 'teacher\.served\.topk'"),
        ({"file": f, "endpoint": "http://x/v1", "model": "m"}, "give the prompts"),
    ]:
        with pytest.raises(ConfigError, match=match) as e:
            served_teacher(spec, tok)
        assert "\n" not in str(e.value)
    with _Server(recorded) as srv:
        spec = {"file": f, "endpoint": srv.url, "model": "m", "top_logprobs": 6, "k": 4}
        t = served_teacher(spec, tok, PROMPTS)
        assert t.k == 4 and t.texts == ANSWERS and len(srv.asked) == 3
        served_teacher(spec, tok, PROMPTS)
        assert len(srv.asked) == 3  # answered already: nothing asked again


def test_half_a_character_is_read_from_bytes_not_the_token_string(toks, tmp_path):
    """OpenAI writes a token that is half a UTF-8 character as 'bytes:\\xc3' with `bytes` [195]."""
    from distill.nlp.served import ServedTeacher, read_responses, record_line

    tok, _ = toks
    rec = record_line(
        "p",
        "é a",
        [b"\xc3", b"\xa9", b" a"],
        [[(b"\xc3", -0.1), (b"a", -3.0)], [(b"\xa9", -0.2), (b"\xa8", -2.0)], [(b" a", -0.3), (b" b", -2.5)]],
    )
    for e in rec["response"]["choices"][0]["logprobs"]["content"]:
        e["token"] = (
            "bytes:" + "".join(f"\\x{b:02x}" for b in e["bytes"]) if len(e["bytes"]) == 1 else e["token"]
        )
    f = _write(tmp_path / "mb.jsonl", [rec])
    assert read_responses(f)[0].tokens == [b"\xc3", b"\xa9", b" a"]
    served = ServedTeacher(f, tok, k=2)
    _, batch = _batch(tok, ["é a"])
    e = served(batch).extras["xt"]["teacher"]
    assert e["valid"][0].tolist() == [True, True, True]
    # the byte-level student has tokens for both halves: each maps to the student token of those bytes
    from distill.nlp.align import TokenBytes

    pieces = TokenBytes(tok).pieces
    assert pieces[int(e["map"][int(e["ids"][0, 0, 0])])] == b"\xc3"
    assert pieces[int(e["map"][int(e["ids"][0, 1, 0])])] == b"\xa9"


@pytest.mark.slow
def test_runnable_recipe_end_to_end_on_a_tiny_budget(tmp_path, monkeypatch, capsys):
    """The recipe's script: records a tiny teacher, serves and fetches it, trains both rows; then
    the same again from the file it wrote (`--responses`), with the same served numbers."""
    import importlib.util
    from pathlib import Path

    from distill.data.text import FORTUNES_DIR

    if not Path(FORTUNES_DIR).is_dir():
        pytest.skip("needs Debian's fortunes: apt-get install -y fortunes")
    root = Path(__file__).resolve().parents[1]
    monkeypatch.syspath_prepend(str(root / "benchmarks"))
    spec = importlib.util.spec_from_file_location(
        "bench_served_teacher", root / "benchmarks" / "served_teacher.py"
    )
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    small = f"--texts 40 --val 10 --teacher-steps 4 --student-steps 3 --top-logprobs 8 --k 8 --out {tmp_path / 'a'}"
    assert mod.main(small.split()) == 0
    assert "teacher mass kept by the top-k (mean over tokens): k=1 " in capsys.readouterr().out
    first = json.loads((tmp_path / "a" / "served_teacher.json").read_text())
    assert [r["method"] for r in first["rows"]] == ["teacher", "labels", "served"]
    assert len(first["served"]["mass_kept"]) == 8
    again = (
        small.replace(str(tmp_path / "a"), str(tmp_path / "b"))
        + f" --responses {tmp_path / 'a' / 'responses.jsonl'}"
    )
    assert mod.main(again.split()) == 0
    second = json.loads((tmp_path / "b" / "served_teacher.json").read_text())
    assert second["served"] == first["served"]
    for s, f in zip(second["rows"], first["rows"][1:]):  # no teacher row: the file is the teacher
        assert (s["method"], s["bits_per_char"]) == (f["method"], pytest.approx(f["bits_per_char"], abs=1e-4))
