"""A teacher you can only query: a student distilled from top-k log-probabilities in the OpenAI format.

    python benchmarks/served_teacher.py                    # settings from recipes/served_teacher.yaml
    python benchmarks/served_teacher.py --responses my.jsonl --prompts-file prompts.txt   # your own file
    python benchmarks/served_teacher.py --endpoint http://localhost:8000/v1 --model NAME  # your server

What it does, on Debian's fortunes (`apt-get install fortunes`):

1. The teacher side. With `--responses FILE` given and present, that file is the teacher. With
   `--endpoint URL`, the prompts are asked once there (`fetch_responses`: resumable, one fsynced
   line per answer) into `OUT/responses.jsonl`. Without either, a tiny GPT-2 teacher is trained
   here with its own byte-level BPE tokenizer and *recorded through the same JSON format* (each
   fortune's first words are the prompt, the rest its answer; the top-`--top-logprobs`
   alternatives per token at temperature 1), served by a local `http.server` on 127.0.0.1 and
   fetched from it, so the file is exactly what a server returns.
2. The student has another tokenizer (a BPE of `--student-vocab` entries trained here). Rows, the
   same initialisation, steps and texts (prompt + answer): `labels` (`lm_ce` alone) and `served`
   (`aligned_kd` on the served top-k with its tail bucket + `--ce-weight` x `lm_ce`).
3. Prints the teacher mass the top-k keeps (mean over tokens, at k = 1, 5, 10, 20) and each
   row's bits per character on the held-out answers; writes `OUT/served_teacher.json`.

The default budget is tiny (a smoke run of about a minute on one CPU core): the numbers show the
path works, not how well; the issue's measured comparison is `benchmarks/any_teacher.py`'s job.
"""

from __future__ import annotations

import argparse
import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import torch
from bench_recipe import parse_args
from cross_tokenizer import bits_per_char


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--responses", default="", help="an existing responses file (OpenAI logprobs JSONL)")
    ap.add_argument("--endpoint", default="", help="an OpenAI-compatible server to fetch the answers from")
    ap.add_argument("--model", default="", help="the model name to ask the endpoint for")
    ap.add_argument("--prompts-file", default="", help="one prompt per line (with --endpoint)")
    ap.add_argument("--top-logprobs", type=int, default=20, help="alternatives per token asked for (<= 20)")
    ap.add_argument("--k", type=int, default=20, help="alternatives per token used (<= --top-logprobs)")
    ap.add_argument("--prompt-template", default="{prompt}", help="the student's text before each answer")
    ap.add_argument("--prompt-words", type=int, default=4, help="a fortune's first words are its prompt")
    ap.add_argument("--texts", type=int, default=256, help="fortunes the teacher answers (training texts)")
    ap.add_argument("--val", type=int, default=100)
    ap.add_argument("--teacher-vocab", type=int, default=1000)
    ap.add_argument("--student-vocab", type=int, default=600)
    ap.add_argument("--max-length", type=int, default=64)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--teacher-steps", type=int, default=60)
    ap.add_argument("--student-steps", type=int, default=30)
    ap.add_argument("--teacher-width", type=int, default=64)
    ap.add_argument("--student-width", type=int, default=32)
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument("--ce-weight", type=float, default=0.5)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", default="runs/served_teacher")
    ap.add_argument("--seed", type=int, default=0)
    return ap


class _Recorded(BaseHTTPRequestHandler):
    """Answers /v1/chat/completions with recorded responses, by the last user message."""

    answers: dict = {}

    def do_POST(self):  # noqa: N802 (http.server's name)
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        resp = self.answers.get(body["messages"][-1]["content"])
        data = json.dumps(resp if resp is not None else {"error": "unknown prompt"}).encode()
        self.send_response(200 if resp is not None else 404)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, *a):
        pass


