"""Aligning two tokenizations of one text, for teachers whose tokenizer differs from the student's.

- `TokenBytes(tokenizer)`: the bytes of text each token id stands for (`token_pieces`: `Ġthe`,
  `▁the` -> b" the", `<0x61>` -> b"a"), and `encode`, which gives per text the token ids and
  the UTF-8 bytes of the text each token has consumed through its end (`text_ends`).
- `CrossTokenizerCollator`: `LMCollator` plus the raw `text` and the student's `byte_ends`.
- `align_positions`: which teacher position has read exactly the same text as each student
  position, and the fallback position (the last teacher position that has read less).
- `vocab_map`: teacher token id -> student token id of the same bytes (`mode="exact"`) or the
  first student token of the teacher token's spelling (`mode="prefix"`).

Causal LMs predict at position t the token t+1: student position j and teacher position i
predict what follows the same text exactly when tokens ..j and ..i have consumed the same bytes
of the text. Bytes, not characters: byte-level tokenizers (GPT-2, Llama 3, Qwen) and byte
fallback (Llama 2, Mistral: `<0xF0>`) split a multibyte character over several tokens, and
the positions inside the character have read different text. Tokens that consume no text
(bos, a lone SentencePiece `▁` that only marks the start) share the count of the token before;
in such a run the last positions of the two sides are paired (they predict the next text). Where
the tokenizers split a word differently ("Ġunbel|iev|able" vs "Ġun|believ|able"), the positions
inside the word have no partner; the word's end (and every boundary both tokenizers share) has one.

How many bytes a token consumed is read from the token itself (its bytes must be the next bytes
of the text: exact whatever the offsets say), else, where the tokenizer changed the text
(lowercasing, Unicode normalisation), from its character span (`return_offsets_mapping`, fast
tokenizers); a token ending inside a character it does not complete, or that neither settles,
gets -1 and aligns with nothing. A tokenizer without offsets (a slow one) is used when its
tokens spell the text back byte for byte; from the first token that does not, the rest of that
text aligns with nothing.
"""

from __future__ import annotations

import bisect
import json
import re
from collections.abc import Mapping, Sequence

import torch
from torch import Tensor

from distill.errors import DistillError
from distill.nlp.collate import pad_batch

# A byte-fallback token (SentencePiece, Llama 2, Mistral): one raw byte of the text.
_BYTE_TOKEN = re.compile(r"<0x([0-9A-Fa-f]{2})>")
# A tokenizer without offsets must spell this back byte for byte (upper case, punctuation, two spaces).
_PROBE = "Hello world, two  spaces"


def _name(tokenizer) -> str:
    return getattr(tokenizer, "name_or_path", "") or type(tokenizer).__name__


def _byte_level_alphabet() -> dict[str, int]:
    """GPT-2's byte-level alphabet, character -> byte: printable Latin-1 bytes stand for
    themselves, the other 68 are moved to 256, 257, ... in byte order (Radford et al. 2019)."""
    keep = {*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)}
    out, moved = {}, 0
    for b in range(256):
        if b in keep:
            out[chr(b)] = b
        else:
            out[chr(256 + moved)] = b
            moved += 1
    return out


def _walk(node, found: dict) -> None:
    """Collects from a `tokenizers` JSON component what says how tokens spell text."""
    if isinstance(node, list):
        for n in node:
            _walk(n, found)
        return
    if not isinstance(node, dict):
        return
    kind = node.get("type")
    if kind == "ByteLevel":
        found["byte_level"] = True
    elif kind == "Metaspace":
        found["marker"] = node.get("replacement", "▁")
    elif kind == "Replace" and node.get("content") == " " and isinstance(node.get("pattern"), dict):
        found.setdefault("marker", node["pattern"].get("String"))
    for key in ("pretokenizers", "decoders", "normalizers"):
        _walk(node.get(key), found)


