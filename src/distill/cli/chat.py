"""`distill chat RUN`: talk to a run's distilled chat model (and its teacher) in the terminal."""

from __future__ import annotations

import sys

from distill.errors import DistillError


def add_parser(sub) -> None:
    p = sub.add_parser(
        "chat",
        help="talk to a run's distilled chat model (and its teacher) in the terminal",
        description="Loads the run's distilled student (RUN/student_hf/, the first seed's for a --seeds "
        "run) and answers with its chat template, streaming the reply; --teacher answers with the "
        "run's teacher beside it. Greedy unless --temperature. In the conversation: /reset starts "
        "over, /quit (or Ctrl-D) ends.",
    )
    p.add_argument("run_dir", metavar="RUN", help="a finished run folder of a chat recipe")
    p.add_argument("--teacher", action="store_true", help="the teacher's answer beside the student's")
    p.add_argument("--prompt", help="answer this one message and exit (for scripts and tests)")
    p.add_argument(
        "--max-new-tokens", type=int, default=128, help="the longest answer in tokens (default 128)"
    )
    p.add_argument("--temperature", type=float, default=0.0, help="0 (default): greedy; above 0: sampled")
    p.add_argument("--seed", type=int, default=0, help="for sampled answers")


def main(args) -> int:
    import torch

    from distill.run.chat import ChatSession, load_chat_models

    student, tok, teacher, t_tok, folder = load_chat_models(args.run_dir, teacher=args.teacher)
    torch.manual_seed(args.seed)
    sides = [("student", ChatSession(student, tok, args.max_new_tokens, args.temperature))]
    if teacher is not None:
        sides.append(("teacher", ChatSession(teacher, t_tok, args.max_new_tokens, args.temperature)))
    width = max(len(name) for name, _ in sides)

    def answer(text: str) -> None:
        for name, session in sides:
            print(f"{name:>{width}}: ", end="", flush=True)
            session.reply(text, stream=True)

    if args.prompt is not None:
        answer(args.prompt)
        return 0
    who = " and its teacher" if teacher is not None else ""
    print(f"distill chat: the student in {folder}{who}; /reset starts over, /quit or Ctrl-D ends")
    while True:
        try:
            text = input(f"{'you':>{width}}> ").strip()
        except EOFError:
            print()
            return 0
        if text in ("/quit", "/exit"):
            return 0
        if text == "/reset":
            for _, session in sides:
                session.reset()
            print("(a new conversation)")
            continue
        if not text:
            continue
        try:
            answer(text)
        except DistillError as e:  # a message too long for the context: say so, keep talking
            print(f"\ndistill chat: {e}", file=sys.stderr)
