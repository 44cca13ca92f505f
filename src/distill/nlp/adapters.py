"""Adapters for Hugging Face models and SentenceTransformers: dict batches -> `Outputs`.

Hugging Face models take keyword arguments and return an output object; these adapters call
them with the batch's tensor entries only (a batch may also carry raw texts, ids, ...) and put
hidden states, attentions and sentence embeddings into `Outputs.extras` under fixed names:

- `extras["hidden_states"]`: tuple of (B, T, H), index 0 = embeddings, i = after block i.
- `extras["attentions"]`: tuple of (B, heads, T, T) attention probabilities, one per block.
- `extras["attention_mask"]`: (B, T), so token-level terms can ignore padding.
- `extras["layer_origin"]`: for a student cut from its teacher (`config.distill_layers`), the
  teacher block each of its blocks came from; `hidden_mse`/`hidden_cos` with `layer_map: cut` read it.
- `extras["embeddings"]`: (B, D) sentence embeddings (SentenceTransformer).
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import Tensor, nn

from distill.adapters import Adapter, read_outputs
from distill.errors import DistillError
from distill.outputs import Batch, Outputs

_NOT_MODEL_ARGS = (
    "labels",
    "label",
    "text",
    "texts",
    "index",
    "idx",
    "offset_mapping",
    "byte_ends",
    "label_chars",
)


def _tensor_inputs(batch: Batch) -> dict[str, Tensor]:
    if not isinstance(batch.inputs, Mapping):
        raise DistillError(
            f"a Hugging Face adapter needs dict inputs (input_ids, attention_mask, ...), got "
            f"{type(batch.inputs).__name__}; tokenize the batch in the collate function"
        )
    return {k: v for k, v in batch.inputs.items() if isinstance(v, Tensor) and k not in _NOT_MODEL_ARGS}


def ensure_eager_attention(model: nn.Module) -> None:
    """Attention probabilities are only returned by the eager implementation (SDPA and flash
    attention never materialise them); switch to it once, in place."""
    cfg = getattr(model, "config", None)
    if cfg is not None and getattr(cfg, "_attn_implementation", "eager") != "eager":
        if not hasattr(model, "set_attn_implementation"):
            raise DistillError(
                f"{type(model).__name__} uses {cfg._attn_implementation} attention, which returns no "
                "attention maps; load it with attn_implementation='eager'"
            )
        model.set_attn_implementation("eager")


class HFAdapter:
    """Calls a Hugging Face model on a dict batch and reads `Outputs`.

    Args:
        hidden_states: ask for all hidden states (`output_hidden_states=True`).
        attentions: ask for attention maps (`output_attentions=True`; switches the model to
            eager attention, since fused kernels do not produce them).
    """

    def __init__(self, hidden_states: bool = False, attentions: bool = False):
        self.hidden_states = hidden_states
        self.attentions = attentions
        self._checked: set[int] = set()

    def __call__(self, model: nn.Module, batch: Batch) -> Outputs:
        inputs = _tensor_inputs(batch)
        kwargs = {}
        if self.hidden_states:
            kwargs["output_hidden_states"] = True
        if self.attentions:
            if id(model) not in self._checked:
                ensure_eager_attention(getattr(model, "module", model))
                self._checked.add(id(model))
            kwargs["output_attentions"] = True
        out = read_outputs(model(**inputs, **kwargs))
        if self.attentions and not out.extras.get("attentions"):
            raise DistillError(
                f"{type(model).__name__} returned no attention maps; load it with attn_implementation='eager'"
            )
        for key in ("hidden_states", "attentions"):
            if key in out.extras and not out.extras[key]:
                del out.extras[key]
        if "attention_mask" in inputs:
            out.extras["attention_mask"] = inputs["attention_mask"]
        origin = getattr(getattr(getattr(model, "module", model), "config", None), "distill_layers", None)
        if self.hidden_states and origin:  # a student cut from its teacher: where each block came from
            out.extras["layer_origin"] = tuple(int(i) for i in origin)
        return out


def hf_adapter(hidden_states: bool = False, attentions: bool = False) -> HFAdapter:
    """An adapter for Hugging Face models; see `HFAdapter`."""
    return HFAdapter(hidden_states=hidden_states, attentions=attentions)


def sentence_adapter(model: nn.Module, batch: Batch) -> Outputs:
    """A SentenceTransformer (or any module returning `sentence_embedding`) on a tokenized batch.

    The batch's inputs are the features the SentenceTransformer's own `tokenize` returns
    (`input_ids`, `attention_mask`, ...). Token embeddings are kept as `extras["token_embeddings"]`.
    """
    inputs = _tensor_inputs(batch)
    out = model(dict(inputs))
    if not isinstance(out, Mapping) or "sentence_embedding" not in out:
        raise DistillError(
            f"{type(model).__name__} returned no 'sentence_embedding'; use a SentenceTransformer or "
            "an adapter that returns distill.Outputs(extras={'embeddings': ...})"
        )
    extras = {"embeddings": out["sentence_embedding"]}
    if "token_embeddings" in out:
        extras["token_embeddings"] = out["token_embeddings"]
    if "attention_mask" in inputs:
        extras["attention_mask"] = inputs["attention_mask"]
    return Outputs(logits=None, extras=extras)


def sentence() -> Adapter:
    """The registered `sentence` adapter builder (recipes: `adapter: {name: sentence}`)."""
    return sentence_adapter


def mean_pool(token_embeddings: Tensor, attention_mask: Tensor | None) -> Tensor:
    """Mean over non-padding tokens: (B, T, H), (B, T) -> (B, H)."""
    if attention_mask is None:
        return token_embeddings.mean(1)
    m = attention_mask.to(token_embeddings.dtype).unsqueeze(-1)
    return (token_embeddings * m).sum(1) / m.sum(1).clamp_min(1e-9)


@torch.no_grad()
def encode(
    model: nn.Module,
    tokenizer,
    texts: list[str],
    batch_size: int = 64,
    max_length: int = 128,
    device: str | torch.device = "cpu",
    normalize: bool = True,
) -> Tensor:
    """Sentence embeddings from a SentenceTransformer (its own `encode`) or a plain encoder
    (mean pooling over the last hidden state), as one (N, D) float32 tensor on the CPU."""
    if hasattr(model, "encode") and tokenizer is None:
        emb = model.encode(
            texts,
            batch_size=batch_size,
            convert_to_tensor=True,
            device=str(device),
            normalize_embeddings=normalize,
            show_progress_bar=False,
        )
        return emb.float().cpu()
    out = []
    model.eval()
    for i in range(0, len(texts), batch_size):
        enc = tokenizer(
            texts[i : i + batch_size],
            padding=True,
            truncation=True,
            max_length=max_length,
            return_tensors="pt",
        ).to(device)
        h = model(**enc).last_hidden_state
        e = mean_pool(h, enc["attention_mask"])
        out.append(torch.nn.functional.normalize(e, dim=-1) if normalize else e)
    return torch.cat(out).float().cpu()
