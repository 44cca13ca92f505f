"""Evaluation a chat user trusts (distill.nlp.chat_eval) on tiny Llama / GPT-2 models and a tiny
ChatML tokenizer built here: no teacher download."""

from __future__ import annotations

import math

import pytest
import torch

transformers = pytest.importorskip("transformers")

from distill.errors import DistillError  # noqa: E402
from distill.nlp import chat_eval as ce  # noqa: E402

CHATML = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
TEXTS = [
    "what is the capital of france",
    "the capital of france is paris.",
    "name a red fruit",
    "a cherry is a red fruit.",
    "why is the sky blue",
    "light scatters in the air, so the sky looks blue.",
]
PROMPTS = ["what is the capital of france", "name a red fruit", "why is the sky blue?", "hi"]
ANSWERS = ["the capital of france is paris.", "a cherry.", "light scatters.", "hello there, friend."]


@pytest.fixture(scope="module")
def tok():
    from distill.data.text import train_tokenizer

    t = train_tokenizer(TEXTS * 3, vocab_size=300, kind="bpe")
    t.add_special_tokens({"additional_special_tokens": ["<|im_start|>", "<|im_end|>"]})
    t.chat_template = CHATML
    return t


def llama(tok, seed=0, layers=2):
    cfg = transformers.LlamaConfig(
        vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=layers,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
        pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id, tie_word_embeddings=False,
    )  # fmt: skip
    torch.manual_seed(seed)
    return transformers.LlamaForCausalLM(cfg).eval()


def gpt2(tok, seed=0):
    cfg = transformers.GPT2Config(
        vocab_size=len(tok), n_embd=32, n_layer=2, n_head=2, n_positions=128,
        pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id,
    )  # fmt: skip
    torch.manual_seed(seed)
    return transformers.GPT2LMHeadModel(cfg).eval()


def always(model, token: int):
    """Makes a GPT-2 predict `token` at every position: ln_f outputs a constant along that
    token's (enlarged) embedding, so its logit wins."""
    with torch.no_grad():
        wte = model.transformer.wte.weight
        wte[token] *= 10
        model.transformer.ln_f.weight.zero_()
        model.transformer.ln_f.bias.copy_(wte[token])
    return model


# --------------------------------------------------------------------------- rendering


def test_the_answer_is_its_content_and_the_end_of_turn_token(tok):
    eot = tok.convert_tokens_to_ids("<|im_end|>")
    assert ce.end_of_turn_id(tok) == eot != tok.eos_token_id
    prompt = ce.render_prompt(tok, "name a red fruit")
    assert tok.decode(prompt).endswith("<|im_start|>assistant\n")
    ans = ce.render_answer(tok, "name a red fruit", "a cherry.")
    # no role header before, nothing of the template after the end of turn
    assert ans == tok("a cherry.", add_special_tokens=False)["input_ids"] + [eot]
    assert ce.render_answer(tok, "name a red fruit", "a cherry.", end=False) == ans[:-1]
    # a string prompt is one user turn; a conversation splits into prompt and reference
    msgs, ref = ce.split_reference(
        {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]}
    )
    assert ce.render_prompt(tok, msgs) == ce.render_prompt(tok, "hi") and ref == "hello"


def test_a_template_without_a_known_marker_ends_turns_with_eos(tok):
    from distill.nlp.text_data import SIMPLE_CHAT_TEMPLATE

    other = type(tok)(tokenizer_object=tok._tokenizer, eos_token=tok.eos_token, pad_token=tok.pad_token)
    other.chat_template = SIMPLE_CHAT_TEMPLATE
    assert ce.end_of_turn_id(other) == other.eos_token_id
    assert ce.render_answer(other, "hi", "hello")[-1] == other.eos_token_id


