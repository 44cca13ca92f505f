"""A small causal-LM teacher trained on the fortunes corpus, then a ~4x smaller student distilled
with each token-level loss (CPU).

    python benchmarks/lm_fortunes.py                         # full run
    python benchmarks/lm_fortunes.py --teacher-steps 50 --student-steps 20 --val 100   # quick look

Tokenizer: byte-level BPE (vocab 2000) trained here on the training split (`train_tokenizer`).
Teacher: GPT-2 architecture (4 layers, width 192), trained from scratch with `lm_ce`.
Students: GPT-2 (2 layers, width 96), the same random initialisation for every run, trained for
the same number of steps: from the labels only (`scratch`, `lm_ce`), or from the teacher with one
divergence each (`fkl`, `rkl`, `jsd` beta 0.5, `skl` / `srkl` alpha 0.1, `tvd`) plus `lm_ce`
with weight `--ce-weight`. All training runs through `distill.nlp.DistillationTrainer`.

Reported: validation perplexity (exp of the mean next-token cross-entropy over all held-out
tokens), inference tokens/s (forward passes over the held-out set, batch 32, best of 3 rounds with
all models timed in turn) and training tokens/s.
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

import torch
from bench_recipe import parse_args

LOSSES = ("fkl", "rkl", "jsd", "skl", "srkl", "tvd")


@torch.no_grad()
def perplexity(model, batches) -> float:
    from distill.losses.sequence import token_cross_entropy

    model.eval()
    total, count = 0.0, 0
    for b in batches:
        logits = model(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits
        n = int(((b["labels"][:, 1:] != -100) & b["attention_mask"][:, 1:].bool()).sum())
        total += float(token_cross_entropy(logits, b["labels"], attention_mask=b["attention_mask"])) * n
        count += n
    return math.exp(total / max(count, 1))


@torch.no_grad()
def tokens_per_s(models: dict, batches, rounds=3) -> dict:
    n_tokens = sum(int(b["attention_mask"].sum()) for b in batches)
    best = dict.fromkeys(models, float("inf"))
    for _ in range(rounds):
        for name, m in models.items():
            m.eval()
            t0 = time.perf_counter()
            for b in batches:
                m(input_ids=b["input_ids"], attention_mask=b["attention_mask"])
            best[name] = min(best[name], time.perf_counter() - t0)
    return {k: n_tokens / v for k, v in best.items()}


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--train", type=int, default=0, help="training texts (0: all but the held-out ones)")
    ap.add_argument("--val", type=int, default=500)
    ap.add_argument("--vocab", type=int, default=2000)
    ap.add_argument("--max-length", type=int, default=64)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--teacher-steps", type=int, default=800)
    ap.add_argument("--student-steps", type=int, default=300)
    ap.add_argument("--teacher-width", type=int, default=192)
    ap.add_argument("--teacher-layers", type=int, default=4)
    ap.add_argument("--student-width", type=int, default=96)
    ap.add_argument("--student-layers", type=int, default=2)
    ap.add_argument("--lr", type=float, default=2e-3)
    ap.add_argument("--ce-weight", type=float, default=0.5)
    ap.add_argument("--losses", default=",".join(LOSSES))
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", default="runs/lm_fortunes")
    ap.add_argument("--seed", type=int, default=0)
    return ap


def main(argv: list[str] | None = None) -> int:
    args = parse_args(build_parser(), "lm_fortunes", argv)
    torch.set_num_threads(args.threads)

    import transformers

    from distill import Objective
    from distill.data.text import fortunes, split_texts, train_tokenizer
    from distill.losses.sequence import LMCrossEntropy
    from distill.nlp import DistillationTrainer, LMCollator, check_same_vocab
    from distill.registry import LOSSES as REG

    t_start = time.time()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    texts = fortunes()
    train, val = split_texts(texts, val_fraction=0.05, seed=args.seed)
    val = val[: args.val]
    if args.train:
        train = train[: args.train]
    tok = train_tokenizer(train, vocab_size=args.vocab, kind="bpe")
    tok.save_pretrained(str(out / "tokenizer"))
    coll = LMCollator(tok, max_length=args.max_length)
    val_batches = [coll(val[i : i + args.batch]) for i in range(0, len(val), args.batch)]
    n_train_tokens = sum(len(tok(t)["input_ids"]) + 1 for t in train[:500]) / min(len(train), 500)
    print(
        f"fortunes: train {len(train)}, held-out {len(val)}; BPE vocab {len(tok)}; "
        f"~{n_train_tokens:.0f} tokens per text",
        flush=True,
    )

    def gpt2(width, layers, seed):
        cfg = transformers.GPT2Config(
            vocab_size=len(tok),
            n_embd=width,
            n_layer=layers,
            n_head=4,
            n_positions=args.max_length,
            bos_token_id=tok.eos_token_id,
            eos_token_id=tok.eos_token_id,
            pad_token_id=tok.pad_token_id,
            resid_pdrop=0.0,
            embd_pdrop=0.0,
            attn_pdrop=0.0,
        )
        torch.manual_seed(seed)
        return transformers.GPT2LMHeadModel(cfg)

    def train_model(model, objective, steps, teacher=None, name="run"):
        targs = transformers.TrainingArguments(
            str(out / f"hf_{name}"),
            max_steps=steps,
            per_device_train_batch_size=args.batch,
            learning_rate=args.lr,
            warmup_steps=max(1, steps // 20),
            lr_scheduler_type="cosine",
            weight_decay=0.01,
            logging_steps=max(1, steps // 5),
            report_to=[],
            save_strategy="no",
            remove_unused_columns=False,
            use_cpu=True,
            seed=args.seed,
            disable_tqdm=True,
            dataloader_num_workers=0,
        )
        model.train()
        trainer = DistillationTrainer(
            model=model,
            args=targs,
            train_dataset=train,
            data_collator=coll,
            teacher=teacher,
            objective=objective,
        )
        t0 = time.time()
        trainer.train()
        secs = time.time() - t0
        return secs, steps * args.batch * n_train_tokens / secs

    teacher = gpt2(args.teacher_width, args.teacher_layers, args.seed + 1)
    t_secs, t_tps = train_model(
        teacher, Objective({"ce": LMCrossEntropy()}), args.teacher_steps, name="teacher"
    )
    teacher.eval().requires_grad_(False)
    check_same_vocab(tok, tok)  # one tokenizer for both sides, by construction
    rows = [
        {
            "name": "teacher",
            "params": sum(p.numel() for p in teacher.parameters()),
            "perplexity": round(perplexity(teacher, val_batches), 2),
            "steps": args.teacher_steps,
            "train_seconds": round(t_secs),
            "train_tokens_per_s": round(t_tps),
        }
    ]
    print(json.dumps(rows[-1]), flush=True)
    models = {"teacher": teacher}

    runs = [("student_scratch", None)] + [(f"student_{k}", k) for k in args.losses.split(",") if k]
    for name, loss in runs:
        student = gpt2(args.student_width, args.student_layers, args.seed + 2)  # same init for all runs
        if loss is None:
            objective = Objective({"ce": LMCrossEntropy()})
        else:
            terms = {loss: REG.build(loss)}
            weights = {loss: 1.0}
            if args.ce_weight > 0:
                terms["ce"], weights["ce"] = LMCrossEntropy(), args.ce_weight
            objective = Objective(terms, weights=weights)
        secs, tps = train_model(
            student, objective, args.student_steps, teacher=teacher if loss else None, name=name
        )
        rows.append(
            {
                "name": name,
                "loss": loss or "lm_ce",
                "params": sum(p.numel() for p in student.parameters()),
                "perplexity": round(perplexity(student, val_batches), 2),
                "steps": args.student_steps,
                "train_seconds": round(secs),
                "train_tokens_per_s": round(tps),
            }
        )
        models[name] = student
        print(json.dumps(rows[-1]), flush=True)

    tps = tokens_per_s({"teacher": teacher, "student": models[runs[0][0]]}, val_batches)
    for r in rows:
        r["tokens_per_s"] = round(tps["teacher" if r["name"] == "teacher" else "student"])
    ratio = rows[0]["params"] / rows[1]["params"]
    summary = {
        "command": "benchmarks/lm_fortunes.py",
        "args": vars(args),
        "rows": rows,
        "param_ratio": round(ratio, 2),
        "wall_seconds": round(time.time() - t_start),
    }
    (out / "summary.json").write_text(json.dumps(summary, indent=1))
    print(f"\nteacher / student parameters: {ratio:.1f}x")
    print("| model | loss | params | val perplexity | inference tokens/s | train tokens/s | train s |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    for r in rows:
        print(
            f"| {r['name']} | {r.get('loss', 'lm_ce')} | {r['params'] / 1e6:.2f}M | {r['perplexity']:.2f} | "
            f"{r['tokens_per_s']} | {r['train_tokens_per_s']} | {r['train_seconds']} |"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
