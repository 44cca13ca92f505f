"""Token-level distillation (fkl, jsd, ...) compares distributions over token ids, so teacher and
student must share one tokenizer; two vocabularies of the same size but different orders give
silent garbage. When they differ, the check says so and names the terms that handle it:
`aligned_kd` (character-aligned positions, probabilities mapped onto the student's vocabulary)
or `uld` (sorted probabilities), with a teacher from `distill.nlp.cross`.
"""

from __future__ import annotations

from distill.errors import DistillError

CROSS_HINT = (
    "use the aligned_kd term (or uld) with distill.nlp.CrossTokenizerTeacher and "
    "CrossTokenizerCollator, which distil across tokenizers (docs/nlp.md)"
)

_SPECIAL = ("pad_token_id", "eos_token_id", "bos_token_id", "unk_token_id")


def _vocab_list(tok) -> list[str | None]:
    vocab = tok.get_vocab()
    size = max(len(tok), max(vocab.values(), default=-1) + 1)
    out: list[str | None] = [None] * size
    for token, i in vocab.items():
        out[i] = token
    return out


def check_same_vocab(teacher_tokenizer, student_tokenizer, check_special: bool = True) -> None:
    """Raises a `DistillError` naming the first token id where the tokenizers differ.

    Compares the full id -> token tables (added tokens included) and, with `check_special`,
    the pad / eos / bos / unk ids.
    """
    t, s = _vocab_list(teacher_tokenizer), _vocab_list(student_tokenizer)
    for i in range(min(len(t), len(s))):
        if t[i] != s[i]:
            raise DistillError(
                f"teacher and student tokenizers differ at token id {i}: teacher {t[i]!r}, student {s[i]!r} "
                f"(vocabularies of {len(t)} and {len(s)}); token-level distillation needs the same "
                f"tokenizer - {CROSS_HINT}, or use the teacher's tokenizer for the student"
            )
    if len(t) != len(s):
        longer, name = (t, "teacher") if len(t) > len(s) else (s, "student")
        i = min(len(t), len(s))
        raise DistillError(
            f"the {name} tokenizer has {len(longer) - i} extra tokens from id {i} ({longer[i]!r}, ...): "
            f"vocabularies of {len(t)} and {len(s)} entries; if the extra ids are padding, resize; otherwise {CROSS_HINT}"
        )
    if check_special:
        for attr in _SPECIAL:
            a, b = getattr(teacher_tokenizer, attr, None), getattr(student_tokenizer, attr, None)
            if a != b:
                raise DistillError(
                    f"teacher and student tokenizers share a vocabulary but differ in {attr} ({a} vs {b}); "
                    "set the same special tokens on both"
                )


def check_model_vocab(model, tokenizer, who: str = "model") -> None:
    """The model's output size must cover the tokenizer (a larger, padded embedding is fine)."""
    n = getattr(getattr(model, "config", None), "vocab_size", None)
    if n is not None and n < len(tokenizer):
        raise DistillError(
            f"the {who} has {n} output tokens but its tokenizer has {len(tokenizer)}; "
            "call model.resize_token_embeddings(len(tokenizer))"
        )
