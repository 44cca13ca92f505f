"""Aligning two tokenizations of one text, for teachers whose tokenizer differs from the student's.

Both tokenizers must be *fast* (Rust `tokenizers`), which report each token's character span
(`return_offsets_mapping=True`); a slow tokenizer has none and is refused with what to do.

- `token_offsets`: ids and character spans of texts under one tokenizer, as the collator cuts them.
- `CrossTokenizerCollator`: `LMCollator` plus the raw `text` and the student's `offset_mapping`.
- `align_positions`: which teacher position predicts what follows the same text prefix as each
  student position (the tokens end at the same character), and the fallback position.
- `vocab_map`: teacher token id -> student token id with the same string (`mode="exact"`) or the
  first student token of the teacher token's spelling (`mode="prefix"`).

Causal LMs predict at position t the token t+1: student position j and teacher position i see
the same text exactly when token j and token i end at the same character. Where the tokenizers
split a word differently ("Ġunbel|iev|able" vs "Ġun|believ|able"), the positions inside the word
have no partner; the word's end (and every boundary both tokenizers share) has one.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
from torch import Tensor

from distill.errors import DistillError
from distill.nlp.collate import pad_batch


def _name(tokenizer) -> str:
    return getattr(tokenizer, "name_or_path", "") or type(tokenizer).__name__


def check_offsets(tokenizer, who: str = "tokenizer") -> None:
    """A tokenizer without character offsets cannot be aligned: one line saying which and what to do."""
    if not getattr(tokenizer, "is_fast", False):
        raise DistillError(
            f"the {who} tokenizer {_name(tokenizer)!r} ({type(tokenizer).__name__}) gives no character offsets, "
            "which cross-tokenizer distillation aligns by; load its fast version "
            "(AutoTokenizer.from_pretrained(..., use_fast=True)) or convert it with the tokenizers library"
        )


def bos_id(tokenizer) -> int:
    """The token a sequence starts with when `add_bos`: the tokenizer's bos, else its eos (as GPT-2)."""
    i = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id
    if i is None:
        raise DistillError(
            f"the tokenizer {_name(tokenizer)!r} has neither a bos nor an eos token for add_bos"
        )
    return i


def token_offsets(
    tokenizer, texts: Sequence[str], max_length: int, add_eos: bool = True, add_bos: bool = False
) -> tuple[list[list[int]], list[list[tuple[int, int]]]]:
    """Token ids and (start, end) character spans per text, cut to `max_length` like `LMCollator`.

    The appended end-of-sequence token gets the span (-1, -1): it covers no character. With
    `add_bos`, a first token with the empty span (0, 0) lets the model predict the text's first
    token too; the two sides' first positions then align (both have seen nothing).
    """
    check_offsets(tokenizer)
    enc = tokenizer(list(texts), add_special_tokens=False, return_offsets_mapping=True)
    eos = tokenizer.eos_token_id
    bos = bos_id(tokenizer) if add_bos else None
    ids_out, offs_out = [], []
    for ids, offs in zip(enc["input_ids"], enc["offset_mapping"]):
        ids, offs = list(ids), [tuple(o) for o in offs]
        if add_eos and eos is not None:
            ids, offs = ids + [eos], offs + [(-1, -1)]
        if bos is not None:
            ids, offs = [bos] + ids, [(0, 0)] + offs
        ids_out.append(ids[:max_length])
        offs_out.append(offs[:max_length])
    return ids_out, offs_out


def _texts(items: Sequence) -> list[str]:
    out = []
    for it in items:
        if isinstance(it, Mapping):
            if "text" not in it:
                raise DistillError(
                    "cross-tokenizer batches are plain texts (or {'text': ...} records); "
                    f"got a record with keys {', '.join(it)}"
                )
            it = it["text"]
        out.append(str(it))
    return out


class CrossTokenizerCollator:
    """Texts -> `{input_ids, attention_mask, labels, offset_mapping, text}` for the student.

    The same batch as `LMCollator` (every token trained, `<eos>` appended, right-padded), plus
    `offset_mapping` (B, T, 2) long (-1 on padding and `<eos>`) and the raw texts, which a
    cross-tokenizer teacher re-tokenizes with its own tokenizer. `add_bos` starts every text with
    a bos token (the eos when there is none), so its first token is trained as well; give the
    teacher the same setting.
    """

    def __init__(self, tokenizer, max_length: int = 128, add_eos: bool = True, add_bos: bool = False):
        check_offsets(tokenizer, "student")
        if tokenizer.pad_token_id is None:
            raise DistillError(
                "the tokenizer has no pad token; set tokenizer.pad_token = tokenizer.eos_token"
            )
        self.tokenizer = tokenizer
        self.max_length = max_length
        self.add_eos = add_eos
        self.add_bos = add_bos

    def __call__(self, items: Sequence) -> dict:
        texts = _texts(items)
        ids, offs = token_offsets(self.tokenizer, texts, self.max_length, self.add_eos, self.add_bos)
        out = pad_batch(ids, ids, self.tokenizer.pad_token_id)
        om = torch.full((*out["input_ids"].shape, 2), -1, dtype=torch.long)
        for b, o in enumerate(offs):
            if o:
                om[b, : len(o)] = torch.as_tensor(o, dtype=torch.long)
        out["offset_mapping"] = om
        out["text"] = texts
        return out


