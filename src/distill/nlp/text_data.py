"""Text data by name in recipes: `text_classification`, `text`, `chat`, `prompt_response`.

Each builder reads a user's files, tokenizes every text once (the tokenizer is the teacher's
unless the recipe names one: `distill run` fills `data.init_args.tokenizer` from an `hf`
teacher's `path`), splits train / val / test with a seed, and returns a `DataBundle` whose items
are token-id lists padded per batch by `PadCollator`. Texts longer than `max_length` tokens are
truncated and counted (`bundle.meta["truncated"]`, printed once).

Sources:
  - `text_classification`: CSV / TSV (header row), JSONL, a folder saved by `datasets`'
    `save_to_disk`, or a folder of plain files, one per label (the file name is the label;
    passages separated by `%` lines or blank lines: `bundled:fortunes`, the text of Debian's
    fortunes package that ships with distill, is one such folder).
  - `text`: plain text, JSONL, CSV or a folder of them (`distill.data.text.load_texts`); packed
    into blocks of `block_size` tokens for causal LMs, or one text per item (`pack: false`).
  - `chat`: JSONL of `{"messages": [{"role", "content"}, ...]}`, rendered with the tokenizer's
    chat template; the labels cover assistant turns only.
  - `prompt_response`: JSONL / CSV with a prompt and a response column; labels on the response.
"""

from __future__ import annotations

import csv
import json
import random
import re
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import Dataset

from distill.data.bundle import DataBundle
from distill.data.text import data_path, load_texts, train_tokenizer
from distill.errors import ConfigError, DistillError

# A minimal chat template for tokenizers that ship none (those trained here).
SIMPLE_CHAT_TEMPLATE = (
    "{% for m in messages %}<|{{ m['role'] }}|>\n{{ m['content'] }}{{ eos_token }}\n{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)


class TokenDataset(Dataset):
    """Items `{"input_ids": [...], "labels": int | [...]}` (labels optional). No sample index:
    wrap in `distill.data.IndexedDataset` where one is needed (the teacher store does)."""

    def __init__(self, rows: list[dict[str, Any]]):
        self.rows = rows

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, i: int) -> dict[str, Any]:
        return self.rows[i]


class PadCollator:
    """Right-pads `input_ids` (and token `labels` with -100) into tensors with an attention mask."""

    def __init__(self, pad_id: int):
        self.pad_id = int(pad_id)

    def __call__(self, items: Sequence[dict[str, Any]]) -> dict[str, torch.Tensor]:
        n = max(1, max(len(it["input_ids"]) for it in items))
        ids = torch.full((len(items), n), self.pad_id, dtype=torch.long)
        att = torch.zeros((len(items), n), dtype=torch.long)
        for i, it in enumerate(items):
            ids[i, : len(it["input_ids"])] = torch.as_tensor(it["input_ids"], dtype=torch.long)
            att[i, : len(it["input_ids"])] = 1
        out = {"input_ids": ids, "attention_mask": att}
        if "token_type_ids" in items[0]:
            tt = torch.zeros((len(items), n), dtype=torch.long)
            for i, it in enumerate(items):
                tt[i, : len(it["token_type_ids"])] = torch.as_tensor(it["token_type_ids"], dtype=torch.long)
            out["token_type_ids"] = tt
        if "labels" in items[0]:
            if isinstance(items[0]["labels"], list):
                lab = torch.full((len(items), n), -100, dtype=torch.long)
                for i, it in enumerate(items):
                    lab[i, : len(it["labels"])] = torch.as_tensor(it["labels"], dtype=torch.long)
                out["labels"] = lab
            else:
                out["labels"] = torch.as_tensor([it["labels"] for it in items], dtype=torch.long)
        if "index" in items[0]:
            out["index"] = torch.as_tensor([it["index"] for it in items], dtype=torch.long)
        return out


# --------------------------------------------------------------------------- shared pieces


def get_tokenizer(tokenizer: Any, texts: Sequence[str] | None = None):
    """A tokenizer from a folder / `pkg:<module>` / hub id, or `{train: {vocab_size, kind}}`
    (trained here on `texts`, the training split)."""
    if tokenizer is None:
        raise ConfigError(
            "data: no tokenizer; set data.init_args.tokenizer (a model folder or hub id), or use an hf "
            "teacher with a path (its tokenizer is used)"
        )
    if isinstance(tokenizer, dict):
        spec = tokenizer.get("train")
        if not isinstance(spec, dict) or set(tokenizer) != {"train"}:
            raise ConfigError(
                "data.init_args.tokenizer: give a folder/hub id or {train: {vocab_size: N, kind: bpe}}"
            )
        tok = train_tokenizer(texts or [], **spec)
        tok.distill_trained = spec  # remembered for the record
        return tok
    if not isinstance(tokenizer, str):
        return tokenizer  # a tokenizer object (Python use)
    from distill.nlp.hf_models import load_tokenizer

    return load_tokenizer(tokenizer)


