"""Students made from a teacher: keep a subset of its layers, optionally narrower.

DistilBERT (Sanh et al. 2019) initialises its 6-layer student from BERT's embeddings and every
second layer; this does the same for any Hugging Face encoder or causal LM whose blocks live in
one `nn.ModuleList` (BERT, RoBERTa, MiniLM, GPT-2, Llama, Mistral, Qwen, ...). The result is an
ordinary `PreTrainedModel` of the teacher's class: `save_pretrained` writes safetensors and
`from_pretrained` loads it without distill installed.

A narrower student (smaller hidden size) cannot take the teacher's weights as they are; it is
initialised either randomly or by slicing each teacher tensor to the student's shape
(`narrow_init="slice"`), and the width gap is bridged during training by the learned
projections of the hidden-state and embedding terms (`hidden_mse`, `embed_mse`, ...).

Which blocks and channels to keep can be chosen by measurement on a few batches of real data
(`select="importance"`): `block_importance` scores each block by block influence (BI: one minus
the mean cosine similarity of a block's input and output hidden states over real tokens; Men et
al. 2024, "ShortGPT") or by the language-model loss increase when the block is skipped; the
student keeps the highest-scoring blocks in their original order. Narrower attention and MLP
(fewer heads, fewer key/value groups, a smaller MLP) keep whole heads, whole key/value groups
and the MLP channels with the largest measured contribution (`width_importance`). Fused
projections (GPT-2's `c_attn`, Phi-3's `qkv_proj` and `gate_up_proj`) are cut part by part, so
a student's q, k and v are always slices of the teacher's q, k and v.
"""

from __future__ import annotations

import contextlib
import copy
import os
import re
from collections.abc import Iterable, Sequence
from typing import Any

import torch
from torch import nn

from distill.errors import DistillError

# Where the list of blocks lives, by architecture family (tried in order; a generic search follows).
_LAYER_LISTS = (
    "encoder.layer",  # BERT, RoBERTa, MiniLM, ELECTRA (base models)
    "bert.encoder.layer",
    "roberta.encoder.layer",
    "transformer.h",  # GPT-2, GPT-J, Bloom(-ish)
    "h",
    "model.layers",  # Llama, Mistral, Qwen, Gemma
    "layers",
    "model.decoder.layers",  # OPT
    "gpt_neox.layers",
    "distilbert.transformer.layer",
    "transformer.layer",
)

# Per-layer config lists that must follow the kept layers (newer transformers configs).
_PER_LAYER_CONFIG_KEYS = ("layer_types",)


def find_layers(model: nn.Module) -> tuple[str, nn.ModuleList]:
    """The dotted path and the `nn.ModuleList` of transformer blocks of a model."""
    modules = dict(model.named_modules())
    for path in _LAYER_LISTS:
        m = modules.get(path)
        if isinstance(m, nn.ModuleList) and len(m) > 0:
            return path, m
    lists = [(p, m) for p, m in modules.items() if isinstance(m, nn.ModuleList) and len(m) > 1]
    if not lists:
        raise DistillError(
            f"cannot find the transformer blocks of {type(model).__name__}: no nn.ModuleList of layers; "
            "pass a model whose blocks live in one ModuleList"
        )
    return max(lists, key=lambda pm: len(pm[1]))


def choose_layers(
    n_teacher: int,
    layers: Sequence[int] | None = None,
    every: int | None = None,
    num_layers: int | None = None,
) -> list[int]:
    """Which teacher layers the student keeps.

    Exactly one of: `layers` (explicit indices), `every` (every k-th, DistilBERT: 0, k, 2k, ...),
    or `num_layers` (that many, spread evenly and always including the first and the last).
    """
    given = sum(x is not None for x in (layers, every, num_layers))
    if given != 1:
        raise DistillError(
            "give exactly one of layers=[...], every=k or num_layers=n to choose the student's layers"
        )
    if layers is not None:
        out = [int(i) for i in layers]
    elif every is not None:
        if every < 1:
            raise DistillError(f"every must be >= 1, got {every}")
        out = list(range(0, n_teacher, every))
    else:
        if not 1 <= num_layers <= n_teacher:
            raise DistillError(
                f"num_layers must be in [1, {n_teacher}] (the teacher's depth), got {num_layers}"
            )
        if num_layers == 1:
            out = [n_teacher - 1]
        else:
            out = sorted({round(i * (n_teacher - 1) / (num_layers - 1)) for i in range(num_layers)})
    bad = [i for i in out if not 0 <= i < n_teacher]
    if bad or not out:
        raise DistillError(
            f"student layers {out} must be distinct indices in [0, {n_teacher - 1}] (the teacher has {n_teacher})"
        )
    if len(set(out)) != len(out):
        raise DistillError(f"student layers {out} repeat an index; list each teacher layer once")
    return out


