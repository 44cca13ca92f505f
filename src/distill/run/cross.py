"""A recipe whose teacher and student have different tokenizers (`distill run`, `distill check`).

A recipe is a cross-tokenizer recipe when its objective has a term that reads the teacher through
byte-aligned spans (`aligned_kd`, `uld`: `needs_texts`). Then:

- the data gives raw texts and byte offsets (`data.init_args.offsets: true`, filled here for the
  builders that take it: `text`, `chat_prompts`), collated for the student by
  `CrossTokenizerCollator` in the data's tokenizer, which is the student's;
- the teacher reads the same texts in its own tokenizer: live (`CrossTokenizerTeacher`), from a
  store written once and resumable (`teacher.cache`: written over every split's texts when
  missing, then served by `CachedCrossTokenizerTeacher`), or from a served model's top-k
  log-probabilities (`teacher.served`, `ServedTeacher`);
- the teacher's summary row is measured on the same texts in its own tokenizer, so that
  `bits_per_char` compares the two sides (per-token perplexity does not compare across tokenizers);
- `distill check` prints how well the pair fits (`tokenizer_fit`).
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

from torch import nn

from distill.data.bundle import DataBundle
from distill.errors import ConfigError
from distill.registry import LOSSES

# Builders that give texts and byte offsets when asked (`offsets: true`).
OFFSET_DATA = ("text", "chat_prompts", "served_responses")


def cross_terms(cfg) -> list[str]:
    """The objective's terms that read the teacher through byte-aligned spans (any tokenizer)."""
    out = []
    for n, t in cfg.objective.terms.items():
        try:
            cls = LOSSES.resolve(t.class_path) if t.class_path else LOSSES.get(t.name)
        except Exception:  # noqa: BLE001 - a wrong name is refused where the objective is built
            continue
        if getattr(cls, "needs_texts", False):
            out.append(n)
    return out


def is_cross(cfg) -> bool:
    return bool(cross_terms(cfg))


def offset_data(data: DataBundle) -> bool:
    """Whether the data are texts with byte offsets (in the student's tokenizer, maybe not the teacher's)."""
    return bool((data.meta or {}).get("offsets"))


def resolve_cross(cfg):
    """What a cross-tokenizer recipe implies, filled in (a copy when anything changes): its data
    gives texts and byte offsets; a served teacher (`teacher.served`, its keys checked here) fills
    the `served_responses` data (file, prompt template, the section for an endpoint), the student's
    task (causal_lm) and the perplexity evaluator."""
    served = cfg.teacher.served
    if not is_cross(cfg) and served is None:
        return cfg
    if is_cross(cfg) and cfg.teachers:
        raise ConfigError(
            f"objective terms {', '.join(cross_terms(cfg))} align the student's tokens with one teacher's; "
            "teachers: (an ensemble) averages outputs over one vocabulary. Give one teacher: per run, or "
            "teachers that share the student's tokenizer with fkl/kd terms"
        )
    cfg = cfg.model_copy(deep=True)
    if served is not None:
        from distill.run.served import served_config

        spec = served_config(served)
        if not is_cross(cfg):
            raise ConfigError(
                "teacher.served: a served teacher gives top-k log-probabilities of its own tokens; distil "
                "with aligned_kd or uld (objective.terms)"
            )
        if cfg.data.name == "served_responses":
            args = cfg.data.init_args
            args.setdefault("path", spec.file)
            args.setdefault("prompt_template", spec.prompt_template)
            args.setdefault("served", spec.model_dump())
        if cfg.student.name == "hf":
            cfg.student.init_args.setdefault("task", "causal_lm")
        if cfg.evaluator is None:
            from distill.run.config import Component

            cfg.evaluator = Component(name="perplexity")
    if cfg.data.name in OFFSET_DATA:
        cfg.data.init_args.setdefault("offsets", True)
    return cfg


def teacher_tokenizer(cfg, data: DataBundle):
    """The teacher's own tokenizer (an `hf` teacher with a path), else the data's."""
    args = cfg.teacher.init_args if cfg.teacher.name == "hf" else {}
    if not args.get("path"):
        return data.tokenizer
    from distill.nlp.hf_models import load_tokenizer

    tok = load_tokenizer(str(args["path"]), args.get("gguf_file"))
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    return tok


