"""The cross-tokenizer store resumes an interrupted write, like the same-tokenizer store."""

from __future__ import annotations

import numpy as np
import pytest
import torch

pytest.importorskip("transformers", reason="pip install 'distill[nlp]'")
pytest.importorskip("tokenizers", reason="pip install 'distill[nlp]'")

BASE = [
    "unbelievable things happen to believable people every day.",
    "the cat sat on the mat, and the cat was happy about it.",
    "people believe what they want to believe, most of the time.",
]
TEXTS = [f"{t} number {i}" for i in range(5) for t in BASE]  # 15 distinct texts


class Failing(torch.nn.Module):
    """A teacher that stops (as a killed process would) after `fail_after` forward calls."""

    def __init__(self, model, fail_after=None):
        super().__init__()
        self.model, self.fail_after, self.calls = model, fail_after, 0

    def forward(self, **kw):
        self.calls += 1
        if self.fail_after is not None and self.calls > self.fail_after:
            raise KeyboardInterrupt
        return self.model(**kw)


@pytest.fixture(scope="module")
def tok():
    from distill.data.text import train_tokenizer

    return train_tokenizer(TEXTS, vocab_size=300, kind="bpe")


def _teacher(tok):
    import transformers

    cfg = transformers.GPT2Config(
        vocab_size=len(tok), n_embd=16, n_layer=1, n_head=2, n_positions=64, pad_token_id=tok.pad_token_id
    )
    torch.manual_seed(1)
    return transformers.GPT2LMHeadModel(cfg).eval()


def test_interrupted_cross_store_resumes_from_its_done_shards(tok, tmp_path):
    from distill.nlp.cross import write_cross_store

    kw = {"k": 4, "max_length": 24, "batch_size": 2, "shard_texts": 4, "verbose": False}
    model = _teacher(tok)
    whole = write_cross_store(tmp_path / "whole", model, tok, TEXTS, **kw)

    first = Failing(model, fail_after=5)  # 2 batches per shard: stops inside the third shard
    with pytest.raises(KeyboardInterrupt):
        write_cross_store(tmp_path / "s", first, tok, TEXTS, **kw)
    assert not (tmp_path / "s").exists() and (tmp_path / "s.partial" / "progress.json").is_file()

    second = Failing(model)
    man = write_cross_store(tmp_path / "s", second, tok, TEXTS, **kw)
    assert second.calls == 4  # shards 2 and 3 (of 0..3): 2 batches each; 0 and 1 were kept
    assert not (tmp_path / "s.partial").exists()
    assert sorted(p.name for p in (tmp_path / "s").iterdir()) == sorted(
        p.name for p in (tmp_path / "whole").iterdir()
    )
    for f in ("probs", "ids", "tail", "ends", "starts", "keys"):
        np.testing.assert_array_equal(
            np.load(tmp_path / "s" / f"{f}.npy"), np.load(tmp_path / "whole" / f"{f}.npy")
        )
    assert man["tokens"] == whole["tokens"] and man["bytes"] == whole["bytes"]


def test_a_partial_write_for_other_texts_starts_again(tok, tmp_path):
    from distill.nlp.cross import write_cross_store

    kw = {"k": 4, "max_length": 24, "batch_size": 2, "shard_texts": 4, "verbose": False}
    model = _teacher(tok)
    with pytest.raises(KeyboardInterrupt):
        write_cross_store(tmp_path / "s", Failing(model, fail_after=3), tok, TEXTS, **kw)
    other = Failing(model)
    write_cross_store(tmp_path / "s", other, tok, TEXTS[:9], **kw)
    assert other.calls == 5  # 9 texts: shards of 4, 4, 1 -> 2 + 2 + 1 batches, none reused


def test_a_second_writer_of_one_cross_store_is_refused_in_one_line(tok, tmp_path):
    from distill.errors import DistillError
    from distill.nlp.cross import write_cross_store
    from distill.teachers.store import store_lock

    refused = pytest.raises(DistillError, match="another process is writing the teacher store")
    with store_lock(tmp_path / "s"), refused as e:  # another process holds the store
        write_cross_store(tmp_path / "s", _teacher(tok), tok, TEXTS[:3], k=4, verbose=False)
    assert "\n" not in str(e.value) and not (tmp_path / "s.partial").exists()
    write_cross_store(tmp_path / "s", _teacher(tok), tok, TEXTS[:3], k=4, verbose=False)  # free again
    assert (tmp_path / "s" / "manifest.json").is_file()