def _narrow_config(
    config,
    hidden_size: int,
    intermediate_size: int | None,
    num_heads: int | None,
    num_key_value_heads: int | None = None,
):
    """Changes the width keys of a config (BERT / GPT-2 / Llama naming)."""
    old_h = config.hidden_size
    heads = num_heads or config.num_attention_heads
    if hidden_size % heads:
        raise DistillError(
            f"hidden_size {hidden_size} is not divisible by {heads} attention heads; pass num_heads= a divisor"
        )
    config.hidden_size = hidden_size  # n_embd for GPT-2 through attribute_map
    config.num_attention_heads = heads
    if hasattr(config, "num_key_value_heads") and config.num_key_value_heads is not None:
        config.num_key_value_heads = num_key_value_heads or min(config.num_key_value_heads, heads)
        if heads % config.num_key_value_heads:
            if num_key_value_heads:
                raise DistillError(
                    f"num_heads {heads} is not a multiple of num_key_value_heads {num_key_value_heads}"
                )
            while heads % config.num_key_value_heads:
                config.num_key_value_heads -= 1
    if getattr(config, "head_dim", None) is not None:
        config.head_dim = hidden_size // heads
    for key in ("intermediate_size", "n_inner"):
        if getattr(config, key, None) is not None:
            setattr(config, key, intermediate_size or max(1, getattr(config, key) * hidden_size // old_h))
    if getattr(config, "model_type", None) == "gpt2" and config.n_inner is None and intermediate_size:
        config.n_inner = intermediate_size
    return config


# ---------------------------------------------------------------------------------------------
# Measured importance: which blocks, heads and MLP channels matter on real data.

IMPORTANCE_METHODS = ("bi", "loss")
SELECT_MODES = ("spread", "importance")
_MODEL_KEYS = ("input_ids", "attention_mask", "token_type_ids", "position_ids")


def _device(model: nn.Module) -> torch.device:
    p = next(model.parameters(), None)
    return p.device if p is not None else torch.device("cpu")


def _model_inputs(raw: Any, device: torch.device) -> tuple[dict[str, torch.Tensor], torch.Tensor, Any]:
    """(model kwargs, real-token mask (B, T), labels (B, T) or None) from one calibration batch:
    a dict of token ids (`input_ids`, `attention_mask`, optional `labels`), a distill `Batch`, or
    a bare (B, T) tensor of token ids."""
    from collections.abc import Mapping

    from distill.outputs import as_batch

    batch = as_batch({"input_ids": raw} if isinstance(raw, torch.Tensor) else raw)
    inputs = batch.inputs if isinstance(batch.inputs, Mapping) else {"input_ids": batch.inputs}
    ids = inputs.get("input_ids")
    if not isinstance(ids, torch.Tensor) or ids.dim() != 2:
        raise DistillError(
            f"a calibration batch needs (B, T) input_ids (a dict batch of token ids, as text data gives), "
            f"got {type(raw).__name__} with keys {sorted(inputs) if isinstance(inputs, Mapping) else '-'}"
        )
    kwargs = {k: v.to(device) for k, v in inputs.items() if k in _MODEL_KEYS and isinstance(v, torch.Tensor)}
    mask = inputs.get("attention_mask")
    mask = torch.ones_like(ids) if not isinstance(mask, torch.Tensor) else mask
    labels = (
        batch.targets
        if isinstance(batch.targets, torch.Tensor) and batch.targets.shape == ids.shape
        else None
    )
    return kwargs, mask.to(device), labels


def _hidden_in(args: tuple, kwargs: dict) -> torch.Tensor:
    h = args[0] if args and isinstance(args[0], torch.Tensor) else kwargs.get("hidden_states")
    if not isinstance(h, torch.Tensor):
        raise DistillError(
            "cannot read the hidden states a block receives (neither its first argument nor hidden_states=)"
        )
    return h


def _first(output: Any) -> torch.Tensor:
    return output[0] if isinstance(output, tuple | list) else output


def _call(model: nn.Module, kwargs: dict[str, torch.Tensor]):
    if getattr(getattr(model, "config", None), "use_cache", None) is not None:
        return model(**kwargs, use_cache=False)  # no key/value cache: one forward, nothing kept
    return model(**kwargs)


def _calibration_list(calibration: Iterable | None, what: str) -> list:
    if calibration is None:
        raise DistillError(
            f"{what} measures the teacher on real data: pass calibration=<a few batches of token ids> "
            "(in a recipe the pipeline passes the training data's first batches)"
        )
    batches = list(calibration)
    if not batches:
        raise DistillError(f"{what}: the calibration batches are empty; give at least one batch of token ids")
    return batches


def _run_hooked(model: nn.Module, batches: list, handles: list, mask_now: list) -> float:
    """Runs `model` on every batch with the measuring hooks `handles` (removed afterwards), each
    batch's real-token mask in `mask_now[0]`; returns the number of real tokens seen."""
    tokens = 0.0
    try:
        for raw in batches:
            kwargs, mask, _ = _model_inputs(raw, _device(model))
            mask_now[:] = [mask.float()]
            _call(model, kwargs)
            tokens += float(mask.sum())
    finally:
        for h in handles:
            h.remove()
    if tokens == 0:
        raise DistillError("the calibration batches have no real tokens (attention_mask is all 0)")
    return tokens


def _block_influence(
    model: nn.Module, blocks: nn.ModuleList, batches: list, device: torch.device
) -> list[float]:
    """1 - mean cosine(h_in, h_out) over real tokens, per block (ShortGPT's BI)."""
    total = [0.0] * len(blocks)
    seen: dict[int, torch.Tensor] = {}
    mask_now: list[torch.Tensor] = []

    def pre(i):
        def hook(module, args, kwargs):
            seen[i] = _hidden_in(args, kwargs)

        return hook

    def post(i):
        def hook(module, args, output):
            h_in, h_out = seen.pop(i).float(), _first(output).float()
            mask = mask_now[0]
            if h_in.shape[:2] != mask.shape or h_out.shape != h_in.shape:
                raise DistillError(
                    f"block {i}: hidden states of shape {tuple(h_in.shape)} -> {tuple(h_out.shape)} do not "
                    f"match the batch's tokens {tuple(mask.shape)}; importance needs (B, T, H) blocks"
                )
            cos = torch.nn.functional.cosine_similarity(h_in, h_out, dim=-1)  # (B, T)
            total[i] += float(((1.0 - cos) * mask).sum())

        return hook

    handles = []
    for i, block in enumerate(blocks):
        handles.append(block.register_forward_pre_hook(pre(i), with_kwargs=True))
        handles.append(block.register_forward_hook(post(i)))
    tokens = _run_hooked(model, batches, handles, mask_now)
    return [t / tokens for t in total]


def _skip_loss(model: nn.Module, blocks: nn.ModuleList, batches: list, device: torch.device) -> list[float]:
    """Next-token loss with block i replaced by the identity, minus the loss of the whole model."""
    skipped: list[int | None] = [None]

    def hook(i):
        def fn(module, args, kwargs, output):
            if skipped[0] != i:
                return None
            h = _hidden_in(args, kwargs)
            return (h, *output[1:]) if isinstance(output, tuple) else h

        return fn

    handles = [b.register_forward_hook(hook(i), with_kwargs=True) for i, b in enumerate(blocks)]
    sums = [0.0] * (len(blocks) + 1)
    tokens = 0
    try:
        for raw in batches:
            kwargs, mask, labels = _model_inputs(raw, device)
            labels = kwargs["input_ids"].masked_fill(mask == 0, -100) if labels is None else labels.to(device)
            targets = labels[:, 1:]  # position t predicts token t + 1
            tokens += int((targets != -100).sum())
            for j, skip in enumerate([None, *range(len(blocks))]):
                skipped[0] = skip
                logits = getattr(_call(model, kwargs), "logits", None)
                if not isinstance(logits, torch.Tensor) or logits.dim() != 3:
                    raise DistillError(
                        f"importance='loss' needs a language model returning (B, T, V) logits; "
                        f"{type(model).__name__} does not: use importance='bi'"
                    )
                sums[j] += float(
                    torch.nn.functional.cross_entropy(
                        logits[:, :-1].flatten(0, 1).float(),
                        targets.flatten(),
                        ignore_index=-100,
                        reduction="sum",
                    )
                )
    finally:
        for h in handles:
            h.remove()
    if tokens == 0:
        raise DistillError("the calibration batches have no label tokens to score (labels are all -100)")
    base = sums[0] / tokens
    return [s / tokens - base for s in sums[1:]]


@torch.no_grad()
def block_importance(model: nn.Module, batches: Iterable, method: str = "bi") -> list[float]:
    """One score per transformer block of `model`, measured on `batches`; higher = more important.

    Args:
        model: a Hugging Face model whose blocks live in one `nn.ModuleList` (see `find_layers`).
        batches: an iterable of batches of token ids: dicts with `input_ids` (B, T) and optionally
            `attention_mask` (padding is not scored) and `labels` (-100 = not scored, for "loss").
        method: "bi", block influence: 1 - the mean cosine similarity between the hidden state a
            block receives and the one it returns, over real tokens (Men et al. 2024, "ShortGPT");
            a block that barely turns its input scores near 0. "loss": how much the next-token
            cross-entropy (nats per token) rises when the block is skipped (its output replaced
            by its input); needs a language model, and one forward per block and batch.

    Returns:
        A list of `len(blocks)` floats, in block order.
    """
    if method not in IMPORTANCE_METHODS:
        raise DistillError(f"importance '{method}' is not one of {', '.join(IMPORTANCE_METHODS)}")
    _, blocks = find_layers(model)
    batches = _calibration_list(batches, "block_importance")
    was = model.training
    model.eval()
    try:
        measure = _block_influence if method == "bi" else _skip_loss
        scores = measure(model, blocks, batches, _device(model))
    finally:
        model.train(was)
    bad = [i for i, x in enumerate(scores) if x != x or abs(x) == float("inf")]
    if bad:
        raise DistillError(
            f"block importance is not finite for blocks {bad}: the teacher overflows on these batches "
            "(load it in fp32: dtype: fp32)"
        )
    return scores


def top_blocks(scores: Sequence[float], k: int) -> list[int]:
    """The indices of the `k` highest scores, in block order (ties: the earlier block)."""
    if not 1 <= k <= len(scores):
        raise DistillError(f"num_layers must be in [1, {len(scores)}] (the teacher's depth), got {k}")
    order = sorted(range(len(scores)), key=lambda i: (-scores[i], i))
    return sorted(order[:k])


# Width: which projections carry query heads (q), key/value heads (kv), MLP channels (mlp), or
# several side by side (qkv: q | k | v; gate_up: gate | up). Per tensor, the role of each axis.
_ROLES = {
    "llama": {  # Llama, Mistral, Qwen2/3, Gemma: separate projections, nn.Linear (out, in)
        "self_attn.q_proj.weight": ("q", None),
        "self_attn.q_proj.bias": ("q",),
        "self_attn.k_proj.weight": ("kv", None),
        "self_attn.k_proj.bias": ("kv",),
        "self_attn.v_proj.weight": ("kv", None),
        "self_attn.v_proj.bias": ("kv",),
        "self_attn.o_proj.weight": (None, "q"),
        "mlp.gate_proj.weight": ("mlp", None),
        "mlp.gate_proj.bias": ("mlp",),
        "mlp.up_proj.weight": ("mlp", None),
        "mlp.up_proj.bias": ("mlp",),
        "mlp.down_proj.weight": (None, "mlp"),
    },
    "phi3": {  # Phi-3: q, k, v fused in qkv_proj; gate and up fused in gate_up_proj
        "self_attn.qkv_proj.weight": ("qkv", None),
        "self_attn.qkv_proj.bias": ("qkv",),
        "self_attn.o_proj.weight": (None, "q"),
        "mlp.gate_up_proj.weight": ("gate_up", None),
        "mlp.down_proj.weight": (None, "mlp"),
    },
    "gpt2": {  # GPT-2: Conv1D weights are (in, out); q, k, v fused in c_attn
        "attn.c_attn.weight": (None, "qkv"),
        "attn.c_attn.bias": ("qkv",),
        "attn.c_proj.weight": ("q", None),
        "mlp.c_fc.weight": (None, "mlp"),
        "mlp.c_fc.bias": ("mlp",),
        "mlp.c_proj.weight": ("mlp", None),
    },
}
_OUT_PROJ = {"llama": "self_attn.o_proj", "phi3": "self_attn.o_proj", "gpt2": "attn.c_proj"}
_DOWN_PROJ = {"llama": "mlp.down_proj", "phi3": "mlp.down_proj", "gpt2": "mlp.c_proj"}


def _family(block: nn.Module) -> str | None:
    names = dict(block.named_modules())
    if "self_attn.qkv_proj" in names and "mlp.gate_up_proj" in names:
        return "phi3"
    if (
        all(f"self_attn.{p}" in names for p in ("q_proj", "k_proj", "v_proj", "o_proj"))
        and "mlp.down_proj" in names
    ):
        return "llama"
    if "attn.c_attn" in names and "mlp.c_proj" in names:
        return "gpt2"
    return None


def _shape(config) -> dict[str, int]:
    """Attention and MLP sizes of a config: heads, key/value heads, head width, MLP width."""
    nq = config.num_attention_heads
    nkv = getattr(config, "num_key_value_heads", None) or nq
    d = getattr(config, "head_dim", None) or config.hidden_size // nq
    inner = (
        getattr(config, "intermediate_size", None)
        or getattr(config, "n_inner", None)
        or 4 * config.hidden_size
    )
    return {"heads": nq, "kv_heads": nkv, "head_dim": d, "mlp": inner}


def _weight_out_in(module: nn.Module) -> torch.Tensor:
    """A projection's weight as (out, in) (GPT-2's Conv1D stores it as (in, out))."""
    return module.weight.t() if type(module).__name__ == "Conv1D" else module.weight


@torch.no_grad()
def width_importance(model: nn.Module, batches: Iterable) -> dict[str, list[list[float]]]:
    """Per block, how much each attention head and each MLP channel contributes, on `batches`.

    A head's score is the mean norm, over real tokens, of what it adds to the residual stream
    (its slice of the attention output times its columns of the output projection); an MLP
    channel's score is its mean activation magnitude (the input of the down projection) times
    the norm of its down-projection column. Supported blocks: Llama-style (Llama, Mistral, Qwen),
    Phi-3 and GPT-2.

    Returns:
        `{"heads": [[score per query head] per block], "mlp": [[score per channel] per block]}`.
    """
    _, blocks = find_layers(model)
    family = _family(blocks[0])
    if family is None:
        raise DistillError(
            f"cutting the width of {type(blocks[0]).__name__} blocks is not supported (Llama-style, Phi-3 "
            "and GPT-2 blocks are); narrow it with hidden_size= instead"
        )
    batches = _calibration_list(batches, "width_importance")
    shape = _shape(model.config)
    nq, d = shape["heads"], shape["head_dim"]
    heads = [torch.zeros(nq, dtype=torch.float64) for _ in blocks]
    mlp = [torch.zeros(shape["mlp"], dtype=torch.float64) for _ in blocks]
    mask_now: list[torch.Tensor] = []

    def out_hook(i, proj):
        def hook(module, args):
            x = args[0].float()  # (B, T, heads * head_dim): each head's attention output, side by side
            w = _weight_out_in(proj).float().reshape(-1, nq, d)  # (H, heads, head_dim)
            contrib = torch.einsum("btnd,hnd->btnh", x.reshape(*x.shape[:2], nq, d), w).norm(dim=-1)
            heads[i] += (contrib * mask_now[0][..., None]).sum((0, 1)).double().cpu()

        return hook

    def down_hook(i, proj):
        def hook(module, args):
            a = args[0].float().abs()  # (B, T, mlp)
            col = _weight_out_in(proj).float().norm(dim=0)  # (mlp,)
            mlp[i] += ((a * mask_now[0][..., None]).sum((0, 1)) * col).double().cpu()

        return hook

    handles = []
    for i, block in enumerate(blocks):
        mods = dict(block.named_modules())
        o, down = mods[_OUT_PROJ[family]], mods[_DOWN_PROJ[family]]
        handles.append(o.register_forward_pre_hook(out_hook(i, o)))
        handles.append(down.register_forward_pre_hook(down_hook(i, down)))
    was = model.training
    model.eval()
    try:
        tokens = _run_hooked(model, batches, handles, mask_now)
    finally:
        model.train(was)
    return {"heads": [(h / tokens).tolist() for h in heads], "mlp": [(m / tokens).tolist() for m in mlp]}


def _width_plan(config, family: str, num_heads, num_key_value_heads, intermediate_size) -> dict[str, int]:
    """The student's heads, key/value heads and MLP width for a cut that keeps the head width."""
    t = _shape(config)
    group = t["heads"] // t["kv_heads"]  # query heads per key/value group
    q, kv = num_heads, num_key_value_heads
    if q is None and kv is None:
        q, kv = t["heads"], t["kv_heads"]
    elif kv is None:
        if q % group:
            raise DistillError(
                f"num_heads {q} is not a multiple of the teacher's {group} query heads per key/value group; "
                "give num_key_value_heads= too"
            )
        kv = q // group
    elif q is None:
        q = kv * group
    if not (1 <= kv <= t["kv_heads"] and 1 <= q <= t["heads"] and q % kv == 0 and q // kv <= group):
        raise DistillError(
            f"a student with {q} heads and {kv} key/value heads cannot be cut from a teacher with "
            f"{t['heads']} heads in {t['kv_heads']} key/value groups of {group}: keep whole groups "
            f"(num_key_value_heads <= {t['kv_heads']}) and at most {group} heads per group"
        )
    if family == "gpt2" and q != t["heads"]:
        raise DistillError(
            "GPT-2 ties its head width to n_embd (head_dim = n_embd / n_head), so fewer heads need a "
            "narrower model: give hidden_size=, or cut only the MLP (intermediate_size=)"
        )
    inner = intermediate_size or t["mlp"]
    if not 1 <= inner <= t["mlp"]:
        raise DistillError(
            f"intermediate_size must be in [1, {t['mlp']}] (the teacher's MLP width), got {inner}"
        )
    return {"heads": q, "kv_heads": kv, "head_dim": t["head_dim"], "mlp": inner}


def _keep_heads(
    scores: Sequence[float] | None, t: dict[str, int], plan: dict[str, int]
) -> tuple[list[int], list[int]]:
    """(kept query heads, kept key/value groups): whole groups, the best heads inside each.

    Without scores: the first heads of the first groups."""
    group = t["heads"] // t["kv_heads"]
    per = plan["heads"] // plan["kv_heads"]
    inside, group_score = {}, {}
    for g in range(t["kv_heads"]):
        members = list(range(g * group, (g + 1) * group))
        if scores is not None:
            members = sorted(sorted(members, key=lambda h: (-scores[h], h))[:per])
            group_score[g] = sum(scores[h] for h in members)
        inside[g] = members[:per]
    groups = list(range(t["kv_heads"]))
    if scores is not None:
        groups = sorted(groups, key=lambda g: (-group_score[g], g))
    groups = sorted(groups[: plan["kv_heads"]])
    return [h for g in groups for h in inside[g]], groups


def _rows(units: Sequence[int], width: int) -> torch.Tensor:
    """The rows of whole heads (or groups) `units`, each `width` wide, side by side."""
    return (
        torch.cat([torch.arange(u * width, (u + 1) * width) for u in units])
        if units
        else torch.zeros(0, dtype=torch.long)
    )


def _role_index(t: dict[str, int], q_rows, kv_rows, mlp_rows, gpt2: bool) -> dict[str, torch.Tensor]:
    """Teacher indices along each role's axis; fused axes take each part from its own part."""
    q_width = t["heads"] * t["head_dim"]
    kv_width = q_width if gpt2 else t["kv_heads"] * t["head_dim"]
    if gpt2:
        kv_rows = q_rows  # multi-head attention: k and v have the query's heads
    return {
        "q": q_rows,
        "kv": kv_rows,
        "mlp": mlp_rows,
        "qkv": torch.cat([q_rows, q_width + kv_rows, q_width + kv_width + kv_rows]),
        "gate_up": torch.cat([mlp_rows, t["mlp"] + mlp_rows]),
    }


def _cut(tensor: torch.Tensor, shape: torch.Size, roles: tuple | None, index: dict[str, torch.Tensor] | None):
    """`tensor` cut to `shape`: along an axis with a role, the teacher's rows `index[role]`; along
    any other axis, the first rows (the old `slice` init)."""
    out = tensor
    for axis, n in enumerate(shape):
        role = roles[axis] if roles is not None and axis < len(roles) else None
        if role is not None and index is not None:
            out = out.index_select(axis, index[role].to(out.device))
        elif out.shape[axis] != n:
            out = out.narrow(axis, 0, n)
    return out


# ---------------------------------------------------------------------------------------------


def make_student(
    teacher,
    layers: Sequence[int] | None = None,
    every: int | None = None,
    num_layers: int | None = None,
    hidden_size: int | None = None,
    intermediate_size: int | None = None,
    num_heads: int | None = None,
    num_key_value_heads: int | None = None,
    narrow_init: str = "slice",
    seed: int = 0,
    select: str = "spread",
    calibration: Iterable | None = None,
    importance: str = "bi",
):
    """A smaller model of the teacher's own class, initialised from the teacher's weights.

    Args:
        teacher: a Hugging Face `PreTrainedModel` (encoder or causal LM).
        layers / every / num_layers: which teacher blocks to keep (see `choose_layers`).
        select: "spread" (`num_layers` spread evenly; the first heads and channels) or
            "importance" (the `num_layers` blocks, heads and MLP channels that matter most,
            measured on `calibration`; see `block_importance` and `width_importance`).
        calibration: a few batches of token ids from the data the student will learn (for
            `select="importance"`).
        importance: how blocks are scored, "bi" (block influence) or "loss" (see `block_importance`).
        num_heads / num_key_value_heads / intermediate_size: without `hidden_size`, a narrower
            attention and MLP of the same head width (whole heads, whole key/value groups).
        hidden_size: a narrower residual width (None keeps the teacher's, and then every kept tensor
            is copied exactly). Heads and the MLP width shrink in proportion unless given.
        narrow_init: for a narrower `hidden_size`, "slice" (each teacher tensor cut to the student's
            shape, fused q/k/v and gate/up part by part) or "random" (the architecture's own init).
        seed: for the random initialisation of what is not copied.

    Returns:
        The student, in eval mode like a freshly loaded model. `student.config.distill_layers`
        lists the teacher blocks it came from; `student.config.distill_cut` records how they were
        chosen (`select`, `importance`, every teacher block's `scores`, the kept `blocks`) and,
        for a narrower attention or MLP, the kept `heads`, `kv_heads` and `mlp_channels` per block.
    """
    if not hasattr(teacher, "config") or not hasattr(teacher, "save_pretrained"):
        raise DistillError(
            f"make_student needs a Hugging Face PreTrainedModel, got {type(teacher).__name__}; "
            "for a SentenceTransformer use make_sentence_student"
        )
    if narrow_init not in ("slice", "random"):
        raise DistillError(f"narrow_init '{narrow_init}' is not one of slice, random")
    if select not in SELECT_MODES:
        raise DistillError(f"select '{select}' is not one of {', '.join(SELECT_MODES)}")
    if importance not in IMPORTANCE_METHODS:
        raise DistillError(f"importance '{importance}' is not one of {', '.join(IMPORTANCE_METHODS)}")
    path, blocks = find_layers(teacher)
    narrow = hidden_size is not None and hidden_size != teacher.config.hidden_size
    width = not narrow and any(x is not None for x in (num_heads, num_key_value_heads, intermediate_size))
    cut: dict[str, Any] = {"select": select, "teacher_blocks": len(blocks)}
    batches = None
    if select == "importance":
        if layers is not None or every is not None or num_layers is None:
            raise DistillError(
                "select='importance' chooses the blocks itself: give num_layers=k (how many to keep), "
                "not layers= or every="
            )
        batches = _calibration_list(calibration, "select='importance'")
        scores = _cached_importance(teacher, batches, importance)
        kept = top_blocks(scores, num_layers)
        cut.update(importance=importance, scores=[round(x, 6) for x in scores])
    else:
        kept = choose_layers(len(blocks), layers, every, num_layers)
    cut["blocks"] = kept
    cfg = copy.deepcopy(teacher.config)
    cfg.num_hidden_layers = len(kept)
    for key in _PER_LAYER_CONFIG_KEYS:
        values = getattr(cfg, key, None)
        if isinstance(values, list) and len(values) == len(blocks):
            setattr(cfg, key, [values[i] for i in kept])
    family = _family(blocks[0])
    t_shape = _shape(teacher.config)
    index: dict[int, dict[str, torch.Tensor]] = {}  # student block -> role -> teacher rows
    if width:
        if family is None:
            raise DistillError(
                f"cutting heads or MLP channels of {type(blocks[0]).__name__} blocks is not supported "
                "(Llama-style, Phi-3 and GPT-2 blocks are); give hidden_size= for a narrower student"
            )
        plan = _width_plan(teacher.config, family, num_heads, num_key_value_heads, intermediate_size)
        measured = width_importance(teacher, batches) if select == "importance" else None
        cut.update(heads=[], kv_heads=[], mlp_channels=[])
        for s, t in enumerate(kept):
            q, kv = _keep_heads(measured["heads"][t] if measured else None, t_shape, plan)
            if measured:
                order = sorted(range(t_shape["mlp"]), key=lambda c, m=measured["mlp"][t]: (-m[c], c))
                channels = sorted(order[: plan["mlp"]])
            else:
                channels = list(range(plan["mlp"]))
            cut["heads"].append(q)
            cut["kv_heads"].append(kv)
            cut["mlp_channels"].append(channels)
            d = t_shape["head_dim"]
            index[s] = _role_index(
                t_shape, _rows(q, d), _rows(kv, d), torch.tensor(channels), family == "gpt2"
            )
        cfg.num_attention_heads = plan["heads"]
        if getattr(cfg, "num_key_value_heads", None) is not None:
            cfg.num_key_value_heads = plan["kv_heads"]
        if family != "gpt2":
            cfg.head_dim = plan["head_dim"]  # whole heads: the head width stays the teacher's
        cfg.update({"n_inner" if family == "gpt2" else "intermediate_size": plan["mlp"]})
    if narrow:
        _narrow_config(cfg, hidden_size, intermediate_size, num_heads, num_key_value_heads)
        if family is not None:  # first rows of each part: fused projections are cut part by part
            s_shape = _shape(cfg)
            first = _role_index(
                t_shape,
                torch.arange(s_shape["heads"] * s_shape["head_dim"]),
                torch.arange(s_shape["kv_heads"] * s_shape["head_dim"]),
                torch.arange(s_shape["mlp"]),
                family == "gpt2",
            )
            index = dict.fromkeys(range(len(kept)), first)
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        student = type(teacher)(cfg)
    student.config.distill_layers = kept  # saved in config.json: where the student came from
    student.config.distill_cut = cut
    roles = _ROLES.get(family or "", {})
    t_state = teacher.state_dict()
    pattern = re.compile(rf"^{re.escape(path)}\.(\d+)\.")
    new_state = {}
    for key, value in student.state_dict().items():
        m = pattern.match(key)
        src = key if m is None else f"{path}.{kept[int(m.group(1))]}.{key[m.end() :]}"
        if src not in t_state:
            continue  # e.g. buffers the student builds itself
        tv = t_state[src]
        rows = index.get(int(m.group(1))) if m else None  # this block's kept heads / channels
        role = roles.get(key[m.end() :]) if rows is not None else None
        if tv.shape == value.shape and role is None:
            new_state[key] = tv.detach().clone()
        elif (width or narrow_init == "slice") and tv.dim() == value.dim():
            new_state[key] = _cut(tv, value.shape, role, rows).detach().clone()
            if new_state[key].shape != value.shape:
                raise DistillError(
                    f"{key}: cut the teacher's {tuple(tv.shape)} to {tuple(new_state[key].shape)}, "
                    f"not the student's {tuple(value.shape)}; please report this architecture"
                )
    if not narrow:
        missing = [k for k in student.state_dict() if k not in new_state]
        if any("weight" in k for k in missing):
            raise DistillError(f"could not copy {len(missing)} tensors into the student (e.g. {missing[:3]})")
    student.load_state_dict(new_state, strict=False)
    if getattr(teacher.config, "tie_word_embeddings", False) and hasattr(student, "tie_weights"):
        student.tie_weights()
    return student.eval()


def _cached_importance(teacher: nn.Module, batches: list, method: str) -> list[float]:
    """`block_importance`, remembered on the teacher for the same batches and weights: a recipe
    builds its student once per stage, and the "loss" scores take one forward per block."""
    import hashlib

    h = hashlib.sha1(method.encode())
    for raw in batches:
        kwargs, mask, labels = _model_inputs(raw, torch.device("cpu"))
        for t in (kwargs["input_ids"], mask, labels):
            if isinstance(t, torch.Tensor):
                h.update(str(tuple(t.shape)).encode())
                h.update(t.detach().cpu().contiguous().view(-1).numpy().tobytes())
    with torch.no_grad():
        weights = tuple(round(float(p.detach().double().sum()), 6) for p in teacher.parameters())
    key = (h.hexdigest(), hash(weights))
    memo = teacher.__dict__.setdefault("_distill_importance", {})
    if key not in memo:
        memo[key] = block_importance(teacher, batches, method)
    return list(memo[key])


def cut_summary(model: nn.Module) -> dict[str, Any] | None:
    """How a student was cut from its teacher (for summary.json): blocks, scores, heads; the MLP
    channels as a count per block. None for a model that was not cut by `make_student`."""
    inner = model
    if type(model).__name__ == "SentenceTransformer":
        inner = getattr(model[0], "auto_model", model)
    cut = getattr(getattr(inner, "config", None), "distill_cut", None)
    if not isinstance(cut, dict):
        return None
    out = {k: v for k, v in cut.items() if k != "mlp_channels"}
    if "mlp_channels" in cut:
        out["mlp_width"] = [len(c) for c in cut["mlp_channels"]]
    return out


def cut_markdown(cut: dict[str, Any]) -> list[str]:
    """report.md lines for a `cut_summary`: what was kept, and each teacher block's score."""
    n, kept = cut.get("teacher_blocks"), cut.get("blocks", [])
    how = {
        "bi": "block influence, 1 - cos(input, output) over real tokens (higher = the block changes its input more)",
        "loss": "next-token loss increase in nats per token when the block is skipped (higher = more needed)",
    }
    lines = ["## The student cut from the teacher", ""]
    if cut.get("select") == "importance":
        lines.append(
            f"Kept {len(kept)} of {n} teacher blocks by measured importance ({cut.get('importance')}: "
            f"{how.get(cut.get('importance'), '')}), in their original order: {kept}."
        )
    else:
        lines.append(f"Kept {len(kept)} of {n} teacher blocks, spread evenly: {kept}.")
    if "heads" in cut:
        lines.append(
            f"Attention: {len(cut['heads'][0])} heads in {len(cut['kv_heads'][0])} key/value groups per block; "
            f"MLP width {cut.get('mlp_width', ['?'])[0]}."
        )
    scores = cut.get("scores")
    if scores:
        lines += ["", "| block | score | kept |", "| --- | --- | --- |"]
        lines += [f"| {i} | {s:.4g} | {'yes' if i in kept else ''} |" for i, s in enumerate(scores)]
    return [*lines, ""]


def save_student(model, directory: str | os.PathLike, tokenizer=None) -> None:
    """`save_pretrained` in safetensors (plus the tokenizer), loadable with `from_pretrained`."""
    model.save_pretrained(str(directory))
    if tokenizer is not None:
        tokenizer.save_pretrained(str(directory))
    names = os.listdir(directory)
    if not any(n.endswith(".safetensors") for n in names):
        raise DistillError(f"save_pretrained wrote no safetensors file in {directory}; update transformers")


def make_sentence_student(teacher, **kwargs):
    """A SentenceTransformer student: the teacher's pipeline (tokenizer, pooling, normalisation)
    around a layer-subset copy of its transformer (`make_student` kwargs).

    The result saves with `student.save(path)` and loads with `SentenceTransformer(path)`.
    """
    first = teacher[0]
    auto = getattr(first, "auto_model", None)
    if auto is None:
        raise DistillError(
            "the SentenceTransformer's first module has no auto_model; only Transformer-based pipelines are supported"
        )
    inner = make_student(auto, **kwargs)
    student = copy.deepcopy(teacher)
    if isinstance(getattr(type(first), "auto_model", None), property):
        student[0].model = inner  # sentence-transformers >= 5: auto_model is a view of .model
    else:
        student[0].auto_model = inner
    if "hidden_size" in kwargs and kwargs["hidden_size"] not in (None, auto.config.hidden_size):
        _fix_pooling_dim(student, kwargs["hidden_size"])
    return student


def _fix_pooling_dim(st, dim: int) -> None:
    for module in st:
        for attr in ("word_embedding_dimension", "embedding_dimension"):
            if hasattr(module, attr):
                with contextlib.suppress(AttributeError):
                    setattr(module, attr, dim)
        cfg = getattr(module, "config", None)
        if isinstance(cfg, dict):
            for key in ("word_embedding_dimension", "embedding_dimension"):
                if key in cfg:
                    cfg[key] = dim