def align_positions(s_ends: Sequence[int], t_ends: Sequence[int], t_len: int) -> tuple[list[int], list[int]]:
    """For one text: the aligned and the fallback teacher position of every student position.

    Args:
        s_ends, t_ends: the character where each student / teacher token ends (-1: covers none).
        t_len: teacher positions that predict a token (a position predicts only if a token follows).

    Returns:
        align[j]: the teacher position i < t_len whose token ends where student token j ends, else -1.
        fallback[j]: the last teacher position i < t_len whose token ends before student token j
        ends, when the teacher's text reaches that far, else -1.
    """
    by_end = {e: i for i, e in enumerate(t_ends[:t_len]) if e >= 0}
    covered = max((e for e in t_ends if e >= 0), default=-1)
    ends = [(e, i) for i, e in enumerate(t_ends[:t_len]) if e >= 0]
    align, fallback = [], []
    k = -1  # index into ends of the last teacher token ending before e
    for e in s_ends:
        if e < 0:
            align.append(-1)
            fallback.append(-1)
            continue
        align.append(by_end.get(e, -1))
        while k + 1 < len(ends) and ends[k + 1][0] < e:
            k += 1
        fallback.append(ends[k][1] if k >= 0 and e <= covered else -1)
    return align, fallback


def batch_alignment(
    s_offsets: Tensor, t_offsets: Sequence[Sequence[tuple[int, int]]], t_lengths: Sequence[int]
) -> tuple[Tensor, Tensor, Tensor]:
    """(B, Ts) align and fallback teacher positions, and (B, Tt) teacher `valid` (predicts a token).

    Args:
        s_offsets: (B, Ts, 2) the student's character spans (-1 where none).
        t_offsets: per text, the teacher's spans; t_lengths: per text, its number of tokens.
    """
    b, ts = s_offsets.shape[:2]
    tt = max((len(o) for o in t_offsets), default=1) or 1
    align = torch.full((b, ts), -1, dtype=torch.long)
    fallback = torch.full((b, ts), -1, dtype=torch.long)
    valid = torch.zeros((b, tt), dtype=torch.bool)
    s_ends = s_offsets[..., 1].tolist()
    for r in range(b):
        n = t_lengths[r]
        valid[r, : max(n - 1, 0)] = True  # the last token predicts nothing inside the text
        a, f = align_positions(s_ends[r], [e for _, e in t_offsets[r]], max(n - 1, 0))
        align[r] = torch.as_tensor(a, dtype=torch.long)
        fallback[r] = torch.as_tensor(f, dtype=torch.long)
    return align, fallback, valid


_RAW = "\x00"  # marks a token keyed by its raw string (not text on its own)


def _token_strings(tokenizer) -> list[str | None]:
    """The text of each token id alone (byte fragments that are not whole characters: `_RAW` + raw token)."""
    vocab_size = max(len(tokenizer), max(tokenizer.get_vocab().values(), default=-1) + 1)
    specials = set(tokenizer.all_special_ids)
    out: list[str | None] = []
    for i in range(vocab_size):
        if i in specials:
            out.append(tokenizer.convert_ids_to_tokens(i))
            continue
        s = tokenizer.decode([i], clean_up_tokenization_spaces=False)
        if not s or "\ufffd" in s:
            # A byte fragment (byte-level BPE): no text alone; two byte-level tokenizers of one
            # alphabet still spell it the same way, so it is keyed by its raw token string.
            raw = tokenizer.convert_ids_to_tokens(i)
            s = _RAW + raw if raw else None
        out.append(s)
    return out


def vocab_strings(tokenizer) -> dict:
    """What `vocab_map` needs from the teacher's side, storable as JSON: token strings, eos id."""
    check_offsets(tokenizer, "teacher")
    return {
        "strings": _token_strings(tokenizer),
        "special": sorted(tokenizer.all_special_ids),
        "eos": tokenizer.eos_token_id,
        "name": _name(tokenizer),
    }


def vocab_map(teacher, student_tokenizer, mode: str = "exact") -> Tensor:
    """(Vt,) long: the student id for each teacher token id, -1 where there is none.

    Args:
        teacher: the teacher's tokenizer, or its `vocab_strings(...)` (as a store keeps it).
        student_tokenizer: the student's (fast) tokenizer.
        mode: "exact": the student token whose text is the same string (special tokens by name,
            `<eos>` to `<eos>`); "prefix": additionally, a teacher token that is no student token
            maps to the first student token of its spelling, so all the teacher's mass is carried.
    """
    if mode not in ("exact", "prefix"):
        raise DistillError(f"vocab_map mode '{mode}' is not one of exact, prefix")
    t = teacher if isinstance(teacher, Mapping) else vocab_strings(teacher)
    check_offsets(student_tokenizer, "student")
    s_strings = _token_strings(student_tokenizer)
    t_special, s_special = set(t.get("special", ())), set(student_tokenizer.all_special_ids)
    t_chars = {c for i, s in enumerate(t["strings"]) if s and i not in t_special and s[0] != _RAW for c in s}
    s_chars = {c for i, s in enumerate(s_strings) if s and i not in s_special and s[0] != _RAW for c in s}
    if not t_chars & s_chars:
        raise DistillError(
            f"the teacher tokenizer {t.get('name', '')!r} and the student tokenizer {_name(student_tokenizer)!r} "
            "share no characters, so no token or position can be aligned; give both the same text "
            "normalisation (e.g. the same lowercasing) or distil on generated text (sequence-level KD)"
        )
    index: dict[str, int] = {}
    for i, s in enumerate(s_strings):
        if s is not None and s not in index:
            index[s] = i
    out = torch.full((len(t["strings"]),), -1, dtype=torch.long)
    for i, s in enumerate(t["strings"]):
        if s is None:
            continue
        j = index.get(s, -1)
        if j < 0 and mode == "prefix" and s[0] != _RAW:
            ids = student_tokenizer(s, add_special_tokens=False)["input_ids"]
            j = ids[0] if ids else -1
        out[i] = j
    if t.get("eos") is not None and student_tokenizer.eos_token_id is not None:
        out[t["eos"]] = student_tokenizer.eos_token_id
    return out
