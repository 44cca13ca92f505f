"""Teachers you can only query: top-k log-probabilities from a served model (OpenAI format).

A served model (an OpenAI-compatible server, vLLM, a hosted API) returns, per generated token,
the token's text and the log-probabilities of its top-k alternatives (k <= 20), not logits. This
module reads them from a responses file, fetches that file once from an endpoint, and serves them
to the cross-tokenizer terms (`aligned_kd`, `uld`) as any other teacher with another tokenizer.

The responses file is JSON Lines, one request/response pair per line::

    {"prompt": "...", "messages": [...], "response": <the server's chat-completions JSON>}

where `response.choices[0].logprobs.content[i] = {token, logprob, bytes, top_logprobs: [{token,
logprob, bytes}, ...]}`, the format every OpenAI-compatible server writes. Token bytes are taken
from `bytes` when present (a token that is half a UTF-8 character has no string of its own),
else from the UTF-8 of `token`. The tokens of a response must spell its text
(`choices[0].message.content`) byte for byte.

What the teacher gives a student (`ServedTeacher`): per generated token j, the distribution of
token j after the prompt and tokens < j, i.e. a teacher position that has consumed the bytes of
the response before token j. The student's positions are paired with it by the bytes consumed
(`distill.nlp.align.batch_alignment`), and the served tokens are carried onto student ids by
their bytes (`vocab_map`): with the student's own tokenizer this maps every string to its id,
so `aligned_kd` is then forward KL on the top-k plus one tail bucket.

Tail mass: 1 - Σ exp(top-k logprobs) is the teacher's mass outside the k alternatives. It is
kept as a bucket of its own (the `tail` of the cross-tokenizer terms: the KL's "other" bucket,
the last entry of ULD), never renormalised away. A server that renormalises its top-k leaves a
tail of 0; nothing here can tell.

Temperature: the server's log-probabilities are the model's distribution at temperature 1 (ask
with `temperature: 1`; vLLM reports raw log-probabilities whatever the sampling temperature,
other servers may not). With the logits unknown, softmax(z / T) cannot be formed: the mass of the
tail would have to be shared out among tokens whose logits are unknown, and any rule for it
(uniform, all on one) is a guess that changes the target. So a served teacher refuses a term
temperature other than 1 (one line, from the term), rather than silently dropping the tail.

The share of the teacher's mass the top-k keeps (`ServedTeacher.mass_kept`: for each k' <= k the
mean over tokens of Σ_{i<=k'} p_(i)) tells how much of the teacher a student sees.
"""

from __future__ import annotations

import json
import math
import os
import urllib.error
import urllib.request
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch

from distill.errors import DistillError
from distill.nlp.align import vocab_map
from distill.nlp.cross import NoTaps, _texts_and_ends, _xt_entry, format_mass_kept, text_key
from distill.outputs import Batch, Outputs

__all__ = [
    "Response",
    "ServedTeacher",
    "fetch_responses",
    "parse_response",
    "read_responses",
    "record_line",
    "record_model",
    "format_mass_kept",
]


@dataclass
class Response:
    """One answered request: its prompt, the response text and per token its top alternatives."""

    prompt: str
    text: str
    tokens: list[bytes]
    top: list[list[tuple[bytes, float]]]  # per token, (bytes, logprob), largest first
    messages: list = field(default_factory=list)


def _bytes_of(entry: Mapping, where: str) -> bytes:
    b = entry.get("bytes")
    if isinstance(b, list):
        try:
            return bytes(b)
        except (ValueError, TypeError):
            raise DistillError(f"{where}: 'bytes' is not a list of byte values 0..255") from None
    tok = entry.get("token")
    if not isinstance(tok, str):
        raise DistillError(f"{where}: a logprobs entry has neither 'bytes' nor a 'token' string")
    return tok.encode("utf-8")


def _prompt_of(record: Mapping) -> str:
    if isinstance(record.get("prompt"), str):
        return record["prompt"]
    msgs = record.get("messages") or []
    users = [m.get("content", "") for m in msgs if isinstance(m, Mapping) and m.get("role") == "user"]
    return users[-1] if users else ""