def _style(tokenizer) -> tuple[bool, str | None, bool]:
    """(byte-level alphabet, the space marker such as "▁", byte-fallback tokens) of a tokenizer."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        spec = json.loads(backend.to_str())
        found: dict = {}
        for part in ("normalizer", "pre_tokenizer", "decoder"):
            _walk(spec.get(part), found)
        fallback = bool((spec.get("model") or {}).get("byte_fallback"))
        return bool(found.get("byte_level")), found.get("marker"), fallback
    sentencepiece = hasattr(tokenizer, "sp_model")  # slow SentencePiece tokenizers (Llama, T5)
    return hasattr(tokenizer, "byte_decoder"), "▁" if sentencepiece else None, sentencepiece


def _vocab_size(tokenizer) -> int:
    return max(len(tokenizer), max(tokenizer.get_vocab().values(), default=-1) + 1)


def token_pieces(tokenizer) -> list[bytes | None]:
    """The UTF-8 bytes of text each token id stands for, leading space explicit; None: a special token.

    `Ġthe` (byte-level BPE) and `▁the` (SentencePiece) are both b" the"; a byte-level fragment
    of a character (`ðŁ`) and a byte-fallback token (`<0xF0>`) are the raw bytes they stand for.
    """
    return _pieces(tokenizer)[0]


def _pieces(tokenizer) -> tuple[list[bytes | None], set[int]]:
    """`token_pieces`, and the ids of byte-fallback tokens (`<0x61>`: emitted only for bytes no other token covers)."""
    byte_level, marker, fallback = _style(tokenizer)
    alphabet = _byte_level_alphabet() if byte_level else {}
    byte_ids: set[int] = set()
    special = set(tokenizer.all_special_ids)
    added = getattr(tokenizer, "added_tokens_decoder", {}) or {}
    raws = tokenizer.convert_ids_to_tokens(list(range(_vocab_size(tokenizer))))
    out: list[bytes | None] = []
    for i, raw in enumerate(raws):
        if i in special or raw is None:
            out.append(None)
        elif i in added:
            # Added tokens are matched in the raw text before the model runs: their content is text.
            tok = added[i]
            out.append(None if getattr(tok, "special", False) else str(getattr(tok, "content", raw)).encode())
        elif fallback and (m := _BYTE_TOKEN.fullmatch(raw)):
            out.append(bytes([int(m[1], 16)]))
            byte_ids.add(i)
        elif byte_level and all(c in alphabet for c in raw):
            out.append(bytes(alphabet[c] for c in raw))
        elif marker:
            out.append(raw.replace(marker, " ").encode())
        else:
            out.append(raw.encode())
    return out, byte_ids


def text_ends(
    text: str,
    ids: Sequence[int],
    pieces: Sequence[bytes | None],
    offsets: Sequence[tuple[int, int]] | None = None,
) -> list[int]:
    """Per token of `text`, the UTF-8 bytes of the text it has consumed through its end (-1: unknown).

    Args:
        ids: the text's tokens (no bos / eos added: those are the caller's).
        pieces: `token_pieces` of the tokenizer.
        offsets: the tokens' character spans (fast tokenizers), or None.
    """
    data = text.encode("utf-8")
    char_at = [0]  # byte offset of each character boundary
    for ch in text:
        char_at.append(char_at[-1] + len(ch.encode("utf-8")))
    n = len(ids)
    out: list[int] = []
    pos, in_sync = 0, True
    for k, i in enumerate(ids):
        piece = pieces[i] if 0 <= i < len(pieces) else None
        if piece is not None and in_sync:
            if data.startswith(piece, pos):
                pos += len(piece)
                out.append(pos)
                continue
            if pos == 0 and piece[:1] == b" " and data[:1] != b" " and data.startswith(piece[1:]):
                # The space a SentencePiece tokenizer puts before the text (`▁Hello`, a lone `▁`).
                pos += len(piece) - 1
                out.append(pos)
                continue
        if offsets is None:
            # No spans to fall back on: the tokens no longer spell the text; nothing after aligns.
            in_sync = False
            out.append(-1)
            continue
        s, e = offsets[k]
        if e <= s:  # an empty span: a token that consumed no character (a special one)
            out.append(pos if piece is None and in_sync else -1)
            continue
        nxt = offsets[k + 1] if k + 1 < n else (len(text), len(text) + 1)  # the last: up to the text's end
        gap = text[e : nxt[0]] if nxt[1] > nxt[0] else ""
        if (nxt[1] > nxt[0] and nxt[0] < e) or gap.strip() or char_at[e] < pos:
            # It ends inside a character the next token goes on with (a normaliser changed it);
            # or characters no token covers follow (a combining accent NFKC merged into it: the
            # span may stop short of what it read); or its span goes backwards. Not a known prefix.
            in_sync = False
            out.append(-1)
            continue
        pos, in_sync = char_at[e], True
        out.append(pos)
    return out


class TokenBytes:
    """A tokenizer with what aligning it needs: its token pieces and whether it gives offsets.

    A fast tokenizer (Rust `tokenizers`) gives character offsets, with which a normalised text
    still aligns; a slow one is used when its tokens spell a probe text back byte for byte, and
    refused otherwise, with what to do.
    """

    def __init__(self, tokenizer, who: str = "tokenizer"):
        self.tokenizer = tokenizer
        self.offsets = bool(getattr(tokenizer, "is_fast", False))
        if self.offsets:
            self.pieces, self.byte_ids = _pieces(tokenizer)
            return
        try:
            self.pieces, self.byte_ids = _pieces(tokenizer)
            ok = -1 not in self._ends([_PROBE])[1][0]
        except Exception:  # a slow tokenizer object that cannot even be read
            ok = False
        if not ok:
            raise DistillError(
                f"the {who} tokenizer {_name(tokenizer)!r} ({type(tokenizer).__name__}) gives no character offsets "
                "and its tokens do not spell the text back, so its positions cannot be aligned; load its fast "
                "version (AutoTokenizer.from_pretrained(..., use_fast=True)) or convert it with the tokenizers library"
            )

    def _ends(self, texts: Sequence[str]) -> tuple[list[list[int]], list[list[int]]]:
        if self.offsets:
            enc = self.tokenizer(list(texts), add_special_tokens=False, return_offsets_mapping=True)
            offs = enc["offset_mapping"]
        else:
            enc = self.tokenizer(list(texts), add_special_tokens=False)
            offs = [None] * len(texts)
        ids = [list(x) for x in enc["input_ids"]]
        ends = [text_ends(t, x, self.pieces, o) for t, x, o in zip(texts, ids, offs)]
        return ids, ends

    def encode(
        self, texts: Sequence[str], max_length: int, add_eos: bool = True, add_bos: bool = False
    ) -> tuple[list[list[int]], list[list[int]]]:
        """Token ids and consumed bytes (`text_ends`) per text, cut to `max_length` like `LMCollator`.

        The appended `<eos>` gets -1 (it ends the text: no position of the other side has read
        the same); with `add_bos`, a first token that has read nothing (0), so the two sides'
        first positions align and the text's first token is predicted too.
        """
        ids, ends = self._ends(texts)
        eos = self.tokenizer.eos_token_id
        bos = bos_id(self.tokenizer) if add_bos else None
        for r in range(len(ids)):
            if add_eos and eos is not None:
                ids[r], ends[r] = ids[r] + [eos], ends[r] + [-1]
            if bos is not None:
                ids[r], ends[r] = [bos] + ids[r], [0] + ends[r]
            ids[r], ends[r] = ids[r][:max_length], ends[r][:max_length]
        return ids, ends


def check_offsets(tokenizer, who: str = "tokenizer") -> TokenBytes:
    """A tokenizer whose positions cannot be aligned: one line saying which and what to do."""
    return TokenBytes(tokenizer, who)


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
    """Token ids and (start, end) character spans per text (a fast tokenizer), cut like `LMCollator`.

    The appended end-of-sequence token gets the span (-1, -1): it covers no character; with
    `add_bos`, the first token has the empty span (0, 0). Alignment uses `TokenBytes.encode`.
    """
    if not getattr(tokenizer, "is_fast", False):
        raise DistillError(
            f"the tokenizer {_name(tokenizer)!r} gives no character offsets; load its fast version"
        )
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


def _texts(items: Sequence) -> tuple[list[str], list[str]]:
    """The items' texts and their prompts (the start of the text no label covers; "" for none)."""
    out, prompts = [], []
    for it in items:
        prompt = ""
        if isinstance(it, Mapping):
            if "text" not in it:
                raise DistillError(
                    "cross-tokenizer batches are plain texts (or {'text': ...} records); "
                    f"got a record with keys {', '.join(it)}"
                )
            prompt = str(it.get("prompt") or "")
            it = it["text"]
        if prompt and not str(it).startswith(prompt):
            raise DistillError(f"a record's prompt is not the start of its text: {prompt[:40]!r}")
        out.append(str(it))
        prompts.append(prompt)
    return out, prompts