def teacher_data(cfg, data: DataBundle, tok=None) -> DataBundle:
    """The data as the teacher reads it: the same texts collated in the teacher's tokenizer (its
    model is built for that tokenizer; its summary row is measured on it). Unchanged outside a
    cross-tokenizer recipe."""
    if not (is_cross(cfg) or offset_data(data)) or data.tokenizer is None:
        return data
    from distill.nlp.align import CrossTokenizerCollator

    tok = tok or teacher_tokenizer(cfg, data)
    inner = data.collate_fn
    collate = CrossTokenizerCollator(
        tok,
        max_length=getattr(inner, "teacher_max_length", None) or getattr(inner, "max_length", 128),
        add_eos=getattr(inner, "add_eos", True),
        add_bos=getattr(inner, "add_bos", False),
    )
    return dataclasses.replace(data, tokenizer=tok, collate_fn=collate)


def _settings(cfg, data: DataBundle) -> dict[str, Any]:
    inner = data.collate_fn
    if not hasattr(inner, "tokens"):
        raise ConfigError(
            f"objective terms {', '.join(cross_terms(cfg))} read raw texts and byte offsets, which data "
            f"'{cfg.data.name or cfg.data.class_path}' does not give; use one of {', '.join(OFFSET_DATA)} "
            "(data.init_args.offsets: true)"
        )
    return {
        "max_length": getattr(inner, "teacher_max_length", None) or inner.max_length,
        "add_eos": inner.add_eos,
        "add_bos": inner.add_bos,
    }


def cross_teacher(cfg, data: DataBundle, model: nn.Module | None, k: int | None = None, write: bool = True):
    """The teacher a cross-tokenizer recipe distils from: served (`teacher.served`), from its store
    (`teacher.cache`, written first when missing; `write=False`: the live teacher until it
    exists, as `distill check` writes nothing), or live."""
    from distill.nlp.cross import CachedCrossTokenizerTeacher, CrossTokenizerTeacher, write_cross_store

    settings = _settings(cfg, data)
    k = k or cfg.teacher.cross_k
    served = getattr(cfg.teacher, "served", None)
    if served:
        from distill.run.served import served_teacher

        # (an endpoint's answers were fetched by the data, `served_responses`)
        return served_teacher({**served, "endpoint": None}, data.tokenizer)
    elif cfg.teacher.cache and (write or (Path(cfg.teacher.cache) / "manifest.json").is_file()):
        path = Path(cfg.teacher.cache)
        if not (path / "manifest.json").is_file():
            texts = [
                t for ds in (data.train, data.val, data.test) if ds is not None for t in dataset_texts(ds)
            ]
            write_cross_store(
                path, model, teacher_tokenizer(cfg, data), texts, k=k, batch_size=cfg.data.eval_batch_size,
                **settings,
            )  # fmt: skip
        return CachedCrossTokenizerTeacher(path, data.tokenizer, teacher=model, mode=cfg.teacher.cross_map)
    return CrossTokenizerTeacher(
        model, teacher_tokenizer(cfg, data), data.tokenizer, k=k, mode=cfg.teacher.cross_map, **settings
    )


def dataset_texts(ds) -> list[str]:
    """The texts of a dataset of text records (`{"text": ...}` items, as offset data gives)."""
    out = []
    for i in range(len(ds)):
        it = ds[i]
        out.append(it["text"] if isinstance(it, dict) else str(it))
    return out


