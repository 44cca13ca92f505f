"""Evaluation a chat user trusts, on held-out prompts: the measures, as plain functions.

Call them on `(model, tokenizer, held-out prompts, the teacher's answers)`:

    from distill.nlp.chat_eval import chat_metrics, generation_speed
    row = chat_metrics(student, tok, prompts, teacher_answers, teacher=teacher)
    # {"answer_ppl", "teacher_nll", "rouge_l", "eos_rate", "repeat_rate", "answer_tokens", "answers"}
    row |= generation_speed(student, tok, prompts, batch_sizes=(1, 32))
    # {"gen_tokens_per_s_b1", "gen_tokens_per_s_b32"}

A prompt is a string (one user turn), a list of chat messages (`{"role", "content"}`), a record
`{"prompt": ...}` / `{"messages": [...]}`, or token ids already rendered. Conversations that end
with an assistant turn are split by `split_reference` into the prompt and its reference answer.

The measures (each also a function of its own):
  - `answer_ppl`: the model's perplexity of the reference answers (the teacher's), on the
    answer's tokens only: its content and the end-of-turn token, after the prompt rendered with
    the chat template and its generation prompt (`<|im_start|>assistant\\n`), never the role
    header or what the template writes after the end of turn.
  - `greedy_answers`: the model's own answers, greedy, through `model.generate` (KV cache) on
    left-padded batches (the project's `generate_batch`); each knows whether it ended with the
    end-of-turn token before the `max_new_tokens` cap.
  - `teacher_nll`: the mean NLL per token of those answers under the teacher, the tokens of
    all answers pooled (a long answer weighs more, as in perplexity). With one tokenizer the
    generated token ids are scored as they are; when the teacher's tokenizer differs (pass
    `teacher_tokenizer`), each answer's text is rendered again with the teacher's tokenizer and
    chat template and scored per teacher token, so every student is judged in the same units.
  - `rouge_l`: the mean over prompts of the ROUGE-L F-measure (Lin 2004; beta 1, as
    `rouge-score`'s `fmeasure`) between an answer and its reference; words are lowercased runs of
    letters and digits (rouge-score's default tokenizer, extended to letters of any script; no stemming).
  - `eos_rate`: the share of answers that ended with the end-of-turn token before the cap.
  - `repeat_rate`: the share of answers that repeat themselves: some run of `n` = 4 words
    (punctuation marks count as words) occurs `times` = 3 or more times in the answer: the
    loop a small model falls into ("Paris. Paris. Paris. ..."), rare in a real answer.
  - `generation_speed`: new tokens per second when generating exactly `new_tokens` tokens for a
    batch of 1 and of 32 prompts (greedy, KV cache, fixed threads), prefill included.

The end-of-turn token is the chat template's own marker when it uses a known one (`<|im_end|>`,
`<|eot_id|>`, `<end_of_turn>`, `<|end|>`), else the tokenizer's eos token.
"""

from __future__ import annotations

import math
import re
import time
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from distill.errors import DistillError
from distill.nlp.collate import pad_batch
from distill.nlp.generation import generate_batch

# End-of-turn markers of the common chat templates (ChatML, Llama 3, Gemma, Phi-3).
END_OF_TURN_MARKERS = ("<|im_end|>", "<|eot_id|>", "<end_of_turn>", "<|end|>")


@dataclass
class Answer:
    """A generated answer: its text (special tokens dropped), the generated token ids (the
    end-of-turn token included when it came) and whether it came before the length cap."""

    text: str
    ids: list[int]
    ended: bool


# --------------------------------------------------------------------------- prompts and answers


def as_messages(prompt: Any) -> list[dict[str, str]]:
    """A prompt as chat messages: a string is one user turn."""
    if isinstance(prompt, str):
        return [{"role": "user", "content": prompt}]
    if isinstance(prompt, Mapping):
        if "messages" in prompt:
            return as_messages(prompt["messages"])
        if "prompt" in prompt:
            return as_messages(prompt["prompt"])
        raise DistillError(f"a prompt record needs 'prompt' or 'messages'; got keys {', '.join(prompt)}")
    if isinstance(prompt, Sequence) and all(
        isinstance(m, Mapping) and {"role", "content"} <= set(m) for m in prompt
    ):
        if not prompt:
            raise DistillError("a prompt has no messages")
        return [{"role": str(m["role"]), "content": str(m["content"])} for m in prompt]
    raise DistillError(
        f"a prompt must be a string, a list of {{role, content}} messages or token ids; got {type(prompt).__name__}"
    )