def _split(
    n: int, val_fraction: float, test_fraction: float, seed: int
) -> tuple[list[int], list[int], list[int]]:
    if not (0 <= val_fraction < 1 and 0 <= test_fraction < 1 and val_fraction + test_fraction < 1):
        raise ConfigError(
            f"data: val_fraction {val_fraction} and test_fraction {test_fraction} must be in [0, 1) and sum below 1"
        )
    idx = list(range(n))
    random.Random(seed).shuffle(idx)
    n_test = int(round(n * test_fraction))
    n_val = int(round(n * val_fraction))
    return idx[n_test + n_val :], idx[n_test : n_test + n_val], idx[:n_test]


def _cap(idx: list[int], limit: int | None) -> list[int]:
    return idx[:limit] if limit else idx


def _report_truncated(name: str, truncated: int, total: int, max_length: int) -> None:
    if truncated:
        print(
            f"{name}: {truncated} of {total} texts are longer than {max_length} tokens and were truncated",
            file=sys.stderr,
        )


def _bundle(rows, parts, tok, num_classes=None, meta=None) -> DataBundle:
    train, val, test = ([rows[i] for i in p] for p in parts)
    pad = tok.pad_token_id if tok.pad_token_id is not None else (tok.eos_token_id or 0)
    return DataBundle(
        train=TokenDataset(train),
        val=TokenDataset(val) if val else None,
        test=TokenDataset(test) if test else (TokenDataset(val) if val else None),
        num_classes=num_classes,
        collate_fn=PadCollator(pad),
        tokenizer=tok,
        meta={**(meta or {}), "train": len(train), "val": len(val), "test": len(test)},
    )


def offset_bundle(records, parts, tok, max_length: int, add_eos: bool = True, meta=None) -> DataBundle:
    """Text records (`{"text", "prompt"?}`) split by `parts`, collated with byte offsets in `tok`
    (`CrossTokenizerCollator`), for teachers of any tokenizer."""
    from distill.nlp.align import CrossTokenizerCollator

    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    train, val, test = ([records[i] for i in p] for p in parts)
    return DataBundle(
        train=TokenDataset(train),
        val=TokenDataset(val) if val else None,
        test=TokenDataset(test) if test else (TokenDataset(val) if val else None),
        collate_fn=CrossTokenizerCollator(tok, max_length=max_length, add_eos=add_eos),
        tokenizer=tok,
        meta={**(meta or {}), "offsets": True, "train": len(train), "val": len(val), "test": len(test)},
    )


# --------------------------------------------------------------------------- text_classification


def _read_records(path: Path) -> tuple[list[dict[str, Any]], list[str]]:
    """Rows and column names from CSV/TSV/JSONL or a `datasets` folder."""
    if path.is_dir():
        if (
            (path / "dataset_info.json").exists()
            or (path / "state.json").exists()
            or (path / "dataset_dict.json").exists()
        ):
            try:
                import datasets
            except ImportError as e:
                raise DistillError(f"{path} is a datasets folder: pip install datasets to read it") from e
            ds = datasets.load_from_disk(str(path))
            if isinstance(ds, datasets.DatasetDict):
                ds = ds["train"] if "train" in ds else next(iter(ds.values()))
            return [dict(r) for r in ds], list(ds.column_names)
        return _folder_records(path), ["text", "label"]
    if not path.is_file():
        raise DistillError(f"data file {path} does not exist")
    suffix = path.suffix.lower()
    if suffix in (".csv", ".tsv"):
        with open(path, encoding="utf-8", newline="") as f:
            reader = csv.DictReader(f, delimiter="\t" if suffix == ".tsv" else ",")
            rows = list(reader)
            return rows, list(reader.fieldnames or [])
    if suffix == ".jsonl":
        rows = []
        with open(path, encoding="utf-8") as f:
            for n, line in enumerate(f, 1):
                if line.strip():
                    try:
                        rows.append(json.loads(line))
                    except json.JSONDecodeError as e:
                        raise DistillError(f"{path} line {n} is not valid JSON ({e.msg})") from None
        cols = list(dict.fromkeys(k for r in rows[:100] for k in r))
        return rows, cols
    raise DistillError(
        f"{path}: text classification reads .csv, .tsv, .jsonl or a folder, not {suffix or 'this file'}"
    )