def test_bad_prompts_fail_in_one_line(tok):
    with pytest.raises(DistillError, match="does not end with an assistant turn"):
        ce.split_reference([{"role": "user", "content": "hi"}])
    with pytest.raises(DistillError, match="needs 'prompt' or 'messages'"):
        ce.render_prompt(tok, {"question": "hi"})
    no_template = type(tok)(tokenizer_object=tok._tokenizer, eos_token=tok.eos_token)
    with pytest.raises(DistillError, match="no chat template"):
        ce.render_prompt(no_template, "hi")


# --------------------------------------------------------------------------- generation


@pytest.mark.parametrize("arch", [llama, gpt2])
def test_batched_greedy_answers_equal_one_at_a_time(tok, arch):
    """Left padding is right: a prompt's answer does not depend on the others in its batch."""
    model = arch(tok)
    together = ce.greedy_answers(model, tok, PROMPTS, max_new_tokens=8, batch_size=4)
    alone = [ce.greedy_answers(model, tok, [p], max_new_tokens=8)[0] for p in PROMPTS]
    assert [a.ids for a in together] == [a.ids for a in alone]
    assert all(0 < len(a.ids) <= 8 for a in together)


def test_eos_rate_counts_answers_that_end_before_the_cap(tok):
    eot = ce.end_of_turn_id(tok)
    stops = ce.greedy_answers(always(gpt2(tok), eot), tok, PROMPTS, max_new_tokens=6)
    assert all(a.ids == [eot] and a.ended and a.text == "" for a in stops)
    assert ce.eos_rate(stops) == 1.0
    (word,) = tok(" the", add_special_tokens=False)["input_ids"]  # " the the the ..."
    loops = ce.greedy_answers(always(gpt2(tok), word), tok, PROMPTS, max_new_tokens=6)
    assert all(len(a.ids) == 6 and not a.ended for a in loops)
    assert ce.eos_rate(loops) == 0.0 and ce.repeat_rate(loops) == 1.0


def test_a_prompt_that_fills_the_context_fails_in_one_line(tok):
    model = gpt2(tok)
    model.config.n_positions = 8
    with pytest.raises(DistillError, match="fills the model's 8 positions"):
        ce.greedy_answers(model, tok, ["what is the capital of france and why"], max_new_tokens=4)


def test_generation_speed_reports_tokens_per_second_per_batch_size(tok):
    speed = ce.generation_speed(llama(tok), tok, PROMPTS[:2], batch_sizes=(1, 3), new_tokens=4, repeats=1)
    assert set(speed) == {"gen_tokens_per_s_b1", "gen_tokens_per_s_b3"}
    assert all(v > 0 for v in speed.values())


# --------------------------------------------------------------------------- scoring


@torch.no_grad()
def _plain_nll(model, prompt, answer):
    ids = torch.tensor([prompt + answer])
    logits = model(input_ids=ids).logits[0, len(prompt) - 1 : -1].float()
    return float(
        torch.nn.functional.cross_entropy(logits, torch.tensor(answer, dtype=torch.long), reduction="sum")
    )


def test_answer_ppl_is_the_perplexity_of_the_answer_tokens_whatever_the_batching(tok):
    model = llama(tok)
    total = tokens = 0
    for p, a in zip(PROMPTS, ANSWERS):
        ids = ce.render_answer(tok, p, a)
        total += _plain_nll(model, ce.render_prompt(tok, p), ids)
        tokens += len(ids)
    want = math.exp(total / tokens)
    assert ce.answer_ppl(model, tok, PROMPTS, ANSWERS, batch_size=1) == pytest.approx(want, rel=1e-4)
    assert ce.answer_ppl(model, tok, PROMPTS, ANSWERS, batch_size=3) == pytest.approx(want, rel=1e-4)


