"""Chat data from prompts: the teacher answers once, the student learns the answers.

    prompts (JSONL / CSV: a prompt column, or `messages`) ──► the teacher answers with its chat
    template (greedy or sampled) ──► answers.jsonl in a cache folder keyed by a fingerprint of
    (teacher weights, chat template, prompts, generation settings) ──► conversations whose labels
    are the answer tokens only

The answers are appended batch by batch (each line flushed and synced), so a generation killed
midway resumes where it stopped, without redoing finished answers. A second writer of the same
folder is refused. The answers folder also records the settings (`settings.json`), so a person can
see how the data was made; `distill run` copies nothing: the recipe names the folder (`answers`),
or distill's cache holds it (`$DISTILL_CACHE/chat_answers/<fingerprint>/`).

Every training item keeps the teacher's own token ids (the prompt rendered with
`add_generation_prompt`, then the generated tokens up to and including the end-of-turn token),
so the student learns exactly what the teacher produced; no detokenize / retokenize drift.
"""

from __future__ import annotations

import contextlib
import csv
import hashlib
import json
import os
import random
import sys
import time
from pathlib import Path
from typing import Any

import torch

from distill.errors import ConfigError, DistillError

ANSWERS = "answers.jsonl"
SETTINGS = "settings.json"


# --------------------------------------------------------------------------- prompts


def read_prompts(
    path: str | os.PathLike, prompt_column: str = "prompt", split_column: str | None = "split"
) -> list[dict[str, Any]]:
    """Rows `{"messages": [...], "split": "train" | "test" | None}` from a JSONL or CSV file.

    A row gives either a prompt (the column `prompt_column`, one user turn) or `messages` (a list
    of `{role, content}` turns ending with a user turn, e.g. with a system prompt first).
    """
    path = Path(path)
    if not path.is_file():
        raise DistillError(f"prompt file {path} does not exist")
    suffix = path.suffix.lower()
    raw: list[tuple[int, dict]] = []
    if suffix == ".jsonl":
        with open(path, encoding="utf-8") as f:
            for n, line in enumerate(f, 1):
                if line.strip():
                    try:
                        raw.append((n, json.loads(line)))
                    except json.JSONDecodeError as e:
                        raise DistillError(f"{path} line {n} is not valid JSON ({e.msg})") from None
    elif suffix in (".csv", ".tsv"):
        with open(path, encoding="utf-8", newline="") as f:
            reader = csv.DictReader(f, delimiter="\t" if suffix == ".tsv" else ",")
            raw = [(n, dict(r)) for n, r in enumerate(reader, 2)]
    else:
        raise DistillError(f"prompt file {path}: give a .jsonl or .csv file, not {suffix or 'this file'}")
    if not raw:
        raise DistillError(f"prompt file {path} holds no rows")
    rows = []
    for n, r in raw:
        if not isinstance(r, dict):
            raise DistillError(f"{path} line {n}: expected an object with '{prompt_column}' or 'messages'")
        msgs = r.get("messages")
        if isinstance(msgs, str):  # CSV: messages as JSON text
            try:
                msgs = json.loads(msgs)
            except json.JSONDecodeError:
                msgs = None
        if msgs is None:
            if prompt_column not in r:
                cols = ", ".join(map(str, r)) or "none"
                raise DistillError(
                    f"{path} has no prompt column '{prompt_column}' (line {n} has: {cols}); set "
                    f"data.init_args.prompt_column, or give 'messages'"
                )
            text = str(r[prompt_column] or "").strip()
            if not text:
                raise DistillError(f"{path} line {n}: the prompt is empty")
            msgs = [{"role": "user", "content": text}]
        if (
            not isinstance(msgs, list)
            or not msgs
            or not all(isinstance(m, dict) and {"role", "content"} <= set(m) for m in msgs)
            or msgs[-1]["role"] != "user"
        ):
            raise DistillError(
                f'{path} line {n}: messages must be [{{"role": ..., "content": ...}}, ...] ending with a user turn'
            )
        split = r.get(split_column) if split_column else None
        rows.append(
            {"messages": [{"role": m["role"], "content": m["content"]} for m in msgs], "split": split}
        )
    return rows


