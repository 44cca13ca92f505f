"""What a recipe with Hugging Face models needs beyond the generic pipeline: defaults filled from
the teacher (tokenizer, task, evaluator), text throughput, and the `student_hf/` model folder."""

from __future__ import annotations

import copy
import json
import shutil
import time
from pathlib import Path
from typing import Any

import torch
from torch import nn

from distill.adapters import Adapter, auto_adapter
from distill.checkpoint import atomic_write_text
from distill.data.bundle import DataBundle
from distill.outputs import as_batch
from distill.registry import EVALUATORS

TEXT_DATA = ("text_classification", "text", "chat", "prompt_response")
# Data a teacher makes (it answers prompts): the recipe's hf teacher is filled in as the answerer.
ANSWERED_DATA = ("chat_prompts",)
# Chat measures on held-out prompts (generation): a recipe asks for it by name.
EVALUATORS.add_lazy("chat", "distill.run.chat.ChatEvaluator")
# The evaluator each task gets when the recipe names none.
TASK_EVALUATORS: dict[str, dict[str, Any]] = {
    "sequence_classification": {"name": "classification"},
    "token_classification": {"name": "classification"},
    "causal_lm": {"name": "perplexity"},
    "masked_lm": {"name": "perplexity", "init_args": {"shift": False}},
    "feature_extraction": {"name": "embedding"},
    "sentence_embedding": {"name": "embedding"},
}
TASK_MONITOR = {"causal_lm": ("perplexity", "min"), "masked_lm": ("perplexity", "min"),
                "sentence_embedding": ("cosine", "max"), "feature_extraction": ("cosine", "max")}  # fmt: skip
TOKEN_TASKS = ("causal_lm", "masked_lm", "token_classification")


def teacher_task(cfg) -> str | None:
    """The task of an `hf` teacher (None for other teachers)."""
    if cfg.teacher.name != "hf":
        return None
    return cfg.teacher.init_args.get("task", "sequence_classification")


def resolve_recipe(cfg):
    """Fills what an `hf` teacher implies and the recipe left out: the data's tokenizer (the
    teacher's), the student's task, the evaluator for the task and the metric to monitor (for any
    recipe scored by the perplexity evaluator: perplexity, lower is better). The
    result is what `config.yaml` records, so a rerun does not depend on these defaults."""
    from distill.run.cross import resolve_cross

    cfg = resolve_cross(cfg)  # a teacher of another tokenizer or a served one: texts with byte offsets
    task = teacher_task(cfg)
    perplexity = cfg.evaluator is not None and cfg.evaluator.name == "perplexity"
    if task is None and not perplexity:
        return cfg
    cfg = cfg.model_copy(deep=True)
    if task is not None:
        t_args = cfg.teacher.init_args
        if cfg.data.name in TEXT_DATA and "tokenizer" not in cfg.data.init_args and t_args.get("path"):
            path, gguf = str(t_args["path"]), t_args.get("gguf_file")
            cfg.data.init_args["tokenizer"] = f"{path.rstrip('/')}/{gguf}" if gguf else path
        if cfg.data.name in ANSWERED_DATA and "teacher" not in cfg.data.init_args and t_args.get("path"):
            cfg.data.init_args["teacher"] = {k: t_args[k] for k in ("path", "gguf_file") if t_args.get(k)}
        if cfg.student.name == "hf":
            cfg.student.init_args.setdefault("task", task)
        if cfg.evaluator is None and task in TASK_EVALUATORS:
            from distill.run.config import Component

            cfg.evaluator = Component(**copy.deepcopy(TASK_EVALUATORS[task]))
    # a language model (any model scored by the perplexity evaluator) keeps its best checkpoint by
    # perplexity, not by its token accuracy
    monitor = TASK_MONITOR.get(task) or (("perplexity", "min") if perplexity else None)
    if monitor is not None:
        metric, mode = monitor
        for tc in (cfg.trainer, cfg.teacher.train):
            if tc is not None and "monitor" not in tc.model_fields_set:
                tc.monitor, tc.monitor_mode = metric, mode
    return cfg


def is_hf(model: nn.Module) -> bool:
    return getattr(model, "distill_task", None) is not None