class CrossTokenizerCollator:
    """Texts -> `{input_ids, attention_mask, labels, byte_ends, label_chars, text}` for the student.

    The same batch as `LMCollator` (every token trained, `<eos>` appended, right-padded), plus
    `byte_ends` (B, T) long (the UTF-8 bytes of the text each token has consumed through its
    end; -1 on padding, `<eos>` and tokens that cannot be placed) and the raw texts, which a
    cross-tokenizer teacher re-tokenizes with its own tokenizer. `add_bos` starts every text with
    a bos token (the eos when there is none), so its first token is trained as well; give the
    teacher the same setting. A record `{"text": ..., "prompt": ...}` (the prompt the start of
    the text, e.g. a chat template's rendering before the answer) gets no labels on the tokens
    that end inside its prompt. `label_chars` (B,): the characters the labels cover (+1 for a kept
    `<eos>`), what bits per character divide by.
    """

    def __init__(self, tokenizer, max_length: int = 128, add_eos: bool = True, add_bos: bool = False):
        self.tokens = TokenBytes(tokenizer, "student")
        if tokenizer.pad_token_id is None:
            raise DistillError(
                "the tokenizer has no pad token; set tokenizer.pad_token = tokenizer.eos_token"
            )
        self.tokenizer = tokenizer
        self.max_length = max_length
        self.add_eos = add_eos
        self.add_bos = add_bos

    def __call__(self, items: Sequence) -> dict:
        texts, prompts = _texts(items)
        ids, ends = self.tokens.encode(texts, self.max_length, self.add_eos, self.add_bos)
        labels, chars = [], []
        for text, prompt, row, e in zip(texts, prompts, ids, ends):
            # a record's prompt is read, not learned: tokens that end inside it get no label
            start = len(prompt.encode("utf-8"))
            if not prompt and not self.add_bos and e and e[0] >= 0:
                start = e[0]  # the first token is read, never predicted: its characters are not counted
            lab = [t if not prompt or not 0 <= x <= start else -100 for t, x in zip(row, e)]
            labels.append(lab)
            # the characters the labels cover (for bits per character): the text after the prompt
            # up to the last labelled token, plus one for an <eos> kept within max_length
            last = max((x for x, lb in zip(e, lab) if x >= 0 and lb != -100), default=start)
            covered = text.encode("utf-8")[start:last].decode("utf-8", errors="ignore")
            eos = self.add_eos and len(row) and row[-1] == self.tokenizer.eos_token_id and e[-1] == -1
            chars.append(len(covered) + int(bool(eos)))
        out = pad_batch(ids, labels, self.tokenizer.pad_token_id)
        be = torch.full(out["input_ids"].shape, -1, dtype=torch.long)
        for b, e in enumerate(ends):
            if e:
                be[b, : len(e)] = torch.as_tensor(e, dtype=torch.long)
        out["byte_ends"] = be
        out["label_chars"] = torch.as_tensor(chars, dtype=torch.long)
        out["text"] = texts
        return out


