"""The two small data contracts everything else speaks: `Batch` in, `Outputs` out."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from distill.errors import DistillError

_INPUT_KEYS = ("inputs", "input", "x", "image", "images", "pixel_values")
_TARGET_KEYS = ("targets", "target", "labels", "label", "y")
_INDEX_KEYS = ("index", "indices", "idx", "sample_index")


@dataclass
class Batch:
    """One batch as the library sees it, whatever shape the data loader gave.

    Attributes:
        inputs: what the model is called with: a tensor, or a mapping of tensors for models
            called with keyword arguments (Hugging Face `input_ids`, `attention_mask`, ...).
        targets: ground-truth labels, or None for unlabeled data.
        index: the dataset index of each sample (LongTensor of shape (B,)), or None. Contrastive
            methods and the teacher cache need it; wrap a dataset in `IndexedDataset` to get it.
        raw: the batch exactly as the loader yielded it, for adapters that need more.
        weights: optional per-sample loss weights (B,), set by weighting rules, not by loaders.
        soft_targets: (B, C) label distributions, set by the trainer when it mixes a batch
            (`trainer.mix`); `targets` is then None. A row sums to the share of the sample that
            carries a label: 1 for a mix of labelled samples, less when an unlabelled (transfer)
            sample is mixed in, 0 for no label at all. Label terms that understand it (`ce`) weigh
            each row by that mass; terms that need class indices refuse the mixed batch.
    """

    inputs: Any
    targets: Tensor | None = None
    index: Tensor | None = None
    raw: Any = None
    weights: Tensor | None = None
    soft_targets: Tensor | None = None

    @property
    def size(self) -> int:
        x = self.inputs
        if isinstance(x, Tensor):
            return x.shape[0]
        if isinstance(x, Mapping):
            for v in x.values():
                if isinstance(v, Tensor):
                    return v.shape[0]
        if isinstance(x, Sequence):
            return len(x)
        raise DistillError(f"cannot tell the batch size of inputs of type {type(x).__name__}")

    def host(self, name: str) -> Tensor | None:
        """The host (CPU) copy of the tensor field `name` (`index`, `targets`) without a device
        sync: the field itself when on the CPU, else the data loader's copy in `raw` when it has
        the same shape; None when there is none (then reading the values means a sync)."""
        t = getattr(self, name)
        if not isinstance(t, Tensor):
            return None
        if t.device.type == "cpu":
            return t
        if self.raw is None:
            return None
        try:
            h = getattr(as_batch(self.raw), name)
        except DistillError:
            return None
        return h if isinstance(h, Tensor) and h.device.type == "cpu" and h.shape == t.shape else None

    def to(self, device: torch.device | str, non_blocking: bool = False) -> Batch:
        return Batch(
            inputs=_to(self.inputs, device, non_blocking),
            targets=_to(self.targets, device, non_blocking),
            index=_to(self.index, device, non_blocking),
            raw=self.raw,
            weights=_to(self.weights, device, non_blocking),
            soft_targets=_to(self.soft_targets, device, non_blocking),
        )


def _to(x: Any, device, non_blocking: bool) -> Any:
    if isinstance(x, Tensor):
        return x.to(device, non_blocking=non_blocking)
    if isinstance(x, Mapping):
        return {k: _to(v, device, non_blocking) for k, v in x.items()}
    if isinstance(x, list | tuple) and x and isinstance(x[0], Tensor):
        return type(x)(_to(v, device, non_blocking) for v in x)
    return x


def map_tensors(x: Any, fn) -> Any:
    if isinstance(x, Tensor):
        return fn(x)
    if isinstance(x, tuple | list):
        return type(x)(map_tensors(v, fn) for v in x)
    if isinstance(x, dict):
        return {k: map_tensors(v, fn) for k, v in x.items()}
    return x


def as_batch(raw: Any) -> Batch:
    """Reads the batch contract from what a data loader yields.

    Accepted: a `Batch`; `(inputs, targets)`; `(inputs, targets, index)`; a bare tensor
    (unlabeled); or a mapping. In a mapping the index is read from `index`/`idx`, the targets
    from `targets`/`labels`/`label`/`y`, label distributions from `soft_targets` (a dataset that
    mixes its own samples, `distill.engine.mix.MixedViews`), and the inputs from
    `inputs`/`input`/`x`/`image`; when
    none of the input keys is present, every remaining key is an input (the Hugging Face form,
    `{"input_ids", "attention_mask", "labels"}`).
    """
    if isinstance(raw, Batch):
        return raw
    if isinstance(raw, Tensor):
        return Batch(inputs=raw, raw=raw)
    if isinstance(raw, Mapping):
        rest = dict(raw)
        index = _pop_first(rest, _INDEX_KEYS)
        targets = _pop_first(rest, _TARGET_KEYS)
        soft = rest.pop("soft_targets", None)
        inputs = _pop_first(rest, _INPUT_KEYS)
        if inputs is None:
            inputs = rest
        return Batch(inputs=inputs, targets=targets, index=index, raw=raw, soft_targets=soft)
    if isinstance(raw, list | tuple):
        if len(raw) == 2:
            return Batch(inputs=raw[0], targets=raw[1], raw=raw)
        if len(raw) == 3:
            return Batch(inputs=raw[0], targets=raw[1], index=raw[2], raw=raw)
        if len(raw) == 1:
            return Batch(inputs=raw[0], raw=raw)
    raise DistillError(
        f"a batch of type {type(raw).__name__} (length {len(raw) if hasattr(raw, '__len__') else '?'}) "
        "is not understood: yield (inputs, targets), (inputs, targets, index) or a dict with "
        "'inputs'/'labels'/'index' keys, or pass an adapter that reads it"
    )


def _pop_first(d: dict, keys: Sequence[str]) -> Any:
    for k in keys:
        if k in d:
            return d.pop(k)
    return None


@dataclass
class Outputs:
    """What a model produced on a batch, in one shape for student and teacher alike.

    Attributes:
        logits: (B, C) for classification, (B, T, V) for language models, or None.
        features: tapped intermediate activations by module path (see `FeatureTap`).
        extras: anything else a loss may need: embeddings, attentions, hidden states,
            detection head outputs, the model's own loss.
    """

    logits: Tensor | None = None
    features: dict[str, Tensor] = field(default_factory=dict)
    extras: dict[str, Any] = field(default_factory=dict)

    def map(self, fn) -> Outputs:
        """Applies `fn` to every tensor, also inside tuples, lists and dicts in `extras`."""
        return Outputs(
            logits=map_tensors(self.logits, fn),
            features={k: map_tensors(v, fn) for k, v in self.features.items()},
            extras={k: map_tensors(v, fn) for k, v in self.extras.items()},
        )

    def detach(self) -> Outputs:
        return self.map(lambda t: t.detach())

    def clone(self) -> Outputs:
        """A copy whose tensors are ordinary tensors (usable in autograd), even when these were
        made under `torch.inference_mode()`."""
        return self.map(lambda t: t.clone())

    def feature(self, path: str, who: str = "model") -> Tensor:
        """The feature tapped at `path`, or a one-line error naming what was tapped."""
        if path not in self.features:
            have = ", ".join(sorted(self.features)) or "none"
            raise DistillError(
                f"the {who} has no tapped feature '{path}' (tapped: {have}); add it to the {who}'s taps"
            )
        return self.features[path]

    def require_logits(self, who: str = "model") -> Tensor:
        if self.logits is None:
            raise DistillError(f"the {who} produced no logits; this loss term needs them")
        return self.logits
