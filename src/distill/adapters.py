"""How to call a model on a batch and read its `Outputs`.

An adapter is any callable `(model, batch) -> Outputs`. `auto_adapter` covers plain modules
called on a tensor and Hugging Face style modules called with keyword arguments; pass your own
for anything else (a detector that takes targets, a model that returns a custom object).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

from torch import Tensor, nn

from distill.errors import DistillError
from distill.outputs import Batch, Outputs
from distill.registry import ADAPTERS

Adapter = Callable[[nn.Module, Batch], Outputs]

_EXTRA_FIELDS = (
    "hidden_states",
    "attentions",
    "last_hidden_state",
    "pooler_output",
    "loss",
    "sentence_embedding",
    "token_embeddings",
    "embeddings",
)


def call_model(model: nn.Module, inputs: Any) -> Any:
    """Calls `model` the way its inputs ask: keyword arguments for a mapping, else positionally."""
    if isinstance(inputs, Mapping):
        return model(**inputs)
    return model(inputs)


def read_outputs(out: Any) -> Outputs:
    """Turns whatever a model returned into `Outputs`.

    A tensor is the logits; an object or mapping with `logits` gives the logits plus the
    known extra fields (hidden states, attentions, embeddings, the model's own loss); a tuple's
    first tensor is the logits and the rest are kept in `extras["rest"]`.
    """
    if isinstance(out, Outputs):
        return out
    if isinstance(out, Tensor):
        return Outputs(logits=out)
    if isinstance(out, Mapping) or hasattr(out, "logits"):
        get = out.get if isinstance(out, Mapping) else lambda k: getattr(out, k, None)
        extras = {k: v for k in _EXTRA_FIELDS if (v := get(k)) is not None}
        return Outputs(logits=get("logits"), extras=extras)
    if isinstance(out, tuple | list) and out and isinstance(out[0], Tensor):
        return Outputs(logits=out[0], extras={"rest": tuple(out[1:])})
    raise DistillError(
        f"cannot read a model output of type {type(out).__name__}: return a tensor of logits, "
        "an object with .logits, or pass an adapter that builds distill.Outputs"
    )


def own_adapter(model: nn.Module) -> Adapter | None:
    """The adapter a model carries as its `distill_adapter` attribute (set by builders that know
    how their model is called, such as the `hf` builder), looking through DDP / compile wrappers."""
    for m in (model, getattr(model, "module", None), getattr(model, "_orig_mod", None)):
        own = getattr(m, "distill_adapter", None) if m is not None else None
        if own is not None:
            return own
    return None


def auto_adapter(model: nn.Module, batch: Batch) -> Outputs:
    """The default adapter: the model's own (`distill_adapter`) when it has one, else
    `model(inputs)` or `model(**inputs)`, output read by `read_outputs`."""
    own = own_adapter(model)
    if own is not None:
        return own(model, batch)
    return read_outputs(call_model(model, batch.inputs))


ADAPTERS.register("auto")(lambda: auto_adapter)
ADAPTERS.accept(
    methods=("__call__",), what="an adapter (a class whose instances are called as adapter(model, batch))"
)
# Hugging Face adapters live in distill.nlp (it needs transformers); registered by import path so
# this module never imports it.
ADAPTERS.add_lazy("hf", "distill.nlp.adapters.hf_adapter")
ADAPTERS.add_lazy("sentence", "distill.nlp.adapters.sentence")


def teaching_adapter(adapter: Adapter) -> Adapter:
    """The adapter a frozen teacher uses when its outputs only feed loss terms: the adapter's
    `for_teaching()` when it defines one, else the adapter itself. A detector's adapter drops its
    post-processing there (score threshold, NMS): no term reads a teacher's final boxes, so
    running NMS on every step would be work thrown away (caching the boxes per input would be
    work kept for nothing, and wrong under random augmentation). Measuring the teacher (its mAP)
    keeps the full adapter."""
    make = getattr(adapter, "for_teaching", None)
    return make() if callable(make) else adapter