def _folder_records(path: Path) -> list[dict[str, Any]]:
    """A folder with one plain-text file per label (the file name is the label)."""
    from distill.data.text import _split_plain

    files = sorted(
        p for p in path.iterdir() if p.is_file() and not p.is_symlink() and p.suffix in ("", ".txt")
    )
    if not files:
        raise DistillError(f"{path} holds no label files (one plain-text file per label, named by the label)")
    rows = []
    for p in files:
        for t in _split_plain(p.read_text(encoding="utf-8", errors="replace")):
            rows.append({"text": t, "label": p.stem})
    return rows


def _whole_number(v: Any) -> int | None:
    """A label that is a whole number: an int (JSON), or text such as "12" (CSV has no types)."""
    if isinstance(v, bool):
        return None
    if isinstance(v, int):
        return v
    if isinstance(v, str) and re.fullmatch(r"\s*[+-]?\d+\s*", v):
        return int(v)
    return None


def _label_ids(values: list[Any]) -> tuple[list[str], dict[Any, int]]:
    """Label names in id order and each value's id. Whole-number labels (JSON numbers or CSV text)
    are ordered as numbers, and when none is negative they are their own ids, as class ids are
    (labels 1..12 give names '0'..'12', id 0 unused); other labels are sorted as text."""
    numbers = {v: _whole_number(v) for v in values}
    if all(n is not None for n in numbers.values()):
        if min(numbers.values()) >= 0:
            return [str(i) for i in range(max(numbers.values()) + 1)], dict(numbers)
        order = sorted(set(numbers.values()))
        return [str(n) for n in order], {v: order.index(n) for v, n in numbers.items()}
    names = sorted({str(v) for v in values})
    return names, {v: names.index(str(v)) for v in values}


def text_classification(
    path: str,
    tokenizer: Any = None,
    text_column: str = "text",
    text_pair_column: str | None = None,
    label_column: str = "label",
    label_names: list[str] | None = None,
    max_length: int = 128,
    min_chars: int = 1,
    max_chars: int | None = None,
    min_per_class: int = 1,
    max_per_class: int | None = None,
    val_fraction: float = 0.1,
    test_fraction: float = 0.1,
    max_train: int | None = None,
    max_val: int | None = None,
    max_test: int | None = None,
    seed: int = 0,
) -> DataBundle:
    """Texts (or text pairs) with a label each; `num_classes` and the label names go to the model.

    Args:
        path: CSV / TSV / JSONL, a `datasets` folder, or a folder of one file per label
            (`bundled:fortunes`: the fortunes corpus, one file per category).
        label_names: the labels in id order (default: sorted label values; whole-number labels,
            JSON numbers or CSV text such as "12", are ordered as numbers and are their own ids).
        min_chars / max_chars: keep texts in this length range (whitespace is collapsed).
        min_per_class / max_per_class: drop labels with fewer texts; keep at most this many per label.
        max_train / max_val / max_test: cap each split (after the seeded split).
    """
    records, columns = _read_records(data_path(path))
    for col in (text_column, label_column, text_pair_column):
        if col is not None and col not in columns:
            raise DistillError(f"{path} has no column '{col}' (columns: {', '.join(columns)})")
    seen, kept = set(), []
    for r in records:
        text = " ".join(str(r[text_column] or "").split())
        pair = " ".join(str(r[text_pair_column] or "").split()) if text_pair_column else None
        if len(text) < min_chars or (max_chars and len(text) > max_chars) or (text, pair) in seen:
            continue
        seen.add((text, pair))
        kept.append((text, pair, r[label_column]))
    by_label: dict[Any, list] = {}
    for row in kept:
        by_label.setdefault(row[2], []).append(row)
    by_label = {k: v for k, v in by_label.items() if len(v) >= min_per_class}
    if not by_label:
        raise DistillError(
            f"{path}: no label has {min_per_class} texts in the length range; lower min_per_class"
        )
    if max_per_class:
        rng = random.Random(seed)
        by_label = {k: rng.sample(v, min(len(v), max_per_class)) for k, v in by_label.items()}
    if label_names is None:
        label_names, to_id = _label_ids(list(by_label))
    else:
        to_id = {}
        for v in by_label:
            n = _whole_number(v)  # a whole number is a class id, as without label_names
            if n is not None and 0 <= n < len(label_names):
                to_id[v] = n
            elif str(v) in label_names:
                to_id[v] = label_names.index(str(v))
            else:
                raise DistillError(f"{path}: label {v!r} is not in label_names ({', '.join(label_names)})")
    rows_raw = [row for k in sorted(by_label, key=str) for row in by_label[k]]
    parts = _split(len(rows_raw), val_fraction, test_fraction, seed)
    parts = (_cap(parts[0], max_train), _cap(parts[1], max_val), _cap(parts[2], max_test))
    train_texts = [rows_raw[i][0] for i in parts[0]]
    tok = get_tokenizer(tokenizer, train_texts)
    used = sorted(set(parts[0]) | set(parts[1]) | set(parts[2]))
    rows: list[dict[str, Any]] = [{} for _ in rows_raw]
    truncated = 0
    for i in used:
        text, pair, label = rows_raw[i]
        full = tok(text, pair, add_special_tokens=True)
        enc = tok(text, pair, truncation=True, max_length=max_length, add_special_tokens=True)
        truncated += len(full["input_ids"]) > max_length
        rows[i] = {"input_ids": enc["input_ids"], "labels": to_id[label]}
        if "token_type_ids" in enc:
            rows[i]["token_type_ids"] = enc["token_type_ids"]
    _report_truncated(f"text_classification {path}", truncated, len(used), max_length)
    meta = {"source": str(path), "label_names": label_names, "truncated": truncated, "max_length": max_length}
    return _bundle(rows, parts, tok, num_classes=len(label_names), meta=meta)