def split_reference(conversation: Any) -> tuple[list[dict[str, str]], str]:
    """A conversation that ends with an assistant turn -> (the messages before it, its content)."""
    msgs = as_messages(conversation)
    if msgs[-1]["role"] != "assistant":
        raise DistillError(
            "the conversation does not end with an assistant turn: there is no reference answer"
        )
    if len(msgs) < 2:
        raise DistillError("the conversation is only an assistant turn: there is no prompt")
    return msgs[:-1], msgs[-1]["content"]


def _is_ids(prompt: Any) -> bool:
    return (
        isinstance(prompt, Sequence)
        and not isinstance(prompt, str)
        and all(isinstance(t, int) for t in prompt)
    )


def end_of_turn_id(tokenizer) -> int | None:
    """The token that ends an assistant turn (see the module docstring)."""
    template = getattr(tokenizer, "chat_template", None) or ""
    if isinstance(template, str):
        unk = getattr(tokenizer, "unk_token_id", None)
        for marker in END_OF_TURN_MARKERS:
            if marker in template:
                i = tokenizer.convert_tokens_to_ids(marker)
                if isinstance(i, int) and i != unk:
                    return i
    return tokenizer.eos_token_id


def _template(tokenizer, messages, generation_prompt: bool) -> str:
    if not getattr(tokenizer, "chat_template", None):
        raise DistillError(
            "the tokenizer has no chat template; set tokenizer.chat_template (for a tokenizer trained "
            "here: distill.nlp.text_data.SIMPLE_CHAT_TEMPLATE)"
        )
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=generation_prompt)


def _ids(tokenizer, text: str) -> list[int]:
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


def render_prompt(tokenizer, prompt: Any) -> list[int]:
    """The prompt's token ids, rendered with the chat template and its generation prompt."""
    if _is_ids(prompt):
        return list(prompt)
    return _ids(tokenizer, _template(tokenizer, as_messages(prompt), True))


def render_answer(tokenizer, prompt: Any, answer: str, end: bool = True) -> list[int]:
    """The answer's token ids as they follow the rendered prompt: what the template writes for the
    assistant turn after the generation prompt, up to and including the end-of-turn token (left out
    with `end=False`, for an answer cut by the length cap)."""
    if _is_ids(prompt):
        raise DistillError("a prompt given as token ids needs its answer as token ids too")
    eot = end_of_turn_id(tokenizer)
    msgs = as_messages(prompt)
    head = _template(tokenizer, msgs, True)
    full = _template(tokenizer, [*msgs, {"role": "assistant", "content": answer}], False)
    if full.startswith(head):
        ids = _ids(tokenizer, full[len(head) :])
    else:  # a template that renders the assistant turn differently after a generation prompt
        ids = _ids(tokenizer, answer) + ([eot] if eot is not None else [])
    if eot is not None and eot in ids:
        ids = ids[: ids.index(eot) + 1]
    if not end and ids and ids[-1] == eot:
        ids = ids[:-1]
    return ids


def max_positions(model: nn.Module) -> int | None:
    """The model's context length in tokens (None when its config does not say)."""
    cfg = getattr(model, "config", None)
    for attr in ("n_positions", "max_position_embeddings"):
        n = getattr(cfg, attr, None)
        if isinstance(n, int) and n > 0:
            return n
    return None


def pad_id(tokenizer) -> int:
    """The id to pad with: the pad token, else the end-of-turn or eos token (padding is masked)."""
    for i in (tokenizer.pad_token_id, end_of_turn_id(tokenizer), tokenizer.eos_token_id):
        if i is not None:
            return int(i)
    return 0