def tokenizer_fit(teacher_tok, student_tok, texts: list[str], max_length: int = 256) -> dict[str, Any]:
    """How well two tokenizers fit for the cross-tokenizer terms, measured on `texts`.

    - `student_vocab_exact`: share of the student's tokens that are the bytes of a teacher token
      (the mapped KL of `aligned_kd` carries the teacher's probability onto these);
    - `teacher_vocab_mapped`: share of the teacher's tokens that map onto a student token;
    - `teacher_vocab_prefix`: the same with `teacher.cross_map: prefix` (a teacher token the student
      has no token for carried onto the first student token of its spelling);
    - `shared_chars`: characters both vocabularies spell (no common character: refused);
    - `aligned_positions`: share of the student's positions on `texts` where the teacher has read
      exactly the same bytes (where `aligned_kd` compares distributions; elsewhere ULD).
    A tokenizer pair with no common character is refused in one line (by `vocab_map`).
    """
    from distill.nlp.align import TokenBytes, _chars, align_positions, vocab_map

    t, s = TokenBytes(teacher_tok, "teacher"), TokenBytes(student_tok, "student")
    vmap = vocab_map(teacher_tok, student_tok)  # refuses a pair with no common character
    s_emitted = {i for i, p in enumerate(s.pieces) if p}
    mapped = {int(i) for i in vmap.tolist() if i >= 0} & s_emitted
    real = [i for i, p in enumerate(t.pieces) if p]

    def carried(m) -> float:  # share of the teacher's real tokens a map sends to a student token
        ids = m.tolist()
        return sum(1 for i in real if ids[i] >= 0) / max(len(real), 1)

    aligned = total = 0
    if texts:
        s_ids, s_ends = s.encode(texts, max_length, add_eos=False)
        t_ids, t_ends = t.encode(texts, max_length * 4, add_eos=False)
        for se, te, ti in zip(s_ends, t_ends, t_ids):
            a, _ = align_positions(se, te, len(ti))
            aligned += sum(1 for x in a if x >= 0)
            total += len(a)
    shared = _chars(t.pieces) & _chars(s.pieces)
    same = teacher_tok.get_vocab() == student_tok.get_vocab()
    return {
        "same_tokenizer": same,
        "teacher_vocab": len(t.pieces),
        "student_vocab": len(s.pieces),
        "student_vocab_exact": len(mapped) / max(len(s_emitted), 1),
        "teacher_vocab_mapped": carried(vmap),
        "teacher_vocab_prefix": carried(vocab_map(teacher_tok, student_tok, mode="prefix")),
        "shared_chars": len(shared),
        "aligned_positions": aligned / max(total, 1),
        "texts": len(texts),
    }


def fit_line(fit: dict[str, Any], terms: list[str]) -> str:
    """`distill check`'s line: the pair's measures and which terms fit it."""
    head = (
        f"tokenizers: teacher {fit['teacher_vocab']:,} tokens, student {fit['student_vocab']:,}; "
        f"{fit['student_vocab_exact']:.1%} of the student's vocabulary maps exactly onto the teacher's "
        f"({fit['teacher_vocab_mapped']:.1%} of the teacher's onto the student's, "
        f"{fit['teacher_vocab_prefix']:.1%} with teacher.cross_map: prefix), {fit['shared_chars']} shared "
        f"characters, {fit['aligned_positions']:.1%} of student positions aligned on {fit['texts']} texts"
    )
    if fit["same_tokenizer"]:
        advice = (
            "the same tokenizer: every term fits; fkl / rkl / jsd on token ids are cheaper than aligned_kd"
        )
    elif fit["aligned_positions"] >= 0.5 and fit["student_vocab_exact"] >= 0.3:
        advice = "aligned_kd fits (most positions align, the vocabularies overlap); uld fits any pair"
    else:
        advice = (
            "few positions align or few tokens map: aligned_kd falls back to ULD on most positions; "
            "uld (positions: index) fits any pair"
        )
    if not fit["same_tokenizer"] and fit["teacher_vocab_mapped"] < 0.5 < fit["teacher_vocab_prefix"]:
        advice += (
            "; most teacher tokens are no student token: teacher.cross_map: prefix carries their "
            "probability onto the first student token of their spelling"
        )
    return f"{head}; {advice} (terms here: {', '.join(terms)})"


def served_description(cfg) -> dict[str, Any]:
    """`distill check`'s teacher line for a served teacher (no model: its responses file)."""
    served = cfg.teacher.served
    return {
        "spec": f"served {served.get('file')}"
        + (f" (endpoint {served['endpoint']})" if served.get("endpoint") else ""),
        "class": "ServedTeacher",
        "params": 0,
        "trainable": 0,
        "source": f"top-{served.get('k') or served.get('top_logprobs', 20)} log-probabilities per token",
    }


def fit_report(cfg, data: DataBundle, batch, teacher) -> str:
    """`distill check`'s line on the tokenizer pair, measured on the first batch's texts; for a
    served teacher, its responses, the mass its top-k keeps and how many of its tokens map."""
    if cfg.teacher.served is not None:
        from distill.nlp.cross import format_mass_kept

        info = teacher.summary()
        mapped = float((teacher.map >= 0).float().mean()) if len(teacher.map) else 0.0
        return (
            f"served teacher: {info['responses']:,} responses, {info['tokens']:,} tokens, k={info['k']}; "
            f"{mapped:.1%} of its distinct tokens map exactly onto the student's; "
            + format_mass_kept(info["mass_kept"])
            + f" (terms here: {', '.join(cross_terms(cfg))})"
        )
    t_data = teacher_data(cfg, data)
    fit = tokenizer_fit(t_data.tokenizer, data.tokenizer, list(batch.inputs["text"]))
    return fit_line(fit, cross_terms(cfg))