def align_positions(s_ends: Sequence[int], t_ends: Sequence[int], t_len: int) -> tuple[list[int], list[int]]:
    """For one text: the aligned and the fallback teacher position of every student position.

    Args:
        s_ends, t_ends: the text each student / teacher token has consumed through its end, in
            bytes (`text_ends`; -1: unknown). Non-decreasing apart from the -1s.
        t_len: teacher positions that predict a token (a position predicts only if a token follows).

    Returns:
        align[j]: the teacher position i < t_len that has consumed exactly what student position j
        has, else -1. Several positions with one count (tokens consuming nothing, such as bos or
        a lone start marker) are paired from the last one back.
        fallback[j]: the last teacher position i < t_len that has consumed less than student
        position j, when the teacher's text reaches as far as j's, else -1.
    """
    t_at: dict[int, list[int]] = {}
    for i, e in enumerate(t_ends):
        if e >= 0:
            t_at.setdefault(e, []).append(i)
    s_at: dict[int, list[int]] = {}
    for j, e in enumerate(s_ends):
        if e >= 0:
            s_at.setdefault(e, []).append(j)
    align = [-1] * len(s_ends)
    for e, js in s_at.items():
        # Every teacher position takes part in the pairing; those past t_len then predict nothing.
        for j, i in zip(reversed(js), reversed(t_at.get(e, []))):
            if i < t_len:
                align[j] = i
    covered = max((e for e in t_ends if e >= 0), default=-1)
    usable = [(e, i) for i, e in enumerate(t_ends[:t_len]) if e >= 0]
    keys = [e for e, _ in usable]
    fallback = [-1] * len(s_ends)
    for j, e in enumerate(s_ends):
        if 0 <= e <= covered:
            k = bisect.bisect_left(keys, e)  # usable[:k] have consumed less than e
            if k:
                fallback[j] = usable[k - 1][1]
    return align, fallback