def _device(model: nn.Module) -> torch.device:
    return next(model.parameters()).device


@dataclass
class HeldOut:
    """One held-out exchange from a tokenized dataset row: the prompt's token ids (through the
    generation prompt), the reference answer's ids (through the end-of-turn token when it has one)
    and its text."""

    prompt_ids: list[int]
    answer_ids: list[int]
    reference: str


def _generation_header(tokenizer) -> list[int]:
    """The tokens the chat template adds for `add_generation_prompt` (`<|im_start|>assistant\\n`)."""
    if not getattr(tokenizer, "chat_template", None):
        return []
    probe = [{"role": "user", "content": "x"}]
    with_header, without = _template(tokenizer, probe, True), _template(tokenizer, probe, False)
    if not with_header.startswith(without):
        return []
    return _ids(tokenizer, with_header[len(without) :])


def heldout_from_rows(tokenizer, rows: Sequence[Mapping[str, Any]]) -> list[HeldOut]:
    """Held-out exchanges from tokenized chat rows (`{input_ids, labels}`, labels -100 outside
    assistant turns: what distill's chat, prompt_response and fortune_chat data hold).

    The prompt is everything before the first labelled token; the reference is that first run of
    labelled tokens, cut after the end-of-turn token. When the run starts with the template's
    generation prompt (`render_chat` labels the whole assistant turn, its role header included),
    the header moves to the prompt, so the model is scored and generates exactly as in `render_answer`."""
    eot = end_of_turn_id(tokenizer)
    header = _generation_header(tokenizer)
    out = []
    for row in rows:
        ids, labels = list(row["input_ids"]), list(row["labels"])
        first = next((i for i, lab in enumerate(labels) if lab != -100), None)
        if first is None or first == 0:
            raise DistillError(
                "the chat evaluator needs conversations: rows with a prompt before a labelled answer "
                "(chat, prompt_response or fortune_chat data), not plain text"
            )
        end = first
        while end < len(labels) and labels[end] != -100:
            end += 1
        prompt, answer = ids[:first], ids[first:end]
        if header and answer[: len(header)] == header:
            prompt, answer = prompt + header, answer[len(header) :]
        if eot is not None and eot in answer:
            answer = answer[: answer.index(eot) + 1]
        text = answer[:-1] if answer and answer[-1] == eot else answer
        out.append(HeldOut(prompt, answer, tokenizer.decode(text, skip_special_tokens=True).strip()))
    return out


def prompt_text(tokenizer, prompt_ids: Sequence[int]) -> str:
    """The last user turn of a rendered one-turn prompt, for showing it (the whole decoded text,
    special tokens dropped, when the prompt is not one user turn in the template's form)."""
    text = tokenizer.decode(list(prompt_ids), skip_special_tokens=False)
    if getattr(tokenizer, "chat_template", None):
        mark = "\x00"
        before, _, after = _template(tokenizer, [{"role": "user", "content": mark}], True).partition(mark)
        if text.startswith(before) and text.endswith(after) and len(text) >= len(before) + len(after):
            return text[len(before) : len(text) - len(after)].strip()
    return tokenizer.decode(list(prompt_ids), skip_special_tokens=True).strip()


# --------------------------------------------------------------------------- generation