@torch.no_grad()
def text_speed(
    model: nn.Module,
    data: DataBundle,
    adapter: Adapter | None,
    batch_sizes,
    repeats: int = 20,
    threads: int = 1,
) -> dict[str, float]:
    """Forward latency on the CPU at each batch size (real test items, padded as in evaluation)
    and the throughput it means: tokens/s for language models, sentences/s otherwise."""
    ds = data.test or data.val or data.train
    collate = data.collate_fn
    if ds is None or collate is None or len(ds) == 0:
        return {}
    task = getattr(model, "distill_task", None)
    unit = "tokens" if task in TOKEN_TASKS else "sentences"
    adapter = adapter or auto_adapter
    old = torch.get_num_threads()
    torch.set_num_threads(threads)
    row: dict[str, float] = {}
    try:
        m = copy.deepcopy(model).to("cpu").eval()
        for b in batch_sizes:
            items = [ds[i % len(ds)] for i in range(b)]
            batch = as_batch(collate(items))
            tokens = int(batch.inputs["attention_mask"].sum()) if "attention_mask" in batch.inputs else b
            for _ in range(2):  # warm-up
                adapter(m, batch)
            times = []
            for _ in range(max(3, min(repeats, 20))):
                t0 = time.perf_counter()
                adapter(m, batch)
                times.append(time.perf_counter() - t0)
            p50 = sorted(times)[len(times) // 2]
            row[f"latency_ms_b{b}"] = p50 * 1e3
            row[f"{unit}_per_s_b{b}"] = (tokens if unit == "tokens" else b) / p50
    finally:
        torch.set_num_threads(old)
    return row


def model_card(summary: dict[str, Any], cfg, library: str, row: str = "student_kd") -> str:
    from distill.run.report import table

    rows = summary.get("rows", [])
    kd = next((r for r in rows if r.get("name") == row), {})
    front = {
        "library_name": library,
        "tags": ["distill", "knowledge-distillation"],
        "base_model": str(cfg.teacher.init_args.get("path", "")) or None,
    }
    lines = ["---"] + [f"{k}: {json.dumps(v)}" for k, v in front.items() if v] + ["---", ""]
    lines += [
        f"# {cfg.name}: {'distilled student' if row == 'student_kd' else row}",
        "",
        f"Distilled with `distill run` (recipe `{cfg.name}`, seed {cfg.seed}) from the teacher "
        f"`{cfg.teacher.init_args.get('path', 'trained in the run')}`; objective terms: "
        f"{', '.join(f'{n} ({t.name or t.class_path})' for n, t in cfg.objective.terms.items())}.",
        "",
        "## The run's summary",
        "",
        table(rows),
        "",
        "## This model's row",
        "",
        "```json",
        json.dumps(kd, indent=2),
        "```",
        "",
        "Load it with `"
        + (
            "SentenceTransformer(path)"
            if library == "sentence-transformers"
            else "AutoModelFor...from_pretrained(path)"
        )
        + "`; the recipe is in the run "
        "folder's `config.yaml`.",  # fmt: skip
        "",
    ]
    return "\n".join(lines)


def export_student_hf(
    out: Path, model: nn.Module, data: DataBundle, summary: dict[str, Any], cfg, name: str = "student_hf"
) -> Path | None:
    """Writes `out/student_hf/` (or `name`): the model as `save_pretrained` (or
    SentenceTransformer.save) writes it, the tokenizer, and a model card with the run's summary.
    Written beside and renamed into place, so the folder is whole or absent. A teacher trained in
    the run is written the same way as `teacher_hf/` (what `sequence_kd` data generates with)."""
    if not is_hf(model):
        return None
    final = Path(out) / name
    tmp = final.with_name(f".{name}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    m = copy.deepcopy(model).to("cpu")
    if getattr(model, "distill_task", None) == "sentence_embedding":
        m.save(str(tmp))
        library = "sentence-transformers"
    else:
        m.save_pretrained(str(tmp))
        if data.tokenizer is not None:
            data.tokenizer.save_pretrained(str(tmp))
        library = "transformers"
    row = "teacher" if "teacher" in name else "student_kd"
    atomic_write_text(tmp / "README.md", model_card(summary, cfg, library, row))
    shutil.rmtree(final, ignore_errors=True)
    tmp.rename(final)
    return final