# --------------------------------------------------------------------------- text


def text(
    path: str,
    tokenizer: Any = None,
    field: str | None = None,
    pack: bool = True,
    block_size: int = 128,
    max_length: int = 128,
    labels: bool = True,
    add_eos: bool = True,
    min_chars: int = 1,
    max_chars: int | None = None,
    val_fraction: float = 0.1,
    test_fraction: float = 0.0,
    max_train: int | None = None,
    max_val: int | None = None,
    max_test: int | None = None,
    seed: int = 0,
    offsets: bool = False,
) -> DataBundle:
    """Plain texts for causal LMs (packed into blocks of `block_size` tokens, every token
    learned) or for encoders / sentence embeddings (`pack: false`: one text per item, truncated
    to `max_length`; `labels: false` for teacher-only targets such as embeddings).

    The split is over texts, before packing, so no held-out text leaks into training blocks.
    `offsets: true` (filled by `distill run` when a term reads a teacher of another tokenizer):
    one text per item, kept as text and collated with its byte offsets (`CrossTokenizerCollator`).
    """
    texts = load_texts(path, field=field)
    seen, kept = set(), []
    for t in texts:
        t = " ".join(t.split())
        if len(t) >= min_chars and (not max_chars or len(t) <= max_chars) and t not in seen:
            seen.add(t)
            kept.append(t)
    parts = _split(len(kept), val_fraction, test_fraction, seed)
    parts = (_cap(parts[0], max_train), _cap(parts[1], max_val), _cap(parts[2], max_test))
    tok = get_tokenizer(tokenizer, [kept[i] for i in parts[0]])
    if offsets:
        return offset_bundle(
            [{"text": t} for t in kept],
            parts,
            tok,
            max_length,
            add_eos,
            meta={"source": str(path), "texts": len(kept)},
        )
    eos = tok.eos_token_id if add_eos else None
    truncated = 0

    def encode(idx: list[int]) -> list[dict[str, Any]]:
        nonlocal truncated
        ids = [
            tok(kept[i], add_special_tokens=not pack)["input_ids"]
            + ([eos] if eos is not None and pack else [])
            for i in idx
        ]
        if pack:
            flat = [t for row in ids for t in row]
            # whole blocks only: every item has the same length (the teacher store keeps (rows, T, k))
            blocks = [flat[j : j + block_size] for j in range(0, len(flat) - block_size + 1, block_size)]
            return [{"input_ids": b, "labels": list(b)} if labels else {"input_ids": b} for b in blocks]
        out = []
        for row in ids:
            truncated += len(row) > max_length
            row = row[:max_length]
            out.append({"input_ids": row, "labels": list(row)} if labels else {"input_ids": row})
        return out

    train, val, test = encode(parts[0]), encode(parts[1]), encode(parts[2])
    _report_truncated(f"text {path}", truncated, sum(map(len, parts)), max_length)
    pad = tok.pad_token_id if tok.pad_token_id is not None else (tok.eos_token_id or 0)
    return DataBundle(
        train=TokenDataset(train),
        val=TokenDataset(val) if val else None,
        test=TokenDataset(test) if test else (TokenDataset(val) if val else None),
        collate_fn=PadCollator(pad),
        tokenizer=tok,
        meta={"source": str(path), "texts": len(kept), "truncated": truncated, "blocks_train": len(train)},
    )