def batch_alignment(
    s_ends: Tensor, t_ends: Sequence[Sequence[int]], t_lengths: Sequence[int]
) -> tuple[Tensor, Tensor, Tensor]:
    """(B, Ts) align and fallback teacher positions, and (B, Tt) teacher `valid` (predicts a token).

    Args:
        s_ends: (B, Ts) the student's consumed bytes (the collator's `byte_ends`, -1 where none).
        t_ends: per text, the teacher's; t_lengths: per text, its number of tokens.
    """
    b, ts = s_ends.shape[:2]
    tt = max((len(o) for o in t_ends), default=1) or 1
    align = torch.full((b, ts), -1, dtype=torch.long)
    fallback = torch.full((b, ts), -1, dtype=torch.long)
    valid = torch.zeros((b, tt), dtype=torch.bool)
    s_list = s_ends.tolist()
    for r in range(b):
        n = t_lengths[r]
        valid[r, : max(n - 1, 0)] = True  # the last token predicts nothing inside the text
        a, f = align_positions(s_list[r], list(t_ends[r]), max(n - 1, 0))
        align[r] = torch.as_tensor(a, dtype=torch.long)
        fallback[r] = torch.as_tensor(f, dtype=torch.long)
    return align, fallback, valid


def vocab_strings(tokenizer) -> dict:
    """What `vocab_map` needs from the teacher's side, storable as JSON: token bytes (hex), specials, eos."""
    tokens = tokenizer if isinstance(tokenizer, TokenBytes) else TokenBytes(tokenizer, "teacher")
    tok = tokens.tokenizer
    return {
        "pieces": [None if p is None else p.hex() for p in tokens.pieces],
        "byte_tokens": sorted(tokens.byte_ids),
        "special": {str(i): tok.convert_ids_to_tokens(i) for i in sorted(tok.all_special_ids)},
        "eos": tok.eos_token_id,
        "name": _name(tok),
    }


def _chars(pieces: Sequence[bytes | None]) -> set[str]:
    return {c for p in pieces if p for c in p.decode("utf-8", errors="ignore") if not c.isspace()}


def _emitted(tokens: TokenBytes, piece: bytes, group: list[int]) -> int | None:
    """The id of `group` (tokens of the same bytes) that the tokenizer itself gives for that text."""
    try:
        text = piece.decode("utf-8")
    except UnicodeDecodeError:
        return None
    tries = [text] + ([text[1:]] if text[:1] == " " and len(text) > 1 else [])  # the start marker adds one
    for t in tries:
        ids = tokens.tokenizer(t, add_special_tokens=False)["input_ids"]
        if len(ids) == 1 and ids[0] in group:
            return ids[0]
    return None


