"""Builds recipes/data/chat_prompts.jsonl: chat prompts made offline from material installed here.

Sources (each optional; the script says what it found):
  - the fortunes corpus shipped with distill (`bundled:fortunes`, Debian's fortunes package
    verbatim): the riddles' questions ("Q:" lines) and the definitions' terms ("What is <term>?");
  - manual-page one-line summaries (`whatis -w '*'`, man-db): "What does the <name> command do?"
    for sections 1 and 8, "What is the C function <name> for?" for sections 2 and 3, "What is the
    <name> file used for?" for section 5.
The teacher writes the answers, so only prompts are kept (no reference answers). Every row is
`{"prompt": ..., "source": ..., "split": "train" | "test"}`; `split` holds out `--test` prompts
(seeded) for evaluation. The output is the same on every run with the same installed material:

    python recipes/data/make_chat_prompts.py --out recipes/data/chat_prompts.jsonl --n 1700 --test 200
"""

from __future__ import annotations

import argparse
import json
import random
import re
import subprocess
from pathlib import Path

from distill.data.text import FORTUNES_DIR as FORTUNES
from distill.data.text import fortune_passages


def _passages(path: Path) -> list[str]:
    text = path.read_text(encoding="utf-8", errors="replace")
    return [p.strip() for p in fortune_passages(text) if p.strip()]


def fortune_prompts() -> list[tuple[str, str]]:
    out = []
    if (FORTUNES / "riddles").is_file():
        for p in _passages(FORTUNES / "riddles"):
            lines = [ln.strip() for ln in p.splitlines()]
            starts = [k for k, ln in enumerate(lines) if ln.startswith("Q:")]
            if not starts:
                continue
            q = []  # the question runs from its "Q:" line to the "A:" line
            for ln in lines[starts[0] :]:
                if ln.startswith("A:") or (q and not ln):
                    break
                q.append(ln[2:] if ln.startswith("Q:") else ln)
            q = " ".join(" ".join(q).split())
            if 10 <= len(q) <= 200:
                out.append((q, "fortunes/riddles"))
    if (FORTUNES / "definitions").is_file():
        for p in _passages(FORTUNES / "definitions"):
            first = p.splitlines()[0].strip()
            term = first[:-1].strip() if first.endswith(":") else ""
            # "Afternoon, n." -> "Afternoon" (the part of speech is the dictionary's, not the question's)
            term = re.sub(r",?\s*\(?\b(n|v|adj|adv|vt|vi|pp|prep|pl)\b\.?\)?\.?$", "", term).strip(" ,.")
            if term and 2 <= len(term) <= 40 and len(term.split()) <= 4 and not term.lower().startswith("q"):
                out.append((f"What is {term}?", "fortunes/definitions"))
    return out


TEMPLATES = {
    "1": ["What does the {n} command do?", "How do I use the {n} command?", "Explain the Linux command {n}."],
    "8": ["What does the {n} command do?", "What is {n} used for on Linux?"],
    "2": ["What is the C function {n} for?", "What does the system call {n} do?"],
    "3": ["What is the C function {n} for?", "What does {n} do in C?"],
    "5": ["What is the {n} file used for?"],
}


def man_prompts() -> list[tuple[str, str]]:
    try:
        res = subprocess.run(["whatis", "-w", "*"], capture_output=True, text=True, timeout=120)
    except (OSError, subprocess.TimeoutExpired):
        return []
    out, seen = [], set()
    for line in sorted(set(res.stdout.splitlines())):
        m = re.match(r"^(\S+) \((\w+)\)\s+- ", line)
        if not m:
            continue
        name, section = m.group(1), m.group(2)[0]
        if section not in TEMPLATES or name in seen or not re.fullmatch(r"[A-Za-z][\w.+-]{1,30}", name):
            continue
        if "_" in name and section in "18":  # gcloud_* subcommand pages: thousands, all alike
            continue
        seen.add(name)
        templates = TEMPLATES[section]
        out.append((templates[len(seen) % len(templates)].format(n=name), f"man/{section}"))
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=str(Path(__file__).with_name("chat_prompts.jsonl")))
    ap.add_argument("--n", type=int, default=1700, help="prompts in all (fortunes first, then manual pages)")
    ap.add_argument("--test", type=int, default=200, help="prompts held out for evaluation")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    rng = random.Random(args.seed)
    fortunes, man = fortune_prompts(), man_prompts()
    prompts = list(dict.fromkeys(fortunes))  # keep order, drop repeats
    rng.shuffle(man)
    seen = {p for p, _ in prompts}
    for p, s in man:
        if len(prompts) >= args.n:
            break
        if p not in seen:
            seen.add(p)
            prompts.append((p, s))
    prompts = prompts[: args.n]
    if len(prompts) <= args.test:
        raise SystemExit(f"only {len(prompts)} prompts found; install fortunes and man-db, or lower --test")
    rng.shuffle(prompts)
    with open(args.out, "w", encoding="utf-8") as f:
        for i, (p, s) in enumerate(prompts):
            f.write(
                json.dumps({"prompt": p, "source": s, "split": "test" if i < args.test else "train"}) + "\n"
            )
    counts: dict[str, int] = {}
    for _, s in prompts:
        counts[s] = counts.get(s, 0) + 1
    print(f"{args.out}: {len(prompts)} prompts ({args.test} test): {counts}")


if __name__ == "__main__":
    main()