def test_teacher_nll_scores_the_generated_ids_or_the_text_across_tokenizers(tok):
    from distill.data.text import train_tokenizer

    (word,) = tok(" the", add_special_tokens=False)["input_ids"]
    student, teacher = always(gpt2(tok, seed=1), word), llama(tok, seed=2)
    answers = ce.greedy_answers(student, tok, PROMPTS, max_new_tokens=6)
    ps = [ce.render_prompt(tok, p) for p in PROMPTS]
    pairs = [(_plain_nll(teacher, p, a.ids), len(a.ids)) for p, a in zip(ps, answers)]
    want = sum(s for s, _ in pairs) / sum(n for _, n in pairs)
    assert ce.teacher_nll(teacher, tok, PROMPTS, answers) == pytest.approx(want, rel=1e-4)

    # another tokenizer: the teacher reads the answers' text, in its own tokens and template
    t_tok = train_tokenizer(TEXTS * 3, vocab_size=280, kind="bpe")
    t_tok.add_special_tokens({"additional_special_tokens": ["<|im_start|>", "<|im_end|>"]})
    t_tok.chat_template = CHATML
    other = llama(t_tok, seed=3)
    texts = [ce.render_answer(t_tok, p, a.text, end=a.ended) for p, a in zip(PROMPTS, answers)]
    assert all(texts)
    pairs = [(_plain_nll(other, ce.render_prompt(t_tok, p), t), len(t)) for p, t in zip(PROMPTS, texts)]
    want = sum(s for s, _ in pairs) / sum(n for _, n in pairs)
    got = ce.teacher_nll(other, tok, PROMPTS, answers, teacher_tokenizer=t_tok)
    assert got == pytest.approx(want, rel=1e-4)


def test_rouge_l_is_the_lcs_f_measure_of_words():
    # LCS("the cat on the mat", "the cat sat on the mat") = 5: P = 1, R = 5/6
    assert ce.rouge_l_f("the cat on the mat", "the cat sat on the mat") == pytest.approx(
        2 * (5 / 6) / (1 + 5 / 6)
    )
    assert ce.rouge_l_f("The Cat, on the MAT!", "the cat sat on the mat") == pytest.approx(10 / 11)
    assert ce.rouge_l_f("paris", "paris") == 1.0
    assert ce.rouge_l_f("", "paris") == 0.0 and ce.rouge_l_f("london", "paris") == 0.0
    assert ce.rouge_l_f("b a", "a b") == pytest.approx(0.5)  # order matters: LCS 1
    assert ce.lcs_length("ABCBDAB", "BDCABA") == 4
    assert ce.rouge_l(["paris", "london"], ["paris", "paris"]) == pytest.approx(0.5)


def test_repeat_rate_flags_answers_that_loop():
    assert ce.repeats_itself("Paris. Paris. Paris. Paris.")
    assert ce.repeats_itself("I am a bot. I am a bot. I am a bot.")
    assert ce.repeats_itself("no no no no no no")
    assert not ce.repeats_itself("The capital of France is Paris. It is a big city.")
    assert not ce.repeats_itself("I am a bot. I am a bot.")  # twice is not a loop
    assert ce.repeat_rate(["no no no no no no", "yes", "fine", "ok"]) == 0.25


def test_chat_metrics_on_conversations_with_the_teacher_as_its_own_judge(tok):
    teacher = llama(tok, seed=4)
    answers = ce.greedy_answers(teacher, tok, PROMPTS, max_new_tokens=6)
    convs = [
        [{"role": "user", "content": p}, {"role": "assistant", "content": a.text}]
        for p, a in zip(PROMPTS, answers)
    ]
    row = ce.chat_metrics(teacher, tok, convs, teacher=teacher, max_new_tokens=6)
    assert {"answer_ppl", "teacher_nll", "rouge_l", "eos_rate", "repeat_rate", "answer_tokens"} <= set(row)
    assert [a.ids for a in row["answers"]] == [a.ids for a in answers]
    words = [bool(ce._words(a.text)) for a in answers]
    assert row["rouge_l"] == pytest.approx(sum(words) / len(words))  # its own answers, word for word
    assert row["prompts"] == 4 and row["answer_ppl"] > 1
