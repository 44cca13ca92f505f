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
"""

from __future__ import annotations

import contextlib
import copy
import os
import re
from collections.abc import Sequence

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


def _narrow_config(config, hidden_size: int, intermediate_size: int | None, num_heads: int | None):
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
        config.num_key_value_heads = min(config.num_key_value_heads, heads)
        while heads % config.num_key_value_heads:
            config.num_key_value_heads -= 1
    if getattr(config, "head_dim", None) is not None:
        config.head_dim = hidden_size // heads
    for key in ("intermediate_size", "n_inner"):
        if getattr(config, key, None) is not None:
            setattr(config, key, intermediate_size or max(1, getattr(config, key) * hidden_size // old_h))
    return config


def make_student(
    teacher,
    layers: Sequence[int] | None = None,
    every: int | None = None,
    num_layers: int | None = None,
    hidden_size: int | None = None,
    intermediate_size: int | None = None,
    num_heads: int | None = None,
    narrow_init: str = "slice",
    seed: int = 0,
):
    """A smaller model of the teacher's own class, initialised from the teacher's weights.

    Args:
        teacher: a Hugging Face `PreTrainedModel` (encoder or causal LM).
        layers / every / num_layers: which teacher blocks to keep (see `choose_layers`).
        hidden_size: a narrower width (None keeps the teacher's, and then every kept tensor is
            copied exactly). Heads and the MLP width shrink in proportion unless given.
        narrow_init: for a narrower student, "slice" (each teacher tensor cut to the student's
            shape) or "random" (the architecture's own initialisation).
        seed: for the random initialisation of what is not copied.

    Returns:
        The student, in eval mode like a freshly loaded model; `student.config.distill_layers`
        records which teacher layers it came from.
    """
    if not hasattr(teacher, "config") or not hasattr(teacher, "save_pretrained"):
        raise DistillError(
            f"make_student needs a Hugging Face PreTrainedModel, got {type(teacher).__name__}; "
            "for a SentenceTransformer use make_sentence_student"
        )
    if narrow_init not in ("slice", "random"):
        raise DistillError(f"narrow_init '{narrow_init}' is not one of slice, random")
    path, blocks = find_layers(teacher)
    kept = choose_layers(len(blocks), layers, every, num_layers)
    cfg = copy.deepcopy(teacher.config)
    cfg.num_hidden_layers = len(kept)
    for key in _PER_LAYER_CONFIG_KEYS:
        values = getattr(cfg, key, None)
        if isinstance(values, list) and len(values) == len(blocks):
            setattr(cfg, key, [values[i] for i in kept])
    narrow = hidden_size is not None and hidden_size != teacher.config.hidden_size
    if narrow:
        _narrow_config(cfg, hidden_size, intermediate_size, num_heads)
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        student = type(teacher)(cfg)
    student.config.distill_layers = kept  # saved in config.json: where the student came from
    t_state = teacher.state_dict()
    pattern = re.compile(rf"^{re.escape(path)}\.(\d+)\.")
    new_state = {}
    for key, value in student.state_dict().items():
        m = pattern.match(key)
        src = key if m is None else f"{path}.{kept[int(m.group(1))]}.{key[m.end() :]}"
        if src not in t_state:
            continue  # e.g. buffers the student builds itself
        tv = t_state[src]
        if tv.shape == value.shape:
            new_state[key] = tv.detach().clone()
        elif narrow and narrow_init == "slice" and tv.dim() == value.dim():
            new_state[key] = tv[tuple(slice(0, n) for n in value.shape)].detach().clone()
    if not narrow:
        missing = [k for k in student.state_dict() if k not in new_state]
        if any("weight" in k for k in missing):
            raise DistillError(f"could not copy {len(missing)} tensors into the student (e.g. {missing[:3]})")
    student.load_state_dict(new_state, strict=False)
    if getattr(teacher.config, "tie_word_embeddings", False) and hasattr(student, "tie_weights"):
        student.tie_weights()
    return student.eval()


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