# --------------------------------------------------------------------------- chat and prompt/response


def _read_jsonl(path: Path) -> list[tuple[int, Any]]:
    if not path.is_file():
        raise DistillError(f"data file {path} does not exist")
    out = []
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if line.strip():
                try:
                    out.append((n, json.loads(line)))
                except json.JSONDecodeError as e:
                    raise DistillError(f"{path} line {n} is not valid JSON ({e.msg})") from None
    if not out:
        raise DistillError(f"{path} holds no rows")
    return out


def render_chat(tok, messages: list[dict[str, str]]) -> tuple[list[int], list[int]]:
    """Token ids of a conversation and its labels: assistant turns learned, the rest -100.

    Each turn's tokens are what rendering the conversation up to that turn adds to the rendering
    up to the turn before (the chat template applied to growing prefixes)."""
    ids: list[int] = []
    labels: list[int] = []
    for k in range(len(messages)):
        full = tok.apply_chat_template(messages[: k + 1], tokenize=False)
        prefix = tok.apply_chat_template(messages[:k], tokenize=False) if k else ""
        if not full.startswith(prefix):
            raise DistillError("the tokenizer's chat template does not render conversations prefix by prefix")
        new = tok(full[len(prefix) :], add_special_tokens=False)["input_ids"]
        ids += new
        labels += new if messages[k]["role"] == "assistant" else [-100] * len(new)
    return ids, labels


def chat(
    path: str,
    tokenizer: Any = None,
    max_length: int = 256,
    chat_template: str | None = None,
    val_fraction: float = 0.1,
    test_fraction: float = 0.1,
    max_train: int | None = None,
    max_val: int | None = None,
    max_test: int | None = None,
    seed: int = 0,
) -> DataBundle:
    """Conversations (`{"messages": [{"role": "user"|"assistant"|"system", "content": ...}]}` per
    line) for causal LMs; the loss sees assistant turns only. A tokenizer without a chat template
    gets `chat_template` (default: a plain `<|role|>` template, saved with the student)."""
    return chat_conversations(
        _read_jsonl(Path(path)), str(path), tokenizer, max_length, chat_template,
        val_fraction, test_fraction, max_train, max_val, max_test, seed,
    )  # fmt: skip


def chat_conversations(
    rows_raw,
    source,
    tokenizer,
    max_length,
    chat_template,
    val_fraction,
    test_fraction,
    max_train,
    max_val,
    max_test,
    seed,
) -> DataBundle:
    """`chat` on `(line number, row)` pairs already read."""
    path = source
    convs = []
    for n, r in rows_raw:
        msgs = r.get("messages") if isinstance(r, dict) else None
        if not isinstance(msgs, list) or not all(
            isinstance(m, dict) and {"role", "content"} <= set(m) for m in msgs
        ):
            raise DistillError(
                f'{path} line {n}: expected {{"messages": [{{"role": ..., "content": ...}}, ...]}}'
            )
        if not any(m["role"] == "assistant" for m in msgs):
            raise DistillError(f"{path} line {n}: the conversation has no assistant turn (nothing to learn)")
        convs.append(msgs)
    parts = _split(len(convs), val_fraction, test_fraction, seed)
    parts = (_cap(parts[0], max_train), _cap(parts[1], max_val), _cap(parts[2], max_test))
    tok = get_tokenizer(tokenizer, [m["content"] for i in parts[0] for m in convs[i]])
    if chat_template or not getattr(tok, "chat_template", None):
        tok.chat_template = chat_template or SIMPLE_CHAT_TEMPLATE
    rows: list[dict[str, Any]] = [{} for _ in convs]
    truncated = 0
    for i in sorted(set().union(*map(set, parts))):
        ids, labels = render_chat(tok, convs[i])
        truncated += len(ids) > max_length
        rows[i] = {"input_ids": ids[:max_length], "labels": labels[:max_length]}
    _report_truncated(f"chat {path}", truncated, sum(map(len, parts)), max_length)
    return _bundle(rows, parts, tok, meta={"source": str(path), "truncated": truncated})


