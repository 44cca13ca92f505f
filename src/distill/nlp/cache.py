"""Teacher sentence embeddings computed once and served from memory (and an .npz file).

Embedding distillation runs the teacher on the same texts every epoch; its outputs never change,
so they are computed once, keyed by a fingerprint of each text, and read back. The file is a
plain `.npz` (numpy arrays only, loaded with `allow_pickle=False`) holding the text hashes, the
vectors and a fingerprint of the teacher's weights; a file written by another teacher is refused.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

import numpy as np
import torch
from torch import Tensor, nn

from distill.checkpoint import atomic_write
from distill.errors import DistillError
from distill.outputs import Batch, Outputs


def text_key(text: str) -> str:
    return hashlib.sha1(text.encode("utf-8")).hexdigest()


def model_fingerprint(model: nn.Module) -> str:
    """A hash of a model's parameter names, shapes and values (changes when any weight does)."""
    h = hashlib.sha1()
    for name, t in model.state_dict().items():
        h.update(name.encode())
        h.update(str(tuple(t.shape)).encode())
        h.update(t.detach().to("cpu").contiguous().view(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


class EmbeddingCache:
    """text -> teacher embedding, filled once by `build`, saved / loaded as .npz.

    Args:
        teacher_fingerprint: identifies the teacher (see `model_fingerprint`); stored in the file
            and checked on load.
    """

    def __init__(self, teacher_fingerprint: str = ""):
        self.teacher_fingerprint = teacher_fingerprint
        self._index: dict[str, int] = {}
        self._chunks: list[Tensor] = []
        self._matrix: Tensor | None = None

    def __len__(self) -> int:
        return len(self._index)

    def __contains__(self, text: str) -> bool:
        return text_key(text) in self._index

    @property
    def matrix(self) -> Tensor:
        if self._matrix is None or self._matrix.shape[0] != len(self._index):
            self._matrix = torch.cat(self._chunks) if self._chunks else torch.zeros(0, 0)
            self._chunks = [self._matrix]
        return self._matrix

    def add(self, texts: Sequence[str], vectors: Tensor) -> None:
        if len(texts) != vectors.shape[0]:
            raise DistillError(f"{len(texts)} texts but {vectors.shape[0]} vectors")
        vectors = vectors.detach().float().cpu()
        keep = []
        for i, text in enumerate(texts):
            k = text_key(text)
            if k not in self._index:
                self._index[k] = len(self._index)
                keep.append(i)
        if keep:
            self._chunks.append(vectors[keep])
            self._matrix = None

    def build(
        self, texts: Sequence[str], encode: Callable[[list[str]], Tensor], batch_size: int = 128
    ) -> int:
        """Encodes the texts not yet cached, `batch_size` at a time; returns how many were new."""
        todo = list(dict.fromkeys(t for t in texts if t not in self))
        for i in range(0, len(todo), batch_size):
            part = todo[i : i + batch_size]
            self.add(part, encode(part))
        return len(todo)

    def lookup(self, texts: Sequence[str]) -> Tensor:
        """(B, D) embeddings for the texts, all of which must be cached."""
        rows = []
        for text in texts:
            k = text_key(text)
            if k not in self._index:
                raise DistillError(
                    f"text not in the teacher embedding cache: {text[:60]!r}; build the cache over all "
                    "training texts first (EmbeddingCache.build)"
                )
            rows.append(self._index[k])
        return self.matrix[torch.as_tensor(rows, dtype=torch.long)]

    def save(self, path: str | os.PathLike) -> None:
        keys = np.array(list(self._index), dtype="<U40")
        vectors = self.matrix.numpy().astype(np.float32)

        def write(tmp):
            with open(tmp, "wb") as f:
                np.savez(f, keys=keys, vectors=vectors, teacher=np.array(self.teacher_fingerprint))

        atomic_write(path, write)

    @classmethod
    def load(cls, path: str | os.PathLike, teacher_fingerprint: str | None = None) -> EmbeddingCache:
        path = Path(path)
        if not path.is_file():
            raise DistillError(f"embedding cache {path} does not exist; build it with EmbeddingCache.build")
        try:
            with np.load(path, allow_pickle=False) as z:
                keys, vectors, teacher = z["keys"], z["vectors"], str(z["teacher"])
        except (ValueError, KeyError, OSError) as e:
            raise DistillError(f"{path} is not an embedding cache written by distill ({e})") from e
        if teacher_fingerprint is not None and teacher != teacher_fingerprint:
            raise DistillError(
                f"embedding cache {path} was written by another teacher (fingerprint {teacher[:12]} vs "
                f"{teacher_fingerprint[:12]}); delete it or rebuild it for this teacher"
            )
        cache = cls(teacher)
        cache._index = {str(k): i for i, k in enumerate(keys)}
        cache._chunks = [torch.from_numpy(vectors)]
        return cache


class CachedEmbeddingTeacher:
    """A teacher that serves cached sentence embeddings: `__call__(batch) -> Outputs`.

    The batch must carry its raw texts under `text` (in the inputs mapping or the raw batch), as
    `distill.nlp.SentenceCollator` does.
    """

    def __init__(self, cache: EmbeddingCache, text_key: str = "text"):
        self.cache = cache
        self.text_key = text_key

    def __call__(self, batch: Batch) -> Outputs:
        texts = None
        for src in (batch.inputs, batch.raw):
            if isinstance(src, Mapping) and self.text_key in src:
                texts = src[self.text_key]
                break
        if texts is None:
            raise DistillError(
                f"the batch has no '{self.text_key}' entry with the raw texts the embedding cache is keyed by; "
                "keep the texts in the batch (distill.nlp.SentenceCollator does)"
            )
        emb = self.cache.lookup(list(texts))
        device = _device_of(batch)
        return Outputs(logits=None, extras={"embeddings": emb.to(device)})


def _device_of(batch: Batch):
    if isinstance(batch.inputs, Mapping):
        for v in batch.inputs.values():
            if isinstance(v, Tensor):
                return v.device
    return torch.device("cpu")
