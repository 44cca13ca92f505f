"""Text data: a user's JSONL / CSV / TXT file or a `datasets` dataset, and the fortunes corpus.

Everything here returns plain lists of strings; tokenization happens in a collate function
(`distill.nlp.collate`), so the same texts serve the teacher, the students and the embedding
cache. `train_tokenizer` trains a small BPE / word / character tokenizer locally (the
`tokenizers` library), for language-model recipes that cannot download one.
"""

from __future__ import annotations

import csv
import json
import os
import random
from collections.abc import Iterable, Sequence
from pathlib import Path

from distill.errors import DistillError

# The text of Debian's fortunes package that the showcase recipes read, shipped with distill so that
# no machine needs the package (source, filter and licence: fortunes/README.md).
FORTUNES_DIR = Path(__file__).resolve().parent / "fortunes"
BUNDLED_PREFIX = "bundled:"
BUNDLED = {"fortunes": FORTUNES_DIR}
_TEXT_FIELDS = ("text", "sentence", "content", "body", "document")


def data_path(path: str | os.PathLike) -> Path:
    """A data path as a recipe writes it: a file or folder, or `bundled:<name>` for a corpus that
    ships with distill (`bundled:fortunes`)."""
    text = str(path)
    if not text.startswith(BUNDLED_PREFIX):
        return Path(path)
    name = text[len(BUNDLED_PREFIX) :]
    if name not in BUNDLED:
        raise DistillError(f"unknown bundled corpus '{text}'; the bundled corpora are: bundled:fortunes")
    return BUNDLED[name]


def load_texts(source, field: str | None = None, limit: int | None = None) -> list[str]:
    """Texts from a file, a directory of fortune files, a list, or a `datasets` dataset.

    Args:
        source: `bundled:fortunes`, a path to `.jsonl` (one object per line), `.json` (a list of strings or
            objects), `.csv` (with a header), `.txt` (one text per line; blank-line separated
            paragraphs when the file has blank lines, and fortune files separated by `%` lines),
            a directory of such files; or a `datasets.Dataset` / list of strings / list of dicts.
        field: the column holding the text (default: the first of text, sentence, content,
            body, document that exists).
        limit: keep only the first `limit` texts.

    Returns:
        Non-empty, stripped texts, in order.
    """
    if isinstance(source, str | os.PathLike):
        texts = _load_path(data_path(source), field)
    elif hasattr(source, "column_names") and hasattr(source, "__getitem__"):  # datasets.Dataset
        col = field or _pick_field(source.column_names, "the dataset")
        texts = list(source[col])
    elif isinstance(source, Sequence):
        texts = [_from_record(r, field, "the list") for r in source]
    else:
        raise DistillError(
            f"cannot read texts from a {type(source).__name__}; give a .jsonl/.json/.csv/.txt path, a "
            "directory, a list of strings or a datasets.Dataset"
        )
    texts = [t.strip() for t in texts if isinstance(t, str) and t.strip()]
    if not texts:
        raise DistillError(
            f"no texts found in {source}; check the file and the text field ({field or 'text'})"
        )
    return texts[:limit] if limit else texts


def _pick_field(columns: Iterable[str], where: str) -> str:
    columns = list(columns)
    for f in _TEXT_FIELDS:
        if f in columns:
            return f
    raise DistillError(f"no text column in {where} (columns: {', '.join(columns)}); pass field='<column>'")


def _from_record(r, field: str | None, where: str) -> str:
    if isinstance(r, str):
        return r
    if isinstance(r, dict):
        key = field or _pick_field(r.keys(), where)
        if key not in r:
            raise DistillError(f"a record in {where} has no '{key}' field (fields: {', '.join(r)})")
        return r[key]
    raise DistillError(f"records in {where} must be strings or objects, got {type(r).__name__}")


