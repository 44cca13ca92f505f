"""The `chat` evaluator: what a chat user trusts, measured on held-out conversations in a run.

    evaluator: {name: chat, init_args: {prompts: 200, max_new_tokens: 64}}

During training it is the perplexity evaluator (labelled tokens of the validation split, each
epoch). For the summary rows (`measure_model`, called once per model after training) it takes
the first `prompts` conversations of the test split, whose assistant turns are the reference
(the teacher's) answers, and adds the measures of `distill.nlp.chat_eval`: `answer_ppl`,
`teacher_nll` (under the run's teacher; the teacher's own row is judged by itself), `rouge_l`,
`eos_rate`, `repeat_rate`, `answer_tokens`, and `gen_tokens_per_s_b1` / `_b32`. A few answers go
side by side into summary.json (`answers`) and report.md.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from torch import nn

from distill.engine.evaluate import PerplexityEvaluator
from distill.errors import ConfigError, DistillError


class ChatEvaluator(PerplexityEvaluator):
    """Perplexity per epoch; the chat measures on held-out prompts for the summary.

    Args:
        prompts: how many test conversations to answer (the first ones of the split).
        max_new_tokens: the answers' length cap.
        batch_size: prompts generated together (left-padded).
        show: how many answers the report shows side by side.
        speed_batch_sizes / speed_new_tokens: generation tokens/s at these batch sizes.
    """

    def __init__(
        self,
        prompts: int = 200,
        max_new_tokens: int = 64,
        batch_size: int = 16,
        show: int = 4,
        speed_batch_sizes: list[int] | tuple[int, ...] = (1, 32),
        speed_new_tokens: int = 32,
    ):
        if prompts < 1 or max_new_tokens < 1 or batch_size < 1:
            raise ConfigError("evaluator chat: prompts, max_new_tokens and batch_size must be at least 1")
        super().__init__(shift=True)
        self.prompts = prompts
        self.max_new_tokens = max_new_tokens
        self.batch_size = batch_size
        self.show = show
        self.speed_batch_sizes = tuple(speed_batch_sizes)
        self.speed_new_tokens = speed_new_tokens

    def measure_model(
        self, model: nn.Module, data, judge: nn.Module | None = None, threads: int = 1
    ) -> dict[str, Any]:
        """The chat measures of `model` on the test split (validation when there is none), and
        `examples`: the first `show` prompts with their reference and the model's answer."""
        from distill.nlp import chat_eval as ce

        tok = data.tokenizer
        ds = data.test or data.val
        if tok is None or ds is None or len(ds) == 0:
            raise DistillError("evaluator chat needs tokenized chat data with a test (or validation) split")
        held = ce.heldout_from_rows(tok, [ds[i] for i in range(min(len(ds), self.prompts))])
        prompts = [h.prompt_ids for h in held]
        nlls = ce.answer_nlls(model, prompts, [h.answer_ids for h in held], max(1, self.batch_size // 2))
        answers = ce.greedy_answers(model, tok, prompts, self.max_new_tokens, self.batch_size)
        row: dict[str, Any] = {"answer_ppl": math.exp(ce.mean_nll(nlls))}
        vocab = getattr(getattr(judge, "config", None), "vocab_size", None)
        if judge is not None and vocab is not None and vocab >= len(tok):  # the teacher reads these ids
            row["teacher_nll"] = ce.mean_nll(
                ce.answer_nlls(judge, prompts, [a.ids for a in answers], max(1, self.batch_size // 2))
            )
        references = [h.reference for h in held]
        row |= {
            "rouge_l": ce.rouge_l(answers, references),
            "eos_rate": ce.eos_rate(answers),
            "repeat_rate": ce.repeat_rate(answers),
            "answer_tokens": sum(len(a.ids) for a in answers) / len(answers),
            "heldout_prompts": len(held),
        }
        row |= ce.generation_speed(
            model, tok, prompts, self.speed_batch_sizes, self.speed_new_tokens, threads=threads
        )
        row["examples"] = [
            {"prompt": ce.prompt_text(tok, h.prompt_ids), "reference": h.reference, "answer": a.text}
            for h, a in zip(held[: self.show], answers)
        ]
        return row


def side_by_side(rows: list[dict[str, Any]]) -> list[dict[str, str]]:
    """Takes the `examples` out of the summary rows (they are not numbers) and returns one record
    per prompt: `prompt`, `reference`, and each row's answer under its name."""
    out: list[dict[str, str]] = []
    for row in rows:
        for i, ex in enumerate(row.pop("examples", None) or []):
            if i == len(out):
                out.append({"prompt": ex["prompt"], "reference": ex["reference"]})
            out[i][row["name"]] = ex["answer"]
    return out


def _cell(text: str, limit: int = 400) -> str:
    text = text if len(text) <= limit else text[: limit - 1] + "…"
    return text.replace("|", "\\|").replace("\r", "").replace("\n", "<br>") or "*(empty)*"


def answers_markdown(answers: list[dict[str, str]]) -> list[str]:
    """report.md's section: each held-out prompt with the reference answer and every model's."""
    if not answers:
        return []
    lines = [
        "## Answers side by side",
        "",
        "The first held-out prompts of the test split: `reference` is the answer in the data (the "
        "teacher's), the other rows each model's greedy answer.",
        "",
    ]
    for i, rec in enumerate(answers, 1):
        lines += [f"**{i}. {_cell(rec['prompt'], 300)}**", "", "| model | answer |", "|---|---|"]
        lines += [f"| {k} | {_cell(v)} |" for k, v in rec.items() if k != "prompt"]
        lines.append("")
    return lines


# --------------------------------------------------------------------------- `distill chat RUN`


def _student_folder(run_dir: Path) -> Path:
    """`student_hf/` of a run folder (of its first seed, for a `--seeds N` folder), or one line
    saying why there is none."""
    if not run_dir.is_dir():
        raise DistillError(f"{run_dir} is not a folder: give a run folder written by distill run")
    folder = run_dir / "student_hf"
    if not folder.is_dir():
        seeds = sorted(
            (d for d in run_dir.glob("seed*") if d.name[4:].isdigit() and (d / "student_hf").is_dir()),
            key=lambda d: int(d.name[4:]),
        )
        if seeds:
            return seeds[0] / "student_hf"
        if not (run_dir / "config.yaml").exists():
            raise DistillError(f"{run_dir} is not a distill run folder (it has no config.yaml)")
        raise DistillError(
            f"{run_dir} has no distilled student (no student_hf/): finish the run (distill run RECIPE "
            f"--out {run_dir} --resume), or it was not a Hugging Face chat recipe"
        )
    return folder


def _causal_lm(folder: Path, what: str):
    from distill.nlp.hf_models import hf

    try:
        return hf(path=str(folder), task="causal_lm").eval()
    except ValueError as e:  # transformers: a config of another kind of model
        raise DistillError(
            f"the {what} in {folder} is not a chat (causal LM) model: {str(e).splitlines()[0]}"
        ) from None


def load_chat_models(run_dir: str | Path, teacher: bool = False):
    """The run's distilled student (`student_hf/`) and its tokenizer, and with `teacher` the
    run's teacher (`teacher_hf/` when it was trained in the run, else the recipe's `hf` teacher)
    and its tokenizer (the folder's own, else the student's). Returns (student, tokenizer,
    teacher or None, teacher tokenizer or None, the student folder)."""
    from distill.nlp.hf_models import _folder_tokenizer, load_tokenizer, resolve_source

    run_dir = Path(run_dir)
    folder = _student_folder(run_dir)
    student, tok = _causal_lm(folder, "student"), load_tokenizer(folder)
    if not teacher:
        return student, tok, None, None, folder
    run = folder.parent
    if (run / "teacher_hf").is_dir():
        return (
            student,
            tok,
            _causal_lm(run / "teacher_hf", "teacher"),
            load_tokenizer(run / "teacher_hf"),
            folder,
        )
    from distill.models.build import build_model
    from distill.run.config import load_yaml, parse_recipe

    cfg = parse_recipe(load_yaml(run / "config.yaml"), source=str(run / "config.yaml"))
    if cfg.teachers or cfg.teacher.name != "hf" or not cfg.teacher.init_args.get("path"):
        raise DistillError(
            f"{run}: --teacher needs one pretrained hf teacher (teacher: {{name: hf, init_args: {{path: ...}}}}) "
            "or a teacher_hf/ folder; this run has neither"
        )
    spec = cfg.teacher.spec()
    spec["init_args"] = {**spec["init_args"], "task": "causal_lm"}
    model = build_model(spec).eval()
    t_tok = _folder_tokenizer(resolve_source(cfg.teacher.init_args["path"])) or tok
    return student, tok, model, t_tok, folder


class ChatSession:
    """One side of a conversation in the terminal: the history, and the model's streamed replies
    (greedy by default, the end-of-turn token stops them; the oldest turns are dropped when the
    history no longer fits the model's context)."""

    def __init__(self, model: nn.Module, tokenizer, max_new_tokens: int = 128, temperature: float = 0.0):
        from distill.nlp import chat_eval as ce

        if max_new_tokens < 1:
            raise DistillError("--max-new-tokens must be at least 1")
        if temperature < 0:
            raise DistillError("--temperature must be 0 (greedy) or more")
        ce.render_prompt(tokenizer, "hi")  # a tokenizer without a chat template fails here, in one line
        self.model, self.tokenizer = model, tokenizer
        self.max_new_tokens, self.temperature = max_new_tokens, temperature
        self.history: list[dict[str, str]] = []

    def reset(self) -> None:
        self.history = []

    def reply(self, text: str, stream: bool = True) -> str:
        """Adds the user's turn, generates the answer (printed as it comes with `stream`), keeps it
        in the history and returns it."""
        import torch
        from transformers import TextStreamer

        from distill.nlp import chat_eval as ce

        self.history.append({"role": "user", "content": text})
        positions = ce.max_positions(self.model)
        ids = ce.render_prompt(self.tokenizer, self.history)
        while positions is not None and len(ids) + self.max_new_tokens > positions and len(self.history) > 1:
            self.history = self.history[2:]  # forget the oldest exchange
            ids = ce.render_prompt(self.tokenizer, self.history)
        new = self.max_new_tokens if positions is None else min(self.max_new_tokens, positions - len(ids))
        if new < 1:
            self.history.pop()
            raise DistillError(
                f"the message is {len(ids)} tokens: it fills the model's {positions} positions"
            )
        eot, pad = ce.end_of_turn_id(self.tokenizer), ce.pad_id(self.tokenizer)
        kwargs: dict[str, Any] = {"max_new_tokens": new, "pad_token_id": pad, "eos_token_id": eot}
        kwargs |= (
            {"do_sample": True, "temperature": self.temperature}
            if self.temperature > 0
            else {"do_sample": False}
        )
        if stream:
            kwargs["streamer"] = TextStreamer(self.tokenizer, skip_prompt=True, skip_special_tokens=True)
        device = next(self.model.parameters()).device
        with torch.no_grad():
            out = self.model.generate(
                input_ids=torch.tensor([ids], device=device),
                attention_mask=torch.ones(1, len(ids), dtype=torch.long, device=device),
                **kwargs,
            )
        gen = out[0, len(ids) :].tolist()
        if eot is not None and eot in gen:
            gen = gen[: gen.index(eot)]
        answer = self.tokenizer.decode(gen, skip_special_tokens=True).strip()
        self.history.append({"role": "assistant", "content": answer})
        return answer