@torch.no_grad()
def greedy_answers(
    model: nn.Module,
    tokenizer,
    prompts: Sequence[Any],
    max_new_tokens: int = 64,
    batch_size: int = 16,
) -> list[Answer]:
    """The model's greedy answers to `prompts`, in their order.

    Prompts of similar length are batched together (sorted by length) so that little of each
    batch is padding; `generate_batch` left-pads them and generates with the KV cache, stopping
    a row at the end-of-turn token. The answers of a prompt that fills the model's context
    fail in one line."""
    rows = [render_prompt(tokenizer, p) for p in prompts]
    eot, pad = end_of_turn_id(tokenizer), pad_id(tokenizer)
    positions = max_positions(model)
    order = sorted(range(len(rows)), key=lambda i: len(rows[i]))
    out: list[Answer | None] = [None] * len(rows)
    for start in range(0, len(order), batch_size):
        idx = order[start : start + batch_size]
        chunk = [rows[i] for i in idx]
        new = max_new_tokens
        if positions is not None:
            new = min(new, positions - max(map(len, chunk)))
            if new < 1:
                raise DistillError(
                    f"a prompt of {max(map(len, chunk))} tokens fills the model's {positions} positions: "
                    "shorten the prompt"
                )
        prompt_batch = {k: v.to(_device(model)) for k, v in pad_batch(chunk, None, pad).items()}
        gen = generate_batch(model, prompt_batch, pad, eot, max_new_tokens=new, do_sample=False)
        for i, labels in zip(idx, gen["labels"].tolist()):
            ids = [t for t in labels if t != -100]
            ended = bool(ids) and eot is not None and ids[-1] == eot
            text = tokenizer.decode(ids[:-1] if ended else ids, skip_special_tokens=True).strip()
            out[i] = Answer(text=text, ids=ids, ended=ended)
    return out  # type: ignore[return-value]


def _left_padded(rows: list[list[int]], pad: int) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(map(len, rows))
    ids = torch.full((len(rows), width), pad, dtype=torch.long)
    att = torch.zeros((len(rows), width), dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, width - len(r) :] = torch.as_tensor(r, dtype=torch.long)
        att[i, width - len(r) :] = 1
    return ids, att