def split_prompts(
    rows: list[dict[str, Any]], test_count: int | None, val_fraction: float, seed: int
) -> tuple[list[int], list[int], list[int]]:
    """(train, val, test) indices. Rows marked `split: test` are the test set when any row is
    marked; else `test_count` rows drawn with the seed. Validation is drawn from the rest."""
    idx = list(range(len(rows)))
    marked = [i for i in idx if rows[i].get("split") == "test"]
    rng = random.Random(seed)
    if marked:
        test = marked
        rest = [i for i in idx if rows[i].get("split") != "test"]
    else:
        n_test = min(len(idx) - 1, test_count if test_count is not None else max(1, len(idx) // 10))
        shuffled = idx[:]
        rng.shuffle(shuffled)
        test, rest = sorted(shuffled[:n_test]), sorted(shuffled[n_test:])
    if not 0 <= val_fraction < 1:
        raise ConfigError(f"data.init_args.val_fraction {val_fraction} must be in [0, 1)")
    shuffled = rest[:]
    rng.shuffle(shuffled)
    n_val = int(round(len(rest) * val_fraction))
    return sorted(shuffled[n_val:]), sorted(shuffled[:n_val]), test


# --------------------------------------------------------------------------- answering


def _sha(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, ensure_ascii=False).encode()).hexdigest()[:16]


def answers_fingerprint(
    teacher_fp: str, chat_template: str, prompts: list[list[dict]], settings: dict
) -> str:
    """What the answers depend on: the teacher's weights, its chat template, the prompts and the
    generation settings."""
    return _sha({"teacher": teacher_fp, "template": chat_template, "prompts": _sha(prompts), "gen": settings})


def check_chat_template(tok, who: str = "teacher") -> None:
    if not getattr(tok, "chat_template", None):
        raise DistillError(
            f"the {who}'s tokenizer has no chat template, so prompts cannot be rendered as it was trained "
            "to read them; use an instruction-tuned (chat) model, or set data.init_args.chat_template"
        )


def prompt_ids(tok, messages: list[dict]) -> list[int]:
    """The conversation so far rendered with the chat template, ready for the assistant's turn."""
    text = tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    return tok(text, add_special_tokens=False)["input_ids"]


@contextlib.contextmanager
def _writer_lock(folder: Path):
    """Refuses a second process writing the same answers folder."""
    from distill.checkpoint import exclusive_lock

    busy = (
        f"another process is writing the answers in {folder}; wait for it (they are reused), "
        "or point data.init_args.answers elsewhere"
    )
    with exclusive_lock(folder / ".lock", busy):
        yield


def read_answers(folder: Path) -> dict[int, dict[str, Any]]:
    """The answers written so far, by prompt index (a torn last line, from a killed writer, is
    ignored and redone)."""
    out: dict[int, dict[str, Any]] = {}
    path = folder / ANSWERS
    if not path.is_file():
        return out
    with open(path, encoding="utf-8") as f:
        for line in f:
            try:
                row = json.loads(line)
            except json.JSONDecodeError:
                continue
            if isinstance(row, dict) and "i" in row and "answer_ids" in row:
                out[int(row["i"])] = row
    return out


def too_long(i: int, n: int, max_length: int) -> str:
    return (
        f"row {i + 1}: the prompt is {n} tokens with the chat template, which leaves no room for an answer "
        f"within max_length {max_length}; shorten it or raise max_length (within the student's context)"
    )


def answer_prompts(
    teacher,
    tok,
    prompts: list[list[dict]],
    folder: str | os.PathLike,
    settings: dict[str, Any],
    batch_size: int = 16,
    progress: bool = True,
    needed: list[list[int]] | None = None,
    max_prompt_tokens: int | None = None,
) -> dict[int, dict[str, Any]]:
    """Has `teacher` answer the prompts once (those already in `folder` are kept) and returns the
    answers by index: `{"i", "answer", "answer_ids", "prompt_ids", "finish": "eos" | "length"}`.

    `needed`: groups of indices to answer, in order of priority (default: one group, all); a group
    is answered before the next (held-out prompts first), shortest first within windows of 8
    batches (less padding). A prompt longer than `max_prompt_tokens` (rendered) is refused before
    any answer is generated.

    `settings`: `max_new_tokens`, `do_sample`, `temperature`, `top_p`, `seed` (sampling draws from
    a generator seeded by the seed and the batch's first index, so a resumed run draws the same).
    Answers are appended as each batch ends.
    """
    from distill.nlp.generation import generate_batch

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    with _writer_lock(folder):
        done = read_answers(folder)
        groups = [list(range(len(prompts)))] if needed is None else needed
        seen: set[int] = set(done)
        todo_groups = []
        for g in groups:
            todo_groups.append([i for i in dict.fromkeys(g) if i not in seen])
            seen.update(g)
        todo = [i for g in todo_groups for i in g]
        if not todo:
            return done
        ids = {i: prompt_ids(tok, prompts[i]) for i in todo}
        for i in todo:
            if max_prompt_tokens is not None and len(ids[i]) > max_prompt_tokens:
                raise DistillError(too_long(i, len(ids[i]), max_prompt_tokens + 1))
        window = batch_size * 8
        todo = [
            i
            for g in todo_groups
            for w in range(0, len(g), window)
            for i in sorted(g[w : w + window], key=lambda i: len(ids[i]))
        ]
        pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
        eos = tok.convert_tokens_to_ids(tok.eos_token) if tok.eos_token else None
        gen = {"max_new_tokens": int(settings["max_new_tokens"]), "do_sample": bool(settings["do_sample"])}
        if gen["do_sample"]:
            gen.update(temperature=float(settings["temperature"]), top_p=float(settings["top_p"]))
        t0, n0 = time.time(), len(done)
        # a torn last line (killed writer) would glue onto the next row: start on a fresh line
        path = folder / ANSWERS
        if path.is_file() and path.stat().st_size and not path.read_bytes().endswith(b"\n"):
            with open(path, "a", encoding="utf-8") as f:
                f.write("\n")
        with open(path, "a", encoding="utf-8") as f:
            for b in range(0, len(todo), batch_size):
                chunk = todo[b : b + batch_size]
                width = max(len(ids[i]) for i in chunk)
                batch = {
                    "input_ids": torch.tensor([ids[i] + [pad] * (width - len(ids[i])) for i in chunk]),
                    "attention_mask": torch.tensor(
                        [[1] * len(ids[i]) + [0] * (width - len(ids[i])) for i in chunk]
                    ),
                }
                with torch.random.fork_rng():
                    torch.manual_seed(int(settings.get("seed", 0)) * 1_000_003 + chunk[0])
                    out = generate_batch(teacher, batch, pad, eos, **gen)
                for i, row_ids, row_lab in zip(chunk, out["input_ids"], out["labels"], strict=True):
                    ans = [int(t) for t, lab in zip(row_ids.tolist(), row_lab.tolist()) if lab != -100]
                    finish = "eos" if eos is not None and ans and ans[-1] == eos else "length"
                    text = tok.decode(ans, skip_special_tokens=True).strip()
                    row = {"i": i, "answer": text, "answer_ids": ans, "prompt_ids": ids[i], "finish": finish}
                    f.write(json.dumps(row, ensure_ascii=False) + "\n")
                    done[i] = row
                f.flush()
                os.fsync(f.fileno())
                if progress:
                    rate = (len(done) - n0) / max(time.time() - t0, 1e-9)
                    print(
                        f"teacher answers: {len(done)}/{len(prompts)} ({rate:.2f} prompts/s)",
                        file=sys.stderr,
                        flush=True,
                    )
    return done


def build_answers(
    path: str | os.PathLike,
    teacher: dict[str, Any] | str,
    answers: str | os.PathLike | None = None,
    prompt_column: str = "prompt",
    split_column: str | None = "split",
    max_new_tokens: int = 96,
    do_sample: bool = False,
    temperature: float = 1.0,
    top_p: float = 1.0,
    batch_size: int = 16,
    seed: int = 0,
    rows: list[dict[str, Any]] | None = None,
    needed: list[list[int]] | None = None,
    max_length: int | None = None,
) -> tuple[dict[int, dict[str, Any]], Any, Path]:
    """Loads the teacher and has it answer the prompts of `path` (or `rows` read from it; only
    the groups `needed`, in that order, when given), resuming; returns (answers by index, the teacher's
    tokenizer, the answers folder)."""
    from distill.nlp.cache import model_fingerprint
    from distill.nlp.hf_models import cache_root, hf, load_tokenizer

    rows = rows if rows is not None else read_prompts(path, prompt_column, split_column)
    spec = {"path": teacher} if isinstance(teacher, str) else dict(teacher)
    if "path" not in spec:
        raise ConfigError("data.init_args.teacher: give {path: ..., gguf_file: ...} (the answering model)")
    tok = load_tokenizer(spec["path"], spec.get("gguf_file"))
    check_chat_template(tok)
    model = hf(path=spec["path"], gguf_file=spec.get("gguf_file"), task="causal_lm").eval()
    settings = {
        "max_new_tokens": int(max_new_tokens),
        "do_sample": bool(do_sample),
        "temperature": float(temperature) if do_sample else None,
        "top_p": float(top_p) if do_sample else None,
        "seed": int(seed) if do_sample else None,
    }
    prompts = [r["messages"] for r in rows]
    fp = answers_fingerprint(model_fingerprint(model)[:16], tok.chat_template, prompts, settings)
    folder = Path(answers) / fp if answers else cache_root() / "chat_answers" / fp
    folder.mkdir(parents=True, exist_ok=True)
    record = {
        "fingerprint": fp,
        "teacher": spec,
        "prompts": str(path),
        "count": len(prompts),
        "generation": settings,
        "chat_template_sha": _sha(tok.chat_template),
    }
    if not (folder / SETTINGS).is_file():
        from distill.checkpoint import atomic_write_text

        atomic_write_text(folder / SETTINGS, json.dumps(record, indent=2))
    done = answer_prompts(
        model, tok, prompts, folder, {**settings, "seed": seed}, batch_size=batch_size, needed=needed,
        max_prompt_tokens=max_length - 1 if max_length else None,
    )  # fmt: skip
    return done, tok, folder