def _load_path(path: Path, field: str | None) -> list[str]:
    if path.is_dir():
        files = sorted(p for p in path.iterdir() if p.is_file() and not p.is_symlink() and _is_text_file(p))
        if not files:
            raise DistillError(f"{path} holds no text files")
        return [t for p in files for t in _load_path(p, field)]
    if not path.is_file():
        raise DistillError(f"text file {path} does not exist")
    suffix = path.suffix.lower()
    if suffix == ".jsonl":
        out = []
        with open(path, encoding="utf-8") as f:
            for n, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    out.append(_from_record(json.loads(line), field, f"{path} line {n}"))
                except json.JSONDecodeError as e:
                    raise DistillError(f"{path} line {n} is not valid JSON ({e.msg})") from e
        return out
    if suffix == ".json":
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except json.JSONDecodeError as e:
            raise DistillError(f"{path} is not valid JSON ({e.msg} at line {e.lineno})") from e
        if not isinstance(data, list):
            raise DistillError(f"{path} must hold a JSON list of strings or objects")
        return [_from_record(r, field, str(path)) for r in data]
    if suffix in (".csv", ".tsv"):
        with open(path, encoding="utf-8", newline="") as f:
            reader = csv.DictReader(f, delimiter="\t" if suffix == ".tsv" else ",")
            col = field or _pick_field(reader.fieldnames or [], str(path))
            if col not in (reader.fieldnames or []):
                raise DistillError(
                    f"{path} has no column '{col}' (columns: {', '.join(reader.fieldnames or [])})"
                )
            return [row[col] for row in reader]
    raw = path.read_text(encoding="utf-8", errors="replace")
    return _split_plain(raw)


def _is_text_file(p: Path) -> bool:
    return p.suffix.lower() in ("", ".txt", ".jsonl", ".json", ".csv", ".tsv")


def fortune_passages(raw: str) -> list[str]:
    """The `%`-separated passages of a fortune(6) file, as written (no stripping)."""
    parts, cur = [], []
    for line in raw.splitlines():
        if line.strip() == "%":
            parts.append("\n".join(cur))
            cur = []
        else:
            cur.append(line)
    parts.append("\n".join(cur))
    return parts


def _split_plain(raw: str) -> list[str]:
    lines = raw.splitlines()
    if any(line.strip() == "%" for line in lines):  # fortune(6) format
        return fortune_passages(raw)
    if any(not line.strip() for line in lines):  # paragraphs
        return [p for p in raw.split("\n\n")]
    return lines


def fortunes(
    directory: str | os.PathLike = FORTUNES_DIR,
    min_chars: int = 20,
    max_chars: int = 400,
    one_line: bool = True,
) -> list[str]:
    """The fortune cookies of Debian's `fortunes` package, as texts (by default the copy that ships
    with distill; give the folder of an installed package to read that instead).

    Args:
        min_chars / max_chars: keep passages in this length range (drops ASCII art and essays).
        one_line: collapse whitespace, so each passage is one line of prose.

    Returns:
        Deduplicated passages in a fixed order (files sorted by name).
    """
    directory = data_path(directory)
    if not directory.is_dir():
        raise DistillError(f"{directory} is not a folder of fortune files; give one, or bundled:fortunes")
    files = sorted(p for p in directory.iterdir() if p.is_file() and not p.is_symlink() and not p.suffix)
    out, seen = [], set()
    for p in files:
        for t in _split_plain(p.read_text(encoding="utf-8", errors="replace")):
            t = " ".join(t.split()) if one_line else t.strip()
            if min_chars <= len(t) <= max_chars and t not in seen:
                seen.add(t)
                out.append(t)
    if not out:
        raise DistillError(f"no fortunes between {min_chars} and {max_chars} characters in {directory}")
    return out