def fortune_chat(
    tokenizer: Any = None,
    directory: str = "bundled:fortunes",
    max_length: int = 128,
    chat_template: str | None = None,
    val_fraction: float = 0.1,
    test_fraction: float = 0.1,
    max_train: int | None = None,
    max_val: int | None = None,
    max_test: int | None = None,
    seed: int = 0,
) -> DataBundle:
    """`chat` data built offline from the fortunes corpus (`bundled:fortunes`, shipped with distill): the
    Q/A riddles and the definitions ("Term:" then its meaning) as user/assistant exchanges
    (`distill.data.text.fortune_dialogues`)."""
    from distill.data.text import fortune_dialogues

    convs = fortune_dialogues(directory)
    rows = [(i + 1, {"messages": m}) for i, m in enumerate(convs)]
    return chat_conversations(
        rows, f"fortune_chat {directory}", tokenizer, max_length, chat_template,
        val_fraction, test_fraction, max_train, max_val, max_test, seed,
    )  # fmt: skip


def prompt_response(
    path: str,
    tokenizer: Any = None,
    prompt_column: str = "prompt",
    response_column: str = "response",
    max_length: int = 256,
    val_fraction: float = 0.1,
    test_fraction: float = 0.1,
    max_train: int | None = None,
    max_val: int | None = None,
    max_test: int | None = None,
    seed: int = 0,
) -> DataBundle:
    """Prompt / response pairs (JSONL or CSV) for causal LMs; labels on the response (+ EOS)."""
    records, columns = _read_records(Path(path))
    for col in (prompt_column, response_column):
        if col not in columns:
            raise DistillError(f"{path} has no column '{col}' (columns: {', '.join(columns)})")
    parts = _split(len(records), val_fraction, test_fraction, seed)
    parts = (_cap(parts[0], max_train), _cap(parts[1], max_val), _cap(parts[2], max_test))
    tok = get_tokenizer(
        tokenizer, [str(records[i][c]) for i in parts[0] for c in (prompt_column, response_column)]
    )
    eos = [tok.eos_token_id] if tok.eos_token_id is not None else []
    rows: list[dict[str, Any]] = [{} for _ in records]
    truncated = 0
    for i in sorted(set().union(*map(set, parts))):
        p = tok(str(records[i][prompt_column]), add_special_tokens=False)["input_ids"]
        r = tok(str(records[i][response_column]), add_special_tokens=False)["input_ids"] + eos
        truncated += len(p) + len(r) > max_length
        rows[i] = {"input_ids": (p + r)[:max_length], "labels": ([-100] * len(p) + r)[:max_length]}
    _report_truncated(f"prompt_response {path}", truncated, sum(map(len, parts)), max_length)
    return _bundle(rows, parts, tok, meta={"source": str(path), "truncated": truncated})


def sequence_kd(
    dataset: dict[str, Any],
    teacher: str,
    max_new_tokens: int = 64,
    do_sample: bool = False,
    batch_size: int = 64,
    seed: int = 0,
) -> DataBundle:
    """Sequence-level KD data (Kim & Rush 2016): the training prompts of another text dataset,
    answered by a causal-LM teacher (a model folder, e.g. a run's `teacher_hf/`), made once when
    the data is built. Labels cover the generated tokens only; validation and test keep the
    dataset's own references, so held-out scores stay comparable with the other students.

    Args:
        dataset: the inner dataset (`{name, init_args}`; chat, prompt_response or fortune_chat),
            whose labelled tokens mark where each prompt ends.
        teacher: the generating model; its tokenizer must be the dataset's.
        max_new_tokens / do_sample: generation settings (greedy by default).
    """
    from distill.data.bundle import build_data
    from distill.nlp.generation import generate_batch
    from distill.nlp.hf_models import hf

    spec = dict(dataset)
    args = dict(spec.get("init_args") or {})
    args.setdefault("tokenizer", teacher)
    inner = build_data(spec.get("name"), spec.get("class_path"), args, seed=seed)
    model = hf(path=teacher, task="causal_lm", tokenizer=inner.tokenizer)
    tok = inner.tokenizer
    pad = tok.pad_token_id if tok.pad_token_id is not None else 0
    prompts = []
    for row in inner.train.rows:
        first = next((i for i, lab in enumerate(row["labels"]) if lab != -100), None)
        if first is None or first == 0:
            raise DistillError(
                "sequence_kd: every training item needs a prompt (unlabelled tokens) before its response"
            )
        prompts.append(row["input_ids"][:first])
    cfg = model.config
    positions = getattr(cfg, "n_positions", None) or getattr(cfg, "max_position_embeddings", None)
    rows = []
    torch.manual_seed(seed)
    for i in range(0, len(prompts), batch_size):
        chunk = prompts[i : i + batch_size]
        batch = PadCollator(pad)([{"input_ids": p} for p in chunk])
        new = max_new_tokens
        if positions:  # the model cannot see past its last position: prompt + answer must fit
            new = min(new, positions - max(map(len, chunk)))
        if new < 1:
            raise DistillError(
                f"sequence_kd: a prompt fills the teacher's {positions} positions; lower max_length"
            )
        out = generate_batch(model, batch, pad, tok.eos_token_id, max_new_tokens=new, do_sample=do_sample)
        for ids, labels, m in zip(out["input_ids"], out["labels"], out["attention_mask"], strict=True):
            n = int(m.sum())
            rows.append({"input_ids": ids[:n].tolist(), "labels": labels[:n].tolist()})
    meta = {**inner.meta, "sequence_kd_teacher": str(teacher), "generated": len(rows)}
    import dataclasses

    return dataclasses.replace(inner, train=TokenDataset(rows), meta=meta)


