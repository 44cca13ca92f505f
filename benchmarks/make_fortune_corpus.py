"""Writes src/distill/data/fortunes/: the text of Debian's `fortunes` package that the recipes read.

The showcase recipes (fortune_topics, lm_fortunes, minilm_embeddings, fortune_chat*) and the
cross-tokenizer benchmark read passages of 20 to 400 characters (after whitespace is collapsed),
one file per category, and the chat set reads every question/answer of `riddles` and
`definitions`. This keeps exactly those passages, verbatim and in order, in the same
`%`-separated format, so every builder gives the same data as on the package itself and no
machine needs the Debian package. Rerun after a new release of the package:

    apt-get install -y fortunes && python benchmarks/make_fortune_corpus.py
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
from pathlib import Path

from distill.data.text import fortune_passages

OUT = Path(__file__).resolve().parents[1] / "src" / "distill" / "data" / "fortunes"
MIN_CHARS, MAX_CHARS = 20, 400  # the widest range any recipe or builder default reads
WHOLE = ("riddles", "definitions")  # fortune_dialogues reads their Q:/A: lines, whatever the length


def package_version() -> str:
    try:
        out = subprocess.run(
            ["dpkg-query", "-W", "-f=${Version}", "fortunes"], capture_output=True, text=True, check=True
        )
        return out.stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--source", default="/usr/share/games/fortunes")
    ap.add_argument("--out", default=str(OUT))
    args = ap.parse_args()
    src, out = Path(args.source), Path(args.out)
    if not src.is_dir():
        raise SystemExit(f"{src} does not exist: apt-get install -y fortunes")
    readme = (out / "README.md").read_text() if (out / "README.md").exists() else None
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    total = 0
    for p in sorted(src.iterdir()):
        if p.suffix or not p.is_file() or p.is_symlink():
            continue
        raw = p.read_text(encoding="utf-8", errors="replace")
        keep = [
            t
            for t in fortune_passages(raw)
            if MIN_CHARS <= len(" ".join(t.split())) <= MAX_CHARS or (p.name in WHOLE and t.strip())
        ]
        if keep:  # every passage ends with a `%` line, so even a one-passage file reads as fortunes
            (tmp / p.name).write_text("".join(f"{t}\n%\n" for t in keep), encoding="utf-8")
            total += len(keep)
    if readme is not None:
        (tmp / "README.md").write_text(readme)
    shutil.rmtree(out, ignore_errors=True)
    tmp.rename(out)
    print(f"{total} passages from {src} (fortunes {package_version()}) -> {out}")


if __name__ == "__main__":
    main()
