"""Collate functions: lists of texts (or prompt/response records) -> Hugging Face dict batches."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch

from distill.errors import DistillError


class SentenceCollator:
    """Texts -> `{input_ids, attention_mask, ..., text}` for encoders and SentenceTransformers.

    The raw texts stay in the batch under `text`, so a cached teacher can look them up.
    """

    def __init__(self, tokenizer, max_length: int = 128, text_field: str = "text"):
        self.tokenizer = tokenizer
        self.max_length = max_length
        self.text_field = text_field

    def __call__(self, items: Sequence) -> dict:
        texts = [it[self.text_field] if isinstance(it, Mapping) else it for it in items]
        enc = self.tokenizer(
            list(texts), padding=True, truncation=True, max_length=self.max_length, return_tensors="pt"
        )
        out = dict(enc)
        out["text"] = list(texts)
        return out


class LMCollator:
    """Texts or `{prompt, response}` records -> `{input_ids, attention_mask, labels}`, right-padded.

    Plain texts are trained on every token (an end-of-sequence token is appended); for
    prompt/response records the prompt's labels are -100, so only the response is learned, and
    `prompt_only=True` gives just the prompts (for generation). Padding is -100 in the labels.
    """

    def __init__(self, tokenizer, max_length: int = 128, add_eos: bool = True, prompt_only: bool = False):
        if tokenizer.pad_token_id is None:
            raise DistillError(
                "the tokenizer has no pad token; set tokenizer.pad_token = tokenizer.eos_token"
            )
        self.tokenizer = tokenizer
        self.max_length = max_length
        self.add_eos = add_eos
        self.prompt_only = prompt_only

    def _ids(self, text: str) -> list[int]:
        return self.tokenizer(text, add_special_tokens=False)["input_ids"]

    def __call__(self, items: Sequence) -> dict:
        eos = self.tokenizer.eos_token_id
        rows, labels = [], []
        for it in items:
            if isinstance(it, Mapping) and "prompt" in it:
                p = self._ids(it["prompt"])
                if self.prompt_only:
                    ids, lab = p, [-100] * len(p)
                else:
                    r = self._ids(it.get("response", "")) + (
                        [eos] if self.add_eos and eos is not None else []
                    )
                    ids, lab = p + r, [-100] * len(p) + r
            else:
                text = it["text"] if isinstance(it, Mapping) else it
                ids = self._ids(text) + (
                    [eos] if self.add_eos and eos is not None and not self.prompt_only else []
                )
                lab = list(ids)
            rows.append(ids[: self.max_length])
            labels.append(lab[: self.max_length])
        return pad_batch(rows, labels, self.tokenizer.pad_token_id)


def pad_batch(rows: Sequence[Sequence[int]], labels: Sequence[Sequence[int]] | None, pad_id: int) -> dict:
    """Right-pads token lists into `{input_ids, attention_mask, labels}` tensors."""
    n = max((len(r) for r in rows), default=0)
    n = max(n, 1)
    ids = torch.full((len(rows), n), pad_id, dtype=torch.long)
    att = torch.zeros((len(rows), n), dtype=torch.long)
    lab = torch.full((len(rows), n), -100, dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, : len(r)] = torch.as_tensor(r, dtype=torch.long)
        att[i, : len(r)] = 1
        if labels is not None:
            lab[i, : len(labels[i])] = torch.as_tensor(labels[i], dtype=torch.long)
    out = {"input_ids": ids, "attention_mask": att}
    if labels is not None:
        out["labels"] = lab
    return out