def parse_response(record: Mapping, where: str, k: int | None = None) -> Response:
    """A responses-file record -> `Response`, or one line saying what is wrong with it.

    Args:
        where: how to name the record in errors (`file:line`).
        k: alternatives needed per token (None: whatever the server gave, at least one).
    """
    resp = record.get("response", record)
    try:
        choice = resp["choices"][0]
        text = choice["message"]["content"]
        content = (choice.get("logprobs") or {}).get("content")
    except (KeyError, IndexError, TypeError):
        raise DistillError(
            f"{where}: not a chat-completions response (no choices[0].message.content); "
            "store the server's JSON under 'response'"
        ) from None
    if not isinstance(text, str):
        raise DistillError(f"{where}: choices[0].message.content is not a string")
    if not content:
        raise DistillError(
            f"{where}: the response has no per-token logprobs; request with logprobs: true, top_logprobs: k"
        )
    tokens, top = [], []
    for i, e in enumerate(content):
        tokens.append(_bytes_of(e, f"{where} token {i}"))
        alts = e.get("top_logprobs") or []
        if not alts:
            raise DistillError(
                f"{where}: the server returned no alternatives (top_logprobs) at token {i}; "
                "request top_logprobs: k (1..20) with logprobs: true"
            )
        if k is not None and len(alts) < k:
            raise DistillError(
                f"{where}: the server returned {len(alts)} alternatives at token {i}, fewer than k={k}; "
                f"set k: {len(alts)} or fetch again with top_logprobs: {k}"
            )
        try:
            pairs = [(_bytes_of(a, f"{where} token {i}"), float(a["logprob"])) for a in alts]
        except (KeyError, TypeError, ValueError):
            raise DistillError(f"{where}: an alternative at token {i} has no numeric 'logprob'") from None
        pairs.sort(key=lambda p: -p[1])
        top.append(pairs[:k] if k is not None else pairs)
    spelled = b"".join(tokens)
    if spelled != text.encode("utf-8"):
        at = next((n for n, (a, b) in enumerate(zip(spelled, text.encode("utf-8"))) if a != b), None)
        at = min(len(spelled), len(text.encode("utf-8"))) if at is None else at
        raise DistillError(
            f"{where}: the logprobs tokens do not spell the response text (they differ from byte {at}: "
            f"{spelled[at : at + 20]!r} vs {text.encode('utf-8')[at : at + 20]!r}); "
            "the file pairs logprobs with another response: fetch it again"
        )
    return Response(_prompt_of(record), text, tokens, top, list(record.get("messages") or []))


def _good_lines(path: Path) -> tuple[list[tuple[int, dict]], int, bool]:
    """The complete JSON lines of a responses file, the byte length they end at, and whether
    the last line is truncated (no newline, or not JSON: a fetch interrupted while writing)."""
    data = path.read_bytes() if path.exists() else b""
    out, end, truncated = [], 0, False
    lines = data.split(b"\n")
    for n, raw in enumerate(lines, 1):
        last = n == len(lines)
        if last and not raw:
            break
        if not raw.strip():
            end += len(raw) + 1
            continue
        try:
            obj = json.loads(raw)
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            if last:
                truncated = True
                break
            raise DistillError(
                f"{path}:{n}: not a complete JSON object ({e.msg}); delete that line and fetch again"
            ) from None
        if last:  # valid JSON but no newline: the write may have stopped right there
            truncated = True
            break
        if not isinstance(obj, dict):
            raise DistillError(f"{path}:{n}: a line is a {type(obj).__name__}, not a JSON object")
        out.append((n, obj))
        end += len(raw) + 1
    return out, end, truncated