def chat_prompts(
    path: str,
    teacher: dict[str, Any] | str | None = None,
    tokenizer: Any = None,
    answers: str | None = None,
    prompt_column: str = "prompt",
    split_column: str | None = "split",
    test_count: int | None = 200,
    val_fraction: float = 0.05,
    max_length: int = 256,
    max_new_tokens: int = 96,
    do_sample: bool = False,
    temperature: float = 1.0,
    top_p: float = 1.0,
    generate_batch_size: int = 16,
    max_train: int | None = None,
    max_val: int | None = None,
    max_test: int | None = None,
    seed: int = 0,
    offsets: bool = False,
) -> DataBundle:
    """Chat data from prompts (`distill.nlp.chat_data`): the teacher answers every prompt once with
    its chat template (greedy unless `do_sample`; settings recorded), the answers are cached in
    `answers/<fingerprint>/` (default: distill's cache) and reused, and every item is the rendered
    prompt followed by the teacher's answer tokens, labelled on the answer only.

    Args:
        path: JSONL / CSV of prompts (column `prompt_column`) or `messages`; rows with
            `split: test` are held out (else `test_count` rows, seeded).
        teacher: the answering model, `{path: ..., gguf_file: ...}` (filled from the recipe's
            `hf` teacher when left out).
        tokenizer: must be the teacher's (the answers keep its token ids); default: the teacher's.
        max_length: the longest item in tokens (prompt + answer); a prompt that does not leave
            room for an answer is refused. Keep it within the student's context.
        max_new_tokens / do_sample / temperature / top_p: the teacher's generation settings.
        generate_batch_size: prompts answered per `generate` call.
        offsets: items are texts (the prompt rendered with the teacher's chat template, then the
            answer's text), collated with byte offsets in `tokenizer` (`CrossTokenizerCollator`),
            which may then be another tokenizer than the teacher's: a student of any tokenizer
            (`{train: {vocab_size, kind}}` trains one on the training answers). `distill run` sets
            it when a term reads a teacher of another tokenizer (aligned_kd, uld).
    """
    from distill.nlp.chat_data import build_answers, read_prompts, split_prompts, too_long

    if teacher is None:
        raise ConfigError(
            "chat_prompts: no teacher to answer the prompts; give data.init_args.teacher {path, gguf_file} "
            "or use an hf teacher with a path"
        )
    rows = read_prompts(path, prompt_column, split_column)
    train, val, test = split_prompts(rows, test_count, val_fraction, seed)
    parts = (_cap(train, max_train), _cap(val, max_val), _cap(test, max_test))
    # held-out prompts first: a shortened budget still evaluates on the same answers
    needed = parts[2] + parts[1] + parts[0]
    done, tok, folder = build_answers(
        path, teacher, answers, prompt_column, split_column, max_new_tokens, do_sample, temperature,
        top_p, generate_batch_size, seed, rows=rows, needed=[parts[2], parts[1], parts[0]], max_length=max_length,
    )  # fmt: skip
    if offsets:
        return _chat_texts(rows, done, parts, needed, tok, tokenizer, max_length, path, folder)
    if tokenizer is not None and not isinstance(tokenizer, dict):
        other = get_tokenizer(tokenizer)
        if other.get_vocab() != tok.get_vocab():
            raise DistillError(
                "chat_prompts: the data's tokenizer is not the teacher's; the answers keep the teacher's "
                "token ids, so leave data.init_args.tokenizer out"
            )
    items: list[dict[str, Any]] = [{} for _ in rows]
    for i in needed:
        a = done[i]
        p = a["prompt_ids"]
        if len(p) >= max_length:  # answered earlier under a larger max_length
            raise DistillError(f"{path} {too_long(i, len(p), max_length)}")
        ans = a["answer_ids"][: max_length - len(p)]
        items[i] = {"input_ids": p + ans, "labels": [-100] * len(p) + ans}
    finish = [done[i]["finish"] for i in needed]
    meta = {
        "source": str(path),
        "answers": str(folder),
        "eos_rate_teacher": sum(f == "eos" for f in finish) / len(finish),
        "max_length": max_length,
    }
    return _bundle(items, parts, tok, meta=meta)


