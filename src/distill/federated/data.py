"""Splitting a dataset across clients (IID or Dirichlet non-IID) plus an unlabeled public set."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch.utils.data import Dataset, Subset

from distill.data.bundle import DataBundle
from distill.errors import DistillError


def labels_of(ds: Dataset) -> np.ndarray:
    """Integer class labels of a map-style dataset (read from `.y`/`.targets` when present)."""
    for attr in ("y", "targets", "labels"):
        y = getattr(ds, attr, None)
        if y is not None:
            return np.asarray(y.tolist() if isinstance(y, torch.Tensor) else y, dtype=np.int64)
    out = []
    for i in range(len(ds)):
        item = ds[i]
        if not isinstance(item, tuple | list) or len(item) < 2:
            raise DistillError(
                "federated splits need labelled (input, label) samples to deal classes to clients; "
                f"sample {i} is a {type(item).__name__}"
            )
        out.append(int(item[1]))
    return np.asarray(out, dtype=np.int64)


def iid_split(n: int, clients: int, rng: np.random.Generator) -> list[np.ndarray]:
    """Equal random shares of `range(n)`."""
    return [np.sort(p) for p in np.array_split(rng.permutation(n), clients)]


def dirichlet_split(
    labels: np.ndarray, clients: int, alpha: float, rng: np.random.Generator, min_size: int = 10
) -> list[np.ndarray]:
    """Per class, shares of its samples drawn from Dirichlet(alpha · 1) over clients.

    Redraws (up to 1,000 times) until every client holds at least `min_size` samples.
    """
    if min_size * clients > len(labels):
        raise DistillError(
            f"partition.min_size {min_size} x {clients} clients exceeds the {len(labels)} samples "
            "left for clients: lower min_size or the number of clients"
        )
    for _ in range(1000):
        parts: list[list[int]] = [[] for _ in range(clients)]
        for c in np.unique(labels):
            idx = rng.permutation(np.flatnonzero(labels == c))
            shares = rng.dirichlet(np.full(clients, alpha))
            cuts = (np.cumsum(shares)[:-1] * len(idx)).astype(int)
            for k, chunk in enumerate(np.split(idx, cuts)):
                parts[k].extend(chunk.tolist())
        if min(len(p) for p in parts) >= min_size:
            return [np.sort(np.asarray(p, dtype=np.int64)) for p in parts]
    raise DistillError(
        f"could not draw a Dirichlet(alpha={alpha}) split giving every client {min_size} samples; "
        "raise partition.alpha or lower partition.min_size"
    )


class InputsOnly(Dataset):
    """The inputs of a labelled dataset, labels dropped: the unlabeled public set."""

    def __init__(self, ds: Dataset):
        self.ds = ds

    def __len__(self) -> int:
        return len(self.ds)

    def __getitem__(self, i: int):
        item = self.ds[i]
        return item[0] if isinstance(item, tuple | list) else item


@dataclass
class FederatedSplit:
    """Client shares of the training split, the public set and the shared evaluation split."""

    clients: list[Dataset]
    public: Dataset
    test: Dataset
    class_counts: list[list[int]]  # (clients, classes): how skewed the split is

    def describe(self) -> dict:
        return {
            "client_sizes": [len(c) for c in self.clients],
            "public": len(self.public),
            "test": len(self.test),
            "class_counts": self.class_counts,
        }


def split_for_clients(
    data: DataBundle,
    clients: int,
    scheme: str = "dirichlet",
    alpha: float = 0.5,
    public_fraction: float = 0.2,
    min_size: int = 10,
    seed: int = 0,
) -> FederatedSplit:
    """Holds out `public_fraction` of `data.train` (stratified) as unlabeled public data and deals
    the rest to `clients`. Accuracy is measured on `data.test` (or `data.val`)."""
    rng = np.random.default_rng(seed)
    labels = labels_of(data.train)
    n = len(labels)
    public_idx: list[int] = []
    for c in np.unique(labels):  # stratified hold-out, so the public set covers every class
        idx = rng.permutation(np.flatnonzero(labels == c))
        public_idx.extend(idx[: int(round(len(idx) * public_fraction))].tolist())
    public_mask = np.zeros(n, dtype=bool)
    public_mask[public_idx] = True
    rest = np.flatnonzero(~public_mask)
    if scheme == "iid":
        parts = [rest[p] for p in iid_split(len(rest), clients, rng)]
    elif scheme == "dirichlet":
        parts = [rest[p] for p in dirichlet_split(labels[rest], clients, alpha, rng, min_size)]
    else:
        raise DistillError(f"partition.scheme: '{scheme}' is not one of iid, dirichlet")
    num_classes = data.num_classes or int(labels.max()) + 1
    counts = [np.bincount(labels[p], minlength=num_classes).tolist() for p in parts]
    test = data.test if data.test is not None else data.val
    if test is None:
        raise DistillError("federated runs need a test or val split to measure accuracy on")
    return FederatedSplit(
        clients=[Subset(data.train, p.tolist()) for p in parts],
        public=InputsOnly(Subset(data.train, sorted(public_idx))),
        test=test,
        class_counts=counts,
    )
