"""A generated token stand-in and a tiny transformer built from a config (no hub, no download), so
the transformer compression recipe runs and is tested offline. Users swap in their data."""

from __future__ import annotations

import torch
from torch import Tensor, nn
from torch.utils.data import Dataset

from distill.data.bundle import DataBundle
from distill.errors import DistillError


class _TokenSplit(Dataset):
    def __init__(self, ids: Tensor, mask: Tensor, y: Tensor):
        self.ids, self.mask, self.y = ids, mask, y

    def __len__(self) -> int:
        return len(self.y)

    def __getitem__(self, i: int):
        return {"input_ids": self.ids[i], "attention_mask": self.mask[i], "labels": self.y[i]}


def token_standin(
    num_classes: int = 4,
    vocab_size: int = 512,
    seq_len: int = 32,
    train: int = 1024,
    val: int = 256,
    test: int = 256,
    seed: int = 0,
) -> DataBundle:
    """Token sequences whose class is the majority among class-marker tokens hidden in random text
    (variable lengths, right padding with id 0 and an attention mask). Hugging Face dict batches."""
    if vocab_size < 10 * num_classes or seq_len < 8:
        raise DistillError("token_standin: need vocab_size >= 10 * num_classes and seq_len >= 8")
    markers = torch.arange(1, 1 + 4 * num_classes).reshape(num_classes, 4)  # 4 marker ids per class

    def split(n: int, s: int) -> _TokenSplit:
        g = torch.Generator().manual_seed(s)
        ids = torch.randint(1 + 4 * num_classes, vocab_size, (n, seq_len), generator=g)
        y = torch.randint(0, num_classes, (n,), generator=g)
        lengths = torch.randint(seq_len // 2, seq_len + 1, (n,), generator=g)
        for i in range(n):
            pos = torch.randperm(int(lengths[i]), generator=g)[:4]
            ids[i, pos[:3]] = markers[y[i], torch.randint(0, 4, (3,), generator=g)]
            ids[i, pos[3]] = markers[torch.randint(0, num_classes, (1,), generator=g), 0]  # a distractor
        mask = (torch.arange(seq_len)[None] < lengths[:, None]).long()
        return _TokenSplit(ids * mask, mask, y)

    return DataBundle(
        train=split(train, 11),
        val=split(val, 12),
        test=split(test, 13),
        num_classes=num_classes,
        meta={"source": "generated token stand-in", "vocab_size": vocab_size},
    )


def tiny_bert(
    num_classes: int = 2,
    vocab_size: int = 512,
    hidden_size: int = 64,
    layers: int = 2,
    heads: int = 2,
    intermediate_size: int = 256,
    max_position: int = 64,
) -> nn.Module:
    """A BERT sequence classifier built from a config with random weights (transformers; nothing
    downloaded). Eager attention, so it exports to ONNX with the TorchScript exporter."""
    from transformers import BertConfig, BertForSequenceClassification

    cfg = BertConfig(
        vocab_size=vocab_size,
        hidden_size=hidden_size,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        intermediate_size=intermediate_size,
        max_position_embeddings=max_position,
        num_labels=num_classes,
        hidden_dropout_prob=0.1,
        attention_probs_dropout_prob=0.1,
        attn_implementation="eager",
    )
    return BertForSequenceClassification(cfg)