def _student_index(tokens: TokenBytes, by_kind: bool) -> dict:
    """Bytes (with `by_kind`: (bytes, is a byte-fallback token)) -> the student id for them; among
    tokens of the same bytes, the one the tokenizer emits for that text."""
    groups: dict = {}
    for i, p in enumerate(tokens.pieces):
        if p:
            groups.setdefault((p, i in tokens.byte_ids) if by_kind else p, []).append(i)
    index = {}
    for key, group in groups.items():
        pick = group[0] if len(group) == 1 else _emitted(tokens, key[0] if by_kind else key, group)
        if pick is None:
            # A byte-fallback token is emitted only for bytes no other token covers.
            pick = min(group, key=lambda i: (i in tokens.byte_ids, i))
        index[key] = pick
    return index


def _prefix_id(tokens: TokenBytes, index: dict[bytes, int], piece: bytes) -> int:
    """The first student token of `piece`'s spelling (as the student tokenizes it), or its longest prefix."""
    try:
        text = piece.decode("utf-8")
        ids = tokens.tokenizer(text, add_special_tokens=False)["input_ids"]
        if ids and b"".join(tokens.pieces[i] or b"\x00" for i in ids) == piece:
            return ids[0]
    except UnicodeDecodeError:
        pass
    for n in range(len(piece) - 1, 0, -1):
        if piece[:n] in index:
            return index[piece[:n]]
    return -1


def vocab_map(teacher, student_tokenizer, mode: str = "exact") -> Tensor:
    """(Vt,) long: the student id for each teacher token id, -1 where there is none.

    Tokens are matched by the bytes of text they stand for, the leading space explicit (`Ġthe`
    and `▁the` are both " the"; `<0x61>` and `a` both "a"). Where several student tokens stand
    for the same bytes, the one the student tokenizer emits for that text is taken, so a
    tokenizer mapped onto itself is the identity on every id it emits.

    Args:
        teacher: the teacher's tokenizer, or its `vocab_strings(...)` (as a store keeps it).
        student_tokenizer: the student's tokenizer.
        mode: "exact": the student token of the same bytes (special tokens by name, `<eos>` to
            `<eos>`); "prefix": additionally, a teacher token that is no student token maps to
            the first student token of its spelling, so all the teacher's mass is carried.
    """
    if mode not in ("exact", "prefix"):
        raise DistillError(f"vocab_map mode '{mode}' is not one of exact, prefix")
    t = teacher if isinstance(teacher, Mapping) else vocab_strings(teacher)
    if "pieces" not in t:
        raise DistillError(
            "the teacher's token table was written by an older distill (token strings, not bytes); "
            "write the cross-tokenizer store again with write_cross_store"
        )
    s = (
        student_tokenizer
        if isinstance(student_tokenizer, TokenBytes)
        else TokenBytes(student_tokenizer, "student")
    )
    t_pieces = [None if h is None else bytes.fromhex(h) for h in t["pieces"]]
    if not _chars(t_pieces) & _chars(s.pieces):
        raise DistillError(
            f"the teacher tokenizer {t.get('name', '')!r} and the student tokenizer {_name(s.tokenizer)!r} "
            "share no characters, so no token or position can be aligned; give both the same text "
            "normalisation (e.g. the same lowercasing) or distil on generated text (sequence-level KD)"
        )
    # The same bytes and the same kind first (a byte-fallback `<0x61>` to `<0x61>`, so a tokenizer
    # maps onto itself id for id), then the same bytes (`Ġthe` to `▁the`, `a` to `a` over `<0x61>`).
    by_kind, index = _student_index(s, True), _student_index(s, False)
    t_bytes = set(t.get("byte_tokens", ()))
    s_special = {
        s.tokenizer.convert_ids_to_tokens(i): i for i in sorted(s.tokenizer.all_special_ids, reverse=True)
    }
    out = torch.full((len(t_pieces),), -1, dtype=torch.long)
    for i, p in enumerate(t_pieces):
        if p is None:
            out[i] = s_special.get(t.get("special", {}).get(str(i)), -1)
        elif (p, i in t_bytes) in by_kind:
            out[i] = by_kind[(p, i in t_bytes)]
        elif p in index:
            out[i] = index[p]
        elif mode == "prefix":
            out[i] = _prefix_id(s, index, p)
    if t.get("eos") is not None and s.tokenizer.eos_token_id is not None:
        out[t["eos"]] = s.tokenizer.eos_token_id
    return out