def read_responses(path: str | os.PathLike, k: int | None = None) -> list[Response]:
    """Every response of a responses file; a truncated last line is an error naming the fix."""
    path = Path(path)
    if not path.is_file():
        raise DistillError(
            f"responses file {path} does not exist; fetch it with distill.nlp.served.fetch_responses"
        )
    good, _, truncated = _good_lines(path)
    if truncated:
        raise DistillError(
            f"{path}: the last line is truncated (an interrupted fetch); run the fetch again to refetch it"
        )
    if not good:
        raise DistillError(f"responses file {path} holds no responses")
    return [parse_response(obj, f"{path}:{n}", k) for n, obj in good]


def _post(url: str, body: dict, timeout: float, headers: Mapping[str, str]) -> dict:
    req = urllib.request.Request(
        url,
        data=json.dumps(body).encode("utf-8"),
        headers={"Content-Type": "application/json", **headers},
        method="POST",
    )
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            return json.loads(r.read().decode("utf-8"))
    except urllib.error.HTTPError as e:
        msg = e.read().decode("utf-8", errors="replace")[:200].replace("\n", " ")
        raise DistillError(f"the server at {url} answered HTTP {e.code}: {msg}") from None
    except urllib.error.URLError as e:
        raise DistillError(
            f"cannot reach the server at {url} ({e.reason}); start it or fix the endpoint"
        ) from None
    except json.JSONDecodeError:
        raise DistillError(
            f"the server at {url} did not answer JSON; is it an OpenAI-compatible endpoint?"
        ) from None


def fetch_responses(
    path: str | os.PathLike,
    endpoint: str,
    model: str,
    prompts: Iterable[str | Sequence[Mapping]],
    top_logprobs: int = 20,
    max_tokens: int = 128,
    temperature: float = 1.0,
    timeout: float = 120.0,
    headers: Mapping[str, str] | None = None,
) -> int:
    """Asks an OpenAI-compatible server once per prompt and appends each answer to `path`.

    Resumable: prompts already answered in `path` are skipped; a truncated last line (a fetch
    interrupted while writing) is cut off and its prompt asked again. Each line is flushed and
    fsynced before the next request, so an interruption loses at most the request in flight.

    Args:
        endpoint: the server's base URL (`http://host:8000/v1`) or its chat-completions URL.
        prompts: user messages, or whole `messages` lists.
        top_logprobs: alternatives per token (servers allow up to 20); a server returning fewer
            is refused before anything is written for that prompt.
        temperature: sampling temperature of the answers (1: the logprobs are the model's own
            distribution on every server; see the module docstring).
        headers: extra HTTP headers (e.g. an Authorization header the caller provides).

    Returns:
        the number of prompts fetched by this call.
    """
    if not 1 <= int(top_logprobs) <= 20:
        raise DistillError(f"top_logprobs must be 1..20 (the OpenAI API's limit), got {top_logprobs}")
    url = endpoint.rstrip("/")
    if not url.endswith("/chat/completions"):
        url += "/chat/completions"
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    good, end, truncated = _good_lines(path)
    if truncated or (path.exists() and path.stat().st_size != end):
        with open(path, "rb+") as f:  # drop the partial line; it is asked again below
            f.truncate(end)
            f.flush()
            os.fsync(f.fileno())
    done = {_key(obj.get("messages") or [{"role": "user", "content": _prompt_of(obj)}]) for _, obj in good}
    n = 0
    with open(path, "ab") as f:
        for p in prompts:
            messages = [{"role": "user", "content": p}] if isinstance(p, str) else [dict(m) for m in p]
            key = _key(messages)
            if key in done:
                continue
            body = {
                "model": model,
                "messages": messages,
                "max_tokens": max_tokens,
                "temperature": temperature,
                "logprobs": True,
                "top_logprobs": int(top_logprobs),
            }
            resp = _post(url, body, timeout, headers or {})
            record = {"prompt": _prompt_of({"messages": messages}), "messages": messages, "response": resp}
            parse_response(record, f"{url} (prompt {p if isinstance(p, str) else key!r:.40})", top_logprobs)
            f.write(json.dumps(record, ensure_ascii=False).encode("utf-8") + b"\n")
            f.flush()
            os.fsync(f.fileno())
            done.add(key)
            n += 1
    return n


