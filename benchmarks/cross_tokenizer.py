"""Distillation across tokenizers on Debian's fortunes: bits per character of a small causal-LM student.

    python benchmarks/cross_tokenizer.py                     # settings from recipes/cross_tokenizer.yaml
    python benchmarks/cross_tokenizer.py --teacher-steps 40 --student-steps 20 --val 50   # quick look

Tokenizers trained here on the training split (`distill.data.text.train_tokenizer`, byte-level
BPE): the teacher's with `--teacher-vocab` (8k) entries, the student's with `--student-vocab`
(2k), a second teacher's with `--second-vocab` (4k). Teachers: GPT-2 architecture trained from
scratch with `lm_ce`. Students: a smaller GPT-2, the same random initialisation for every run
with one tokenizer, the same steps and texts, all through `distill.nlp.DistillationTrainer`:

- `scratch`: the student (student tokenizer) from the labels only (`lm_ce`).
- `scratch_teacher_tok`: the same architecture with the teacher's tokenizer, from the labels.
- `same_tok_fkl`: that student distilled with `fkl` from the teacher (one tokenizer: the ceiling).
- `uld` / `uld_store`: the student distilled with `uld` (paper's index pairing), teacher online /
  from the store written once by `write_cross_store`.
- `aligned` / `aligned_store`: the same with `aligned_kd` (character alignment + token map).
- `aligned_prefix`: `aligned_kd` with the "prefix" token map (each teacher token to the first
  student token of its spelling), online.
- `two_teachers`: `aligned_kd` from the 8k teacher and from the 4k teacher, weight 0.5 each.

Each distilled run uses divergence + `--ce-weight` x `lm_ce`. Every text starts with a bos token
(eos, as GPT-2) and ends with eos, so every character of a held-out text is predicted, whatever
the tokenizer: bits per character = Σ token NLL / ln 2 / Σ (characters + 1 for the end), over the
`--val` held-out fortunes (the tokenizer-independent metric; per-token perplexity is not).

Speed: per-step time of the online teacher vs the store, measured apart from training: for each
of the two, `--timing-steps` full steps (teacher or store lookup, student forward, loss, backward)
on the same batches, best of 3 rounds with the two timed in turn.
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

import torch
from bench_recipe import parse_args

LOSS_NAMES = {
    "scratch": "lm_ce",
    "scratch_teacher_tok": "lm_ce",
    "same_tok_fkl": "fkl",
    "uld": "uld",
    "uld_store": "uld",
    "aligned": "aligned_kd",
    "aligned_store": "aligned_kd",
    "aligned_prefix": "aligned_kd, prefix map",
    "two_teachers": "aligned_kd x 2",
}
RUNS = (
    "scratch",
    "scratch_teacher_tok",
    "same_tok_fkl",
    "uld",
    "uld_store",
    "aligned",
    "aligned_store",
    "aligned_prefix",
    "two_teachers",
)


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--student-texts", type=int, default=0, help="texts the students see (0: steps x batch)")
    ap.add_argument("--val", type=int, default=300)
    ap.add_argument("--teacher-vocab", type=int, default=8000)
    ap.add_argument("--second-vocab", type=int, default=4000)
    ap.add_argument("--student-vocab", type=int, default=2000)
    ap.add_argument("--max-length", type=int, default=64, help="student tokens per training text")
    ap.add_argument("--teacher-max-length", type=int, default=64, help="teacher tokens per training text")
    ap.add_argument("--eval-length", type=int, default=192, help="tokens per held-out text (positions)")
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--teacher-steps", type=int, default=400)
    ap.add_argument("--student-steps", type=int, default=150)
    ap.add_argument("--teacher-width", type=int, default=128)
    ap.add_argument("--teacher-layers", type=int, default=3)
    ap.add_argument("--student-width", type=int, default=64)
    ap.add_argument("--student-layers", type=int, default=1)
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument("--ce-weight", type=float, default=0.5)
    ap.add_argument(
        "--k", type=int, default=32, help="teacher probabilities kept per token (online and store)"
    )
    ap.add_argument("--runs", default=",".join(RUNS))
    ap.add_argument("--timing-steps", type=int, default=10)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", default="runs/cross_tokenizer")
    ap.add_argument("--seed", type=int, default=0)
    return ap


@torch.no_grad()
def bits_per_char(model, tok, texts, length: int, batch: int = 32) -> float:
    """Σ NLL over every predicted token / ln 2 / Σ predicted characters (+1 per end token)."""
    from distill.nlp.align import token_offsets
    from distill.nlp.collate import pad_batch

    model.eval()
    nll, chars = 0.0, 0
    for i in range(0, len(texts), batch):
        part = texts[i : i + batch]
        ids, offs = token_offsets(tok, part, length, add_eos=True, add_bos=True)
        enc = pad_batch(ids, ids, tok.pad_token_id)
        logits = model(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"]).logits.float()
        logp = torch.log_softmax(logits[:, :-1], dim=-1)
        tgt = enc["input_ids"][:, 1:]
        keep = enc["attention_mask"][:, 1:].bool()
        nll -= float(logp.gather(-1, tgt[..., None]).squeeze(-1)[keep].sum())
        for o in offs:
            ends = [e for _, e in o if e >= 0]
            chars += max(ends) + (1 if o[-1] == (-1, -1) else 0)  # text cut at `length`: what was fed
    return nll / math.log(2) / max(chars, 1)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(build_parser(), "cross_tokenizer", argv)
    torch.set_num_threads(args.threads)

    import transformers

    from distill import Objective
    from distill.data.text import fortunes, split_texts, train_tokenizer
    from distill.losses.cross_tokenizer import ULD, AlignedKD
    from distill.losses.sequence import ForwardKL, LMCrossEntropy
    from distill.nlp import DistillationTrainer
    from distill.nlp.align import CrossTokenizerCollator
    from distill.nlp.cross import (
        CachedCrossTokenizerTeacher,
        CrossTeachers,
        CrossTokenizerTeacher,
        write_cross_store,
    )
    from distill.outputs import Batch, Outputs

    t_start = time.time()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    train, val = split_texts(fortunes(), val_fraction=0.05, seed=args.seed)
    val = val[: args.val]
    n_student = args.student_texts or args.student_steps * args.batch
    student_texts = train[:n_student]
    t0 = time.time()
    tok_t = train_tokenizer(train, vocab_size=args.teacher_vocab, kind="bpe")
    tok_2 = train_tokenizer(train, vocab_size=args.second_vocab, kind="bpe")
    tok_s = train_tokenizer(train, vocab_size=args.student_vocab, kind="bpe")
    print(
        f"fortunes: train {len(train)} (students see {len(student_texts)}), held-out {len(val)}; "
        f"BPE vocabularies: teacher {len(tok_t)}, second teacher {len(tok_2)}, student {len(tok_s)} "
        f"({time.time() - t0:.0f} s)",
        flush=True,
    )

    def gpt2(tok, width, layers, seed):
        cfg = transformers.GPT2Config(
            vocab_size=len(tok),
            n_embd=width,
            n_layer=layers,
            n_head=4,
            n_positions=max(args.eval_length, args.max_length, args.teacher_max_length),
            bos_token_id=tok.eos_token_id,
            eos_token_id=tok.eos_token_id,
            pad_token_id=tok.pad_token_id,
            resid_pdrop=0.0,
            embd_pdrop=0.0,
            attn_pdrop=0.0,
        )
        torch.manual_seed(seed)
        return transformers.GPT2LMHeadModel(cfg)

    def train_model(model, objective, steps, texts, collator, teacher=None, name="run"):
        targs = transformers.TrainingArguments(
            str(out / f"hf_{name}"),
            max_steps=steps,
            per_device_train_batch_size=args.batch,
            learning_rate=args.lr,
            warmup_steps=max(1, steps // 20),
            lr_scheduler_type="cosine",
            weight_decay=0.01,
            logging_steps=max(1, steps // 3),
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
            train_dataset=texts,
            data_collator=collator,
            teacher=teacher,
            objective=objective,
        )
        t0 = time.time()
        trainer.train()
        return time.time() - t0

    def objective(term):
        if term is None:
            return Objective({"ce": LMCrossEntropy()})
        terms = term if isinstance(term, dict) else {"kd": term}
        weights = {n: 1.0 / len(terms) for n in terms}
        terms["ce"], weights["ce"] = LMCrossEntropy(), args.ce_weight
        return Objective(terms, weights=weights)

    coll_s = CrossTokenizerCollator(tok_s, max_length=args.max_length, add_bos=True)
    coll_t = CrossTokenizerCollator(tok_t, max_length=args.max_length, add_bos=True)
    rows = []

    teachers = {}
    for name, tok, seed in (("teacher", tok_t, 1), ("second_teacher", tok_2, 3)):
        if name == "second_teacher" and "two_teachers" not in args.runs:
            continue
        m = gpt2(tok, args.teacher_width, args.teacher_layers, args.seed + seed)
        coll = CrossTokenizerCollator(tok, max_length=args.teacher_max_length, add_bos=True)
        secs = train_model(m, objective(None), args.teacher_steps, train, coll, name=name)
        m.eval().requires_grad_(False)
        teachers[name] = m
        rows.append(
            {
                "name": name,
                "tokenizer": f"BPE {len(tok)}",
                "params": sum(p.numel() for p in m.parameters()),
                "bpc": round(bits_per_char(m, tok, val, args.eval_length), 4),
                "steps": args.teacher_steps,
                "train_seconds": round(secs),
            }
        )
        print(json.dumps(rows[-1]), flush=True)
    teacher = teachers["teacher"]

    def online(name="teacher", tok=tok_t, mode="exact"):
        return CrossTokenizerTeacher(
            teachers[name],
            tok,
            tok_s,
            k=args.k,
            max_length=args.teacher_max_length,
            name=name,
            add_bos=True,
            mode=mode,
        )

    store_path = out / "teacher_store"
    store_info = {}
    if any(r.endswith("_store") for r in args.runs.split(",")):
        t0 = time.time()
        man = write_cross_store(
            store_path,
            teacher,
            tok_t,
            student_texts,
            k=args.k,
            max_length=args.teacher_max_length,
            add_bos=True,
        )
        store_info = {
            "seconds": round(time.time() - t0, 1),
            "bytes_per_token": man["bytes_per_token"],
            "tokens": man["tokens"],
            "mib": round(man["bytes"] / 2**20, 2),
        }

    def cached():
        return CachedCrossTokenizerTeacher(store_path, tok_s, teacher=teacher, name="teacher")

    specs = {
        "scratch": (tok_s, coll_s, None, None),
        "scratch_teacher_tok": (tok_t, coll_t, None, None),
        "same_tok_fkl": (tok_t, coll_t, ForwardKL(), lambda: teacher),
        "uld": (tok_s, coll_s, ULD(), online),
        "uld_store": (tok_s, coll_s, ULD(), cached),
        "aligned": (tok_s, coll_s, AlignedKD(), online),
        "aligned_store": (tok_s, coll_s, AlignedKD(), cached),
        "aligned_prefix": (tok_s, coll_s, AlignedKD(), lambda: online(mode="prefix")),
        "two_teachers": (
            tok_s,
            coll_s,
            {"kd_8k": AlignedKD(teacher="teacher"), "kd_4k": AlignedKD(teacher="second_teacher")},
            lambda: CrossTeachers(online(), online("second_teacher", tok_2)),
        ),
    }
    failed = []
    for name in [r for r in args.runs.split(",") if r]:
        tok, coll, term, make_teacher = specs[name]
        try:
            # the same initialisation for every run with one tokenizer
            student = gpt2(tok, args.student_width, args.student_layers, args.seed + 2)
            secs = train_model(
                student,
                objective(term),
                args.student_steps,
                student_texts,
                coll,
                teacher=make_teacher() if make_teacher else None,
                name=name,
            )
            rows.append(
                {
                    "name": name,
                    "tokenizer": f"BPE {len(tok)}",
                    "loss": LOSS_NAMES[name],
                    "params": sum(p.numel() for p in student.parameters()),
                    "bpc": round(bits_per_char(student, tok, val, args.eval_length), 4),
                    "steps": args.student_steps,
                    "train_seconds": round(secs),
                    "s_per_step": round(secs / args.student_steps, 3),
                }
            )
        except Exception as e:  # one broken row must not lose the others' numbers
            failed.append(name)
            rows.append({"name": name, "tokenizer": f"BPE {len(tok)}", "error": f"{type(e).__name__}: {e}"})
        print(json.dumps(rows[-1]), flush=True)

    # Per-step time, online teacher vs store, on the same batches (timed in turn, best of 3).
    timing = {}
    if store_info and args.timing_steps:
        batches = [
            coll_s(student_texts[i * args.batch : (i + 1) * args.batch]) for i in range(args.timing_steps)
        ]
        student = gpt2(tok_s, args.student_width, args.student_layers, args.seed + 2)
        term = AlignedKD()
        sources = {"online": online(), "store": cached()}
        best = dict.fromkeys(sources, float("inf"))
        for _ in range(3):
            for key, src in sources.items():
                t0 = time.perf_counter()
                for data in batches:
                    batch = Batch(inputs=data, targets=data["labels"])
                    t_out = src(batch)
                    logits = student(
                        input_ids=data["input_ids"], attention_mask=data["attention_mask"]
                    ).logits
                    loss = term(Outputs(logits=logits), t_out, batch)
                    loss.backward()
                best[key] = min(best[key], (time.perf_counter() - t0) / len(batches))
        timing = {f"{k}_ms_per_step": round(v * 1000, 1) for k, v in best.items()}
        timing["store_speedup"] = round(best["online"] / best["store"], 2)

    by = {r["name"]: r for r in rows if "bpc" in r}
    gaps = {}
    if "scratch" in by and "same_tok_fkl" in by:
        gap = by["scratch"]["bpc"] - by["same_tok_fkl"]["bpc"]
        for r in by.values():
            if r["name"] in (
                "uld",
                "uld_store",
                "aligned",
                "aligned_store",
                "aligned_prefix",
                "two_teachers",
            ):
                r["gap_closed"] = round((by["scratch"]["bpc"] - r["bpc"]) / gap, 3) if gap else None
        gaps = {"scratch_minus_ceiling_bpc": round(gap, 4)}
    summary = {
        "command": "benchmarks/cross_tokenizer.py",
        "args": vars(args),
        "rows": rows,
        "store": store_info,
        "timing": timing,
        **gaps,
        "wall_seconds": round(time.time() - t_start),
    }
    (out / "summary.json").write_text(json.dumps(summary, indent=1))
    print("\n| model | tokenizer | loss | params | held-out bits/char | gap closed | train s |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    for r in by.values():
        print(
            f"| {r['name']} | {r['tokenizer']} | {r.get('loss', 'lm_ce')} | {r['params'] / 1e6:.2f}M | "
            f"{r['bpc']:.4f} | {r.get('gap_closed', '')} | {r['train_seconds']} |"
        )
    print(f"store: {store_info}\ntiming: {timing}\nwall: {summary['wall_seconds']} s")
    if failed:
        print(f"failed rows: {', '.join(failed)} (errors in summary.json)")
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