def fortune_dialogues(directory: str | os.PathLike = FORTUNES_DIR, max_chars: int = 300) -> list[list[dict]]:
    """Question/answer exchanges from the fortunes corpus (as `fortunes`), as chat messages.

    `riddles` passages with `Q:` and `A:` lines become "Q" (user) -> "A" (assistant); `definitions`
    passages that start with "Term:" become "What is Term?" (user) -> the definition (assistant).
    """
    directory = data_path(directory)
    if not directory.is_dir():
        raise DistillError(f"{directory} is not a folder of fortune files; give one, or bundled:fortunes")
    out = []
    for name in ("riddles", "definitions"):
        path = directory / name
        if not path.is_file():
            continue
        for passage in _split_plain(path.read_text(encoding="utf-8", errors="replace")):
            q = a = None
            lines = [ln.strip() for ln in passage.strip().splitlines() if ln.strip()]
            qs = [ln[2:].strip() for ln in lines if ln.startswith("Q:")]
            ans = [ln[2:].strip() for ln in lines if ln.startswith("A:")]
            if qs and ans:
                q, a = qs[0], ans[0]
            elif name == "definitions" and lines and lines[0].endswith(":") and len(lines) > 1:
                term = lines[0][:-1].strip()
                q = f"What is {term}?"
                a = " ".join(ln for ln in lines[1:] if not ln.startswith("--"))
            if q and a and len(q) + len(a) <= max_chars:
                out.append(
                    [
                        {"role": "user", "content": " ".join(q.split())},
                        {"role": "assistant", "content": " ".join(a.split())},
                    ]
                )
    if not out:
        raise DistillError(f"no question/answer passages in {directory}/riddles or definitions")
    return out


def split_texts(
    texts: Sequence[str], val_fraction: float = 0.1, seed: int = 0
) -> tuple[list[str], list[str]]:
    """A seeded shuffle split into (train, validation)."""
    if not 0 < val_fraction < 1:
        raise DistillError(f"val_fraction must be in (0, 1), got {val_fraction}")
    idx = list(range(len(texts)))
    random.Random(seed).shuffle(idx)
    n_val = max(1, int(round(len(texts) * val_fraction)))
    return [texts[i] for i in idx[n_val:]], [texts[i] for i in idx[:n_val]]


def train_tokenizer(texts: Iterable[str], vocab_size: int = 2000, kind: str = "bpe", lowercase: bool = False):
    """A small tokenizer trained here, as a `transformers.PreTrainedTokenizerFast`.

    Args:
        texts: the training corpus.
        vocab_size: target vocabulary (for "bpe" and "word"; "char" takes every character seen).
        kind: "bpe" (byte-level BPE, never produces unknown tokens), "word" (whitespace words,
            rare ones map to <unk>), or "char".

    The tokenizer has `<pad>` (id 0), `<eos>` and `<unk>`; it saves with `save_pretrained`.
    """
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    specials = ["<pad>", "<eos>", "<unk>"]
    texts = list(texts)
    if kind == "bpe":
        tok = Tokenizer(models.BPE(unk_token=None))
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tok.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(
            vocab_size=vocab_size,
            special_tokens=specials,
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
            show_progress=False,
        )
    elif kind == "word":
        tok = Tokenizer(models.WordLevel(unk_token="<unk>"))
        tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
        tok.decoder = decoders.WordPiece(prefix="##", cleanup=False)
        trainer = trainers.WordLevelTrainer(
            vocab_size=vocab_size, special_tokens=specials, show_progress=False
        )
    elif kind == "char":
        tok = Tokenizer(models.WordLevel(unk_token="<unk>"))
        tok.pre_tokenizer = pre_tokenizers.Split("", behavior="isolated")
        tok.decoder = decoders.Fuse()
        trainer = trainers.WordLevelTrainer(
            vocab_size=1_000_000, special_tokens=specials, show_progress=False
        )
    else:
        raise DistillError(f"tokenizer kind '{kind}' is not one of bpe, word, char")
    if lowercase:
        tok.normalizer = normalizers.Lowercase()
    tok.train_from_iterator(texts, trainer=trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token="<pad>", eos_token="<eos>", unk_token="<unk>"
    )