def main(argv: list[str] | None = None) -> int:
    args = parse_args(build_parser(), "served_teacher", argv)
    torch.set_num_threads(args.threads)

    import transformers

    from distill import Objective
    from distill.data.text import fortunes, split_texts, train_tokenizer
    from distill.losses.cross_tokenizer import AlignedKD
    from distill.losses.sequence import LMCrossEntropy
    from distill.nlp import DistillationTrainer
    from distill.nlp.align import CrossTokenizerCollator
    from distill.nlp.served import format_mass_kept, record_model
    from distill.run.served import served_teacher

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    train, val = split_texts(fortunes(), val_fraction=0.05, seed=args.seed)
    train, val = train[: args.texts], val[: args.val]

    def split(text: str) -> tuple[str, str]:
        words = text.split(" ")
        n = min(args.prompt_words, max(len(words) - 1, 1))
        return " ".join(words[:n]) + " ", " ".join(words[n:])

    def gpt2(tok, width, seed):
        cfg = transformers.GPT2Config(
            vocab_size=len(tok),
            n_embd=width,
            n_layer=1,
            n_head=2,
            n_positions=max(args.max_length, 256),
            bos_token_id=tok.eos_token_id,
            eos_token_id=tok.eos_token_id,
            pad_token_id=tok.pad_token_id,
        )
        torch.manual_seed(seed)
        return transformers.GPT2LMHeadModel(cfg)

    def fit(model, objective, steps, texts, collator, teacher=None, name="run"):
        targs = transformers.TrainingArguments(
            str(out / f"hf_{name}"),
            max_steps=steps,
            per_device_train_batch_size=args.batch,
            learning_rate=args.lr,
            warmup_steps=max(1, steps // 20),
            lr_scheduler_type="cosine",
            report_to=[],
            save_strategy="no",
            remove_unused_columns=False,
            use_cpu=True,
            seed=args.seed,
            disable_tqdm=True,
            logging_steps=max(1, steps),
        )
        model.train()
        DistillationTrainer(
            model=model,
            args=targs,
            train_dataset=texts,
            data_collator=collator,
            teacher=teacher,
            objective=objective,
        ).train()
        return model.eval()

    ce = {"ce": LMCrossEntropy()}
    responses = Path(args.responses) if args.responses else out / "responses.jsonl"
    # The recipe-level teacher spec (`teacher: {served: {...}}`), validated as a recipe's would be.
    spec = {"file": str(responses), "top_logprobs": args.top_logprobs, "k": args.k}
    spec["prompt_template"] = args.prompt_template
    tok_s = train_tokenizer(train, vocab_size=args.student_vocab, kind="bpe")
    held_out = [split(t)[1] for t in val]
    rows = []
    t0 = time.time()
    if args.endpoint:
        prompts = (
            Path(args.prompts_file).read_text().splitlines()
            if args.prompts_file
            else [split(t)[0] for t in train]
        )
        served = served_teacher({**spec, "endpoint": args.endpoint, "model": args.model}, tok_s, prompts)
        print(f"answers from {args.endpoint} in {responses} ({time.time() - t0:.0f} s)", flush=True)
    elif args.responses:
        served = served_teacher(spec, tok_s)
    else:
        tok_t = train_tokenizer(train, vocab_size=args.teacher_vocab, kind="bpe")
        teacher = fit(
            gpt2(tok_t, args.teacher_width, args.seed + 1),
            Objective(ce),
            args.teacher_steps,
            train,
            CrossTokenizerCollator(tok_t, max_length=args.max_length, add_bos=True),
            name="teacher",
        )
        pairs = [split(t) for t in train]
        records = record_model(
            teacher, tok_t, pairs, k=args.top_logprobs, prompt_template=args.prompt_template
        )
        _Recorded.answers = {r["prompt"]: r["response"] for r in records}
        srv = ThreadingHTTPServer(("127.0.0.1", 0), _Recorded)
        threading.Thread(target=srv.serve_forever, daemon=True).start()
        try:
            url = f"http://127.0.0.1:{srv.server_address[1]}/v1"
            served = served_teacher({**spec, "endpoint": url, "model": "tiny"}, tok_s, [p for p, _ in pairs])
        finally:
            srv.shutdown()
            srv.server_close()
        print(f"teacher trained, recorded and fetched from a local server ({time.time() - t0:.0f} s)")
        bpc = bits_per_char(teacher, tok_t, held_out, args.max_length * 2)  # the teacher itself, for scale
        rows.append(
            {"method": "teacher", "source": "online", "seed": args.seed, "bits_per_char": round(bpc, 4)}
        )
        print(json.dumps(rows[-1]), flush=True)
    summary = served.summary()
    print(f"{responses}: {summary['responses']} answers, {summary['tokens']} tokens, k={summary['k']}")
    print(format_mass_kept(served.mass_kept), flush=True)
    coll = CrossTokenizerCollator(tok_s, max_length=args.max_length, add_bos=True)
    for name in ("labels", "served"):
        terms = dict(ce) if name == "labels" else {"kd": AlignedKD(), **ce}
        weights = None if name == "labels" else {"kd": 1.0, "ce": args.ce_weight}
        t0 = time.time()
        student = fit(
            gpt2(tok_s, args.student_width, args.seed + 2),
            Objective(terms, weights=weights),
            args.student_steps,
            served.texts,
            coll,
            teacher=None if name == "labels" else served,
            name=name,
        )
        rows.append(
            {
                "method": name,
                "source": "served" if name == "served" else "labels",
                "seed": args.seed,
                "bits_per_char": round(bits_per_char(student, tok_s, held_out, args.max_length * 2), 4),
                "train_s": round(time.time() - t0, 1),
            }
        )
        print(json.dumps(rows[-1]), flush=True)
    result = {
        "command": "python benchmarks/served_teacher.py " + " ".join(argv or []),
        "served": summary,
        "rows": rows,
    }
    (out / "served_teacher.json").write_text(json.dumps(result, indent=1))
    print(f"wrote {out / 'served_teacher.json'}")
    return 0


if __name__ == "__main__":
    from distill.errors import DistillError

    try:
        raise SystemExit(main())
    except DistillError as e:  # bad input: one line, no traceback
        raise SystemExit(f"served_teacher: error: {e}") from None
