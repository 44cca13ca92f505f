"""Language: students cut from teachers, Hugging Face adapters, generation-based batches, the
embedding cache and a `transformers.Trainer` drop-in. May import losses, objective, teachers and below.

`transformers` and `sentence-transformers` (the `[nlp]` extra) are imported only by the
functions that need them, so importing this package is cheap.
"""

from __future__ import annotations

import importlib

_EXPORTS = {
    "make_student": "distill.nlp.students",
    "make_sentence_student": "distill.nlp.students",
    "save_student": "distill.nlp.students",
    "choose_layers": "distill.nlp.students",
    "find_layers": "distill.nlp.students",
    "block_importance": "distill.nlp.students",
    "width_importance": "distill.nlp.students",
    "HFAdapter": "distill.nlp.adapters",
    "hf_adapter": "distill.nlp.adapters",
    "sentence_adapter": "distill.nlp.adapters",
    "encode": "distill.nlp.adapters",
    "mean_pool": "distill.nlp.adapters",
    "EmbeddingCache": "distill.nlp.cache",
    "CachedEmbeddingTeacher": "distill.nlp.cache",
    "model_fingerprint": "distill.nlp.cache",
    "check_same_vocab": "distill.nlp.vocab",
    "check_model_vocab": "distill.nlp.vocab",
    "SentenceCollator": "distill.nlp.collate",
    "LMCollator": "distill.nlp.collate",
    "generate_batch": "distill.nlp.generation",
    "OnPolicyBatches": "distill.nlp.generation",
    "sequence_kd_data": "distill.nlp.generation",
    "chat_metrics": "distill.nlp.chat_eval",
    "greedy_answers": "distill.nlp.chat_eval",
    "generation_speed": "distill.nlp.chat_eval",
    "DistillationTrainer": "distill.nlp.hf_trainer",
    "CrossTokenizerCollator": "distill.nlp.align",
    "vocab_map": "distill.nlp.align",
    "CrossTokenizerTeacher": "distill.nlp.cross",
    "CachedCrossTokenizerTeacher": "distill.nlp.cross",
    "CrossTeachers": "distill.nlp.cross",
    "write_cross_store": "distill.nlp.cross",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'distill.nlp' has no attribute '{name}'")