def _chat_texts(rows, done, parts, needed, teacher_tok, tokenizer, max_length, path, folder) -> DataBundle:
    """`chat_prompts` with `offsets`: text records `{"text": prompt + answer, "prompt": prompt}`,
    the prompt rendered with the teacher's chat template (the text both sides read), collated in
    the student's tokenizer (the teacher's when `tokenizer` is None)."""
    records: list[dict[str, Any]] = [{} for _ in rows]
    for i in needed:
        prompt = teacher_tok.apply_chat_template(
            rows[i]["messages"], add_generation_prompt=True, tokenize=False
        )
        records[i] = {"text": prompt + done[i]["answer"], "prompt": prompt}
    if tokenizer is None:
        tok = teacher_tok
    else:
        # a tokenizer trained here learns from the training answers (and their prompts)
        tok = get_tokenizer(tokenizer, [records[i]["text"] for i in parts[0]])
    if not getattr(tok, "chat_template", None):
        tok.chat_template = teacher_tok.chat_template  # the student reads prompts as the teacher does
    finish = [done[i]["finish"] for i in needed]
    meta = {
        "source": str(path),
        "answers": str(folder),
        "eos_rate_teacher": sum(f == "eos" for f in finish) / len(finish),
        "max_length": max_length,
    }
    return offset_bundle(records, parts, tok, max_length, True, meta)


def served_responses(
    path: str,
    tokenizer: Any = None,
    prompt_template: str = "",
    max_length: int = 256,
    val_fraction: float = 0.1,
    test_fraction: float = 0.1,
    max_train: int | None = None,
    max_val: int | None = None,
    max_test: int | None = None,
    seed: int = 0,
    served: dict[str, Any] | None = None,
    prompts: str | None = None,
    offsets: bool = True,
) -> DataBundle:
    """A served teacher's responses file (JSON Lines in the OpenAI chat-completions format, see
    `distill.nlp.served`) as the student's texts: `prompt_template` (with `{prompt}` replaced)
    followed by each response, labels on the response, collated with byte offsets in the student's
    tokenizer (`{train: {vocab_size, kind}}` trains one on the training texts).

    Args:
        served: the recipe's `teacher.served` section (filled by `distill run`); with an
            `endpoint`, the answers are fetched into `path` first (once; an interrupted fetch is
            completed, nothing refetched), asking the prompts of `prompts`.
        prompts: a JSONL / CSV prompt file (`distill.nlp.chat_data.read_prompts`), for the endpoint.
    """
    from distill.nlp.served import fetch_responses, read_responses

    if served and served.get("endpoint"):
        if not prompts:
            raise ConfigError(
                "served_responses: teacher.served.endpoint is set; give data.init_args.prompts (a prompt file to ask it)"
            )
        from distill.nlp.chat_data import read_prompts

        fetch_responses(
            path, served["endpoint"], served.get("model") or "", [r["messages"] for r in read_prompts(prompts)],
            top_logprobs=int(served.get("top_logprobs", 20)), max_tokens=int(served.get("max_tokens", 128)),
            temperature=float(served.get("temperature", 1.0)),
        )  # fmt: skip
    records, seen = [], set()
    for r in read_responses(path):
        prefix = prompt_template.replace("{prompt}", r.prompt) if prompt_template else ""
        if prefix + r.text not in seen:  # the same text answered twice: the first answer teaches
            seen.add(prefix + r.text)
            records.append({"text": prefix + r.text, "prompt": prefix})
    parts = _split(len(records), val_fraction, test_fraction, seed)
    parts = (_cap(parts[0], max_train), _cap(parts[1], max_val), _cap(parts[2], max_test))
    tok = get_tokenizer(tokenizer, [records[i]["text"] for i in parts[0]])
    return offset_bundle(records, parts, tok, max_length, True, {"source": str(path), "texts": len(records)})