def _key(messages: Sequence[Mapping]) -> str:
    return json.dumps([[m.get("role"), m.get("content")] for m in messages], ensure_ascii=False)


def record_line(
    prompt: str,
    text: str,
    tokens: Sequence[bytes],
    top: Sequence[Sequence[tuple[bytes, float]]],
    logprobs: Sequence[float] | None = None,
) -> dict:
    """A responses-file record in the OpenAI format from tokens and alternatives (bytes, logprob).

    What a server would write; used to record a local model through the same JSON format.
    """
    content = []
    for j, (tok, alts) in enumerate(zip(tokens, top)):
        own = logprobs[j] if logprobs is not None else next((lp for b, lp in alts if b == tok), None)
        content.append(
            {
                "token": tok.decode("utf-8", errors="replace"),
                "logprob": own,
                "bytes": list(tok),
                "top_logprobs": [
                    {"token": b.decode("utf-8", errors="replace"), "logprob": lp, "bytes": list(b)}
                    for b, lp in alts
                ],
            }
        )
    resp = {
        "object": "chat.completion",
        "choices": [
            {
                "index": 0,
                "message": {"role": "assistant", "content": text},
                "logprobs": {"content": content},
                "finish_reason": "stop",
            }
        ],
    }
    return {"prompt": prompt, "messages": [{"role": "user", "content": prompt}], "response": resp}


class ServedTeacher(NoTaps):
    """A teacher read from a responses file: what `aligned_kd` / `uld` read, for any student tokenizer.

    Args:
        path: the responses file (JSON Lines, see the module docstring).
        student_tokenizer: the student's fast tokenizer (served tokens are mapped onto it by bytes).
        k: alternatives used per token (each token must have at least k).
        prompt_template: how the prompt is written before the response in the student's text
            (`"{prompt}"` is replaced by the prompt); "" (default): the student trains on the
            responses alone. The teacher's positions start after it; student positions inside
            the prompt get no teacher target (only cross-entropy).
        name, mode: as in `distill.nlp.cross.CrossTokenizerTeacher`.

    `texts` are the student's training texts, in file order; `mass_kept[i]` the mean share of the
    teacher's mass in its top i+1 alternatives.
    """

    def __init__(
        self,
        path: str | os.PathLike,
        student_tokenizer,
        k: int = 20,
        prompt_template: str = "",
        name: str = "teacher",
        mode: str = "exact",
    ):
        if not isinstance(k, int) or k < 1:
            raise DistillError(f"served teacher k must be a positive integer, got {k!r}")
        self.path, self.k, self.name = Path(path), k, name
        responses = read_responses(path, k)
        vocab: dict[bytes, int] = {}
        self.texts: list[str] = []
        self.index: dict[bytes, int] = {}
        self._rows: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor, list[int]]] = []
        mass = torch.zeros(k, dtype=torch.float64)
        count = 0
        for r in responses:
            prefix = prompt_template.replace("{prompt}", r.prompt) if prompt_template else ""
            text = prefix + r.text
            ends, pos = [], len(prefix.encode("utf-8"))
            for tok in r.tokens:
                ends.append(pos)  # position j predicts token j, having read what precedes it
                pos += len(tok)
            probs = torch.tensor([[math.exp(lp) for _, lp in alts] for alts in r.top], dtype=torch.float32)
            ids = torch.tensor([[vocab.setdefault(b, len(vocab)) for b, _ in alts] for alts in r.top])
            tail = (1.0 - probs.sum(-1)).clamp_min(0.0)  # the mass the server left out
            mass += probs.double().cumsum(-1).clamp_max(1.0).sum(0)
            count += probs.shape[0]
            key = text_key(text)
            if key in self.index:
                continue  # the same text answered twice: the first answer teaches
            self.index[key] = len(self._rows)
            self.texts.append(text)
            self._rows.append((probs, ids, tail, ends))
        self.mass_kept = (mass / max(count, 1)).tolist()
        self.tokens = count
        # A served special token ("<|im_end|>") is its name; one the student has maps to it by name.
        names = set(getattr(student_tokenizer, "all_special_tokens", []))
        pieces, special = [None] * len(vocab), {}
        for b, i in vocab.items():
            as_text = b.decode("utf-8", errors="replace")
            if as_text in names:
                special[str(i)] = as_text
            else:
                pieces[i] = b.hex()
        strings = {
            "pieces": pieces,
            "byte_tokens": [],
            "special": special,
            "eos": None,
            "name": f"served:{self.path.name}",
        }
        self.map = vocab_map(strings, student_tokenizer, mode)

    def summary(self) -> dict:
        """Numbers for a report: responses, tokens, k and the mean mass kept at each k."""
        return {"responses": len(self._rows), "tokens": self.tokens, "k": self.k, "mass_kept": self.mass_kept}

    def to(self, device) -> ServedTeacher:
        return self

    def __call__(self, batch: Batch) -> Outputs:
        texts, s_ends = _texts_and_ends(batch)
        rows = []
        for t in texts:
            i = self.index.get(text_key(t))
            if i is None:
                raise DistillError(
                    f"text not in responses file {self.path}: {t[:50]!r}; train on ServedTeacher.texts "
                    "(the same prompt_template) or fetch answers for these prompts"
                )
            rows.append(self._rows[i])
        tt = max(r[0].shape[0] for r in rows)
        probs = torch.zeros(len(rows), tt, self.k)
        ids = torch.zeros(len(rows), tt, self.k, dtype=torch.long)
        tail = torch.zeros(len(rows), tt)
        for b, (p, i, t, _) in enumerate(rows):
            probs[b, : p.shape[0]], ids[b, : p.shape[0]], tail[b, : p.shape[0]] = p, i, t
        ends = [r[3] for r in rows]
        # Every served position predicts a token (t_lengths counts one past the last predicting one).
        entry = _xt_entry(probs, ids, tail, ends, [len(e) + 1 for e in ends], s_ends, self.map)
        entry["served"] = torch.ones((), dtype=torch.bool, device=s_ends.device)
        return Outputs(logits=None, extras={"xt": {self.name: entry}})