@torch.no_grad()
def generation_speed(
    model: nn.Module,
    tokenizer,
    prompts: Sequence[Any],
    batch_sizes: Sequence[int] = (1, 32),
    new_tokens: int = 32,
    threads: int | None = None,
    repeats: int = 3,
) -> dict[str, float]:
    """New tokens per second (`gen_tokens_per_s_b{B}`) generating exactly `new_tokens` tokens
    (the end-of-turn token does not stop it) for a batch of B prompts (the first B, repeated
    when there are fewer), greedy with the KV cache; the median of `repeats` timed runs after a
    warm-up. `threads`: torch's CPU threads while measuring (restored after)."""
    if not prompts:
        return {}
    rows = [render_prompt(tokenizer, p) for p in prompts]
    pad = pad_id(tokenizer)
    positions = max_positions(model)
    was_training, old_threads = model.training, torch.get_num_threads()
    model.eval()
    if threads:
        torch.set_num_threads(threads)
    out: dict[str, float] = {}
    try:
        for b in batch_sizes:
            chunk = [rows[i % len(rows)] for i in range(b)]
            n = new_tokens if positions is None else min(new_tokens, positions - max(map(len, chunk)))
            if n < 1:
                continue
            ids, att = (t.to(_device(model)) for t in _left_padded(chunk, pad))
            kwargs = {"attention_mask": att, "do_sample": False, "pad_token_id": pad}

            def run(k: int, ids=ids, kwargs=kwargs) -> None:
                model.generate(input_ids=ids, max_new_tokens=k, min_new_tokens=k, **kwargs)

            run(2)  # warm-up
            times = []
            for _ in range(max(1, repeats)):
                t0 = time.perf_counter()
                run(n)
                times.append(time.perf_counter() - t0)
            out[f"gen_tokens_per_s_b{b}"] = b * n / sorted(times)[len(times) // 2]
    finally:
        model.train(was_training)
        torch.set_num_threads(old_threads)
    return out


# --------------------------------------------------------------------------- scoring


@torch.no_grad()
def answer_nlls(
    model: nn.Module,
    prompt_ids: Sequence[Sequence[int]],
    answer_ids: Sequence[Sequence[int]],
    batch_size: int = 8,
) -> list[tuple[float, int]]:
    """Per answer: (the sum of the NLL of its tokens given the prompt and the tokens before, the
    number of tokens), in nats. Batches are right-padded; only answer tokens are scored."""
    if len(prompt_ids) != len(answer_ids):
        raise DistillError(f"{len(prompt_ids)} prompts but {len(answer_ids)} answers")
    positions = max_positions(model)
    was_training = model.training
    model.eval()
    out: list[tuple[float, int]] = []
    try:
        for start in range(0, len(prompt_ids), batch_size):
            ps, ans = prompt_ids[start : start + batch_size], answer_ids[start : start + batch_size]
            seqs = [list(p) + list(a) for p, a in zip(ps, ans)]
            labels = [[-100] * len(p) + list(a) for p, a in zip(ps, ans)]
            if positions is not None:  # what does not fit the context is not scored
                seqs, labels = [s[:positions] for s in seqs], [lab[:positions] for lab in labels]
            batch = {k: v.to(_device(model)) for k, v in pad_batch(seqs, labels, 0).items()}
            logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
            target = batch["labels"][:, 1:]  # position t predicts token t + 1
            nll = F.cross_entropy(
                logits[:, :-1].float().transpose(1, 2), target, ignore_index=-100, reduction="none"
            )  # (B, T - 1)
            keep = target != -100
            out += [(float(n[k].sum()), int(k.sum())) for n, k in zip(nll, keep)]
    finally:
        model.train(was_training)
    return out


def mean_nll(nlls: Sequence[tuple[float, int]]) -> float:
    """The mean NLL per token of `answer_nlls`' results, tokens pooled over answers."""
    tokens = sum(n for _, n in nlls)
    return sum(s for s, _ in nlls) / tokens if tokens else float("nan")


def _answer_ids(tokenizer, prompt: Any, answer: Answer | str | Sequence[int]) -> list[int]:
    if isinstance(answer, Answer):
        return list(answer.ids)
    if isinstance(answer, str):
        return render_answer(tokenizer, prompt, answer)
    return list(answer)


def answer_ppl(
    model: nn.Module, tokenizer, prompts: Sequence[Any], answers: Sequence[Any], batch_size: int = 8
) -> float:
    """The model's perplexity of `answers` (the teacher's: strings, `Answer`s or token ids) to
    `prompts`, over the answer tokens of all of them pooled."""
    ps = [render_prompt(tokenizer, p) for p in prompts]
    ans = [_answer_ids(tokenizer, p, a) for p, a in zip(prompts, answers)]
    return math.exp(mean_nll(answer_nlls(model, ps, ans, batch_size)))


def teacher_nll(
    teacher: nn.Module,
    tokenizer,
    prompts: Sequence[Any],
    answers: Sequence[Answer | str],
    batch_size: int = 8,
    teacher_tokenizer=None,
) -> float:
    """The mean NLL per token, under `teacher`, of `answers` (the student's) to `prompts`.

    `tokenizer` is the student's (it rendered the answers); give `teacher_tokenizer` when the
    teacher's differs: the answers' texts are then rendered with it (see the module docstring)."""
    if teacher_tokenizer is not None and teacher_tokenizer is not tokenizer:
        if any(_is_ids(p) for p in prompts):
            raise DistillError("teacher_nll across tokenizers needs the prompts as text, not token ids")
        tok = teacher_tokenizer
        ans = [
            render_answer(
                tok, p, a.text if isinstance(a, Answer) else a, end=not isinstance(a, Answer) or a.ended
            )
            for p, a in zip(prompts, answers)
        ]
    else:
        tok = tokenizer
        ans = [_answer_ids(tok, p, a) for p, a in zip(prompts, answers)]
    ps = [render_prompt(tok, p) for p in prompts]
    return mean_nll(answer_nlls(teacher, ps, ans, batch_size))


# --------------------------------------------------------------------------- text measures

_WORD = re.compile(r"[^\W_]+")  # letters and digits
_TOKEN = re.compile(r"[^\W_]+|[^\w\s]")  # words, and each punctuation mark as a word


def _words(text: str) -> list[str]:
    return _WORD.findall(text.lower())


def lcs_length(a: Sequence[Any], b: Sequence[Any]) -> int:
    """Length of the longest common subsequence (dynamic programming, one row at a time)."""
    if len(b) > len(a):
        a, b = b, a
    prev = [0] * (len(b) + 1)
    for x in a:
        cur = [0]
        for j, y in enumerate(b):
            cur.append(prev[j] + 1 if x == y else max(prev[j + 1], cur[j]))
        prev = cur
    return prev[-1]


def rouge_l_f(candidate: str, reference: str) -> float:
    """ROUGE-L F-measure of one answer against one reference: with L the LCS of their words,
    precision L / |candidate|, recall L / |reference|, F = 2PR / (P + R); 0 when either is empty."""
    c, r = _words(candidate), _words(reference)
    if not c or not r:
        return 0.0
    lcs = lcs_length(c, r)
    if lcs == 0:
        return 0.0
    p, rec = lcs / len(c), lcs / len(r)
    return 2 * p * rec / (p + rec)


def rouge_l(candidates: Sequence[Answer | str], references: Sequence[str]) -> float:
    """The mean ROUGE-L F-measure over (candidate, reference) pairs."""
    if len(candidates) != len(references):
        raise DistillError(f"{len(candidates)} answers but {len(references)} references")
    if not candidates:
        return float("nan")
    texts = [a.text if isinstance(a, Answer) else a for a in candidates]
    return sum(rouge_l_f(c, r) for c, r in zip(texts, references)) / len(texts)


def eos_rate(answers: Sequence[Answer]) -> float:
    """The share of answers that ended with the end-of-turn token before the length cap."""
    return sum(a.ended for a in answers) / len(answers) if answers else float("nan")


def repeats_itself(text: str, n: int = 4, times: int = 3) -> bool:
    """Whether some run of `n` words (punctuation marks count as words) occurs `times` or more
    times in `text`."""
    w = _TOKEN.findall(text.lower())
    counts = Counter(tuple(w[i : i + n]) for i in range(len(w) - n + 1))
    return bool(counts) and max(counts.values()) >= times


def repeat_rate(answers: Sequence[Answer | str], n: int = 4, times: int = 3) -> float:
    """The share of answers that repeat themselves (`repeats_itself`)."""
    if not answers:
        return float("nan")
    texts = [a.text if isinstance(a, Answer) else a for a in answers]
    return sum(repeats_itself(t, n, times) for t in texts) / len(texts)


# --------------------------------------------------------------------------- all at once


def chat_metrics(
    model: nn.Module,
    tokenizer,
    prompts: Sequence[Any],
    references: Sequence[str] | None = None,
    teacher: nn.Module | None = None,
    teacher_tokenizer=None,
    max_new_tokens: int = 64,
    batch_size: int = 16,
    answers: Sequence[Answer] | None = None,
) -> dict[str, Any]:
    """Every measure of the module docstring but speed, for one model on held-out prompts.

    Args:
        prompts: held-out prompts; with `references=None`, conversations that end with the
            reference (the teacher's) answer.
        references: the teacher's answers, as text.
        teacher: scores the model's greedy answers (`teacher_nll`); left out without it.
        answers: the model's greedy answers when already generated (else generated here).

    Returns:
        `answer_ppl`, `teacher_nll`, `rouge_l`, `eos_rate`, `repeat_rate`, `answer_tokens` (the
        mean number of generated tokens), `prompts` (as counted) and `answers` (the `Answer`s).
    """
    if references is None:
        pairs = [split_reference(c) for c in prompts]
        prompts, references = [p for p, _ in pairs], [r for _, r in pairs]
    if len(prompts) != len(references):
        raise DistillError(f"{len(prompts)} prompts but {len(references)} reference answers")
    if not prompts:
        raise DistillError("no held-out prompts to evaluate on")
    if answers is None:
        answers = greedy_answers(model, tokenizer, prompts, max_new_tokens, batch_size)
    out: dict[str, Any] = {
        "answer_ppl": answer_ppl(model, tokenizer, prompts, references, max(1, batch_size // 2))
    }
    if teacher is not None:
        out["teacher_nll"] = teacher_nll(
            teacher, tokenizer, prompts, answers, max(1, batch_size // 2), teacher_tokenizer
        )
    out |= {
        "rouge_l": rouge_l(answers, references),
        "eos_rate": eos_rate(answers),
        "repeat_rate": repeat_rate(answers),
        "answer_tokens": sum(len(a.ids) for a in answers) / len(answers),
        "prompts": len(prompts),
        "answers": list(answers),
    }
    return out