@torch.inference_mode()
def record_model(
    model, tokenizer, pairs: Sequence[tuple[str, str]], k: int = 20, prompt_template: str = ""
) -> list[dict]:
    """Records a local causal LM as a server would answer: one responses-file record per (prompt, response).

    The response is teacher-forced after `prompt_template` (with the prompt) behind a bos token,
    and each of its tokens gets the model's top-k alternatives at temperature 1, so a served
    teacher of the same model can be compared with the model itself.
    """
    from distill.nlp.align import bos_id, token_pieces

    pieces = token_pieces(tokenizer)

    def piece(i: int) -> bytes:
        p = pieces[i] if 0 <= i < len(pieces) else None
        return p if p is not None else tokenizer.convert_ids_to_tokens(i).encode("utf-8")

    model.eval()
    device = next(model.parameters()).device
    out = []
    for prompt, response in pairs:
        prefix = prompt_template.replace("{prompt}", prompt) if prompt_template else ""
        head = [bos_id(tokenizer)] + (
            tokenizer(prefix, add_special_tokens=False)["input_ids"] if prefix else []
        )
        body = tokenizer(response, add_special_tokens=False)["input_ids"]
        x = torch.tensor([head + body], device=device)
        logits = model(input_ids=x).logits[0, len(head) - 1 : len(head) - 1 + len(body), : len(pieces)]
        logp = torch.log_softmax(logits.float(), dim=-1)
        vals, idx = logp.topk(min(k, logp.shape[-1]), dim=-1)
        top = [
            [(piece(int(i)), float(v)) for v, i in zip(vr.tolist(), ir.tolist())] for vr, ir in zip(vals, idx)
        ]
        own = logp.gather(-1, torch.tensor(body, device=device)[:, None])[:, 0].tolist()
        out.append(record_line(prompt, response, [piece(i) for i in body], top, own))
    return out
