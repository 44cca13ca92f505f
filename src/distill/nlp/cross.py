"""Teachers with another tokenizer: online, from a store written once, and several at once.

Every teacher here returns `Outputs(logits=None, extras={"xt": {name: {...}}})`, what the `uld`
and `aligned_kd` terms read (see `distill.losses.cross_tokenizer`): per teacher token the top-k
probabilities in decreasing order, their ids and the tail mass, and the positions aligned with
the student's tokens (from the batch's `text` and `byte_ends`, as `CrossTokenizerCollator`
makes them). A teacher whose logits are wider than its tokenizer (Qwen, Phi and Pythia pad their
embedding matrix) has the padding columns dropped before anything else: they stand for no token.

- `CrossTokenizerTeacher(models, tokenizer, student_tokenizer)`: runs the teacher(s) on the
  batch's texts under their own tokenizer. Several models sharing that tokenizer are one teacher
  whose probabilities are the mean of theirs (a shared vocabulary).
- `write_cross_store(path, models, tokenizer, texts, k)`: the same numbers for every text, once,
  plus the text each token has consumed and the teacher's token bytes, so a student with any
  tokenizer trains from it without the teacher or its tokenizer.
- `CachedCrossTokenizerTeacher(path, student_tokenizer)`: serves a store; refuses one written by
  other teacher weights, and texts it does not hold, with what to do.
- `CrossTeachers(a, b, ...)`: several teachers at once (each under its own name; one loss term
  per teacher, each with its own, schedulable, weight in the `Objective`).

Store layout (a folder, written to `PATH.partial/` and renamed when complete)::

    manifest.json       fingerprint (teacher weights, tokenizer, texts), k, max_length, token bytes,
                        mass_kept (mean share of the teacher mass in its top 1..k)
    probs.npy   (N, k) float16     top-k probabilities of every teacher token, largest first
    ids.npy     (N, k) int32       their teacher token ids
    tail.npy    (N,)   float32     the mass outside them
    ends.npy    (N,)   int32       the UTF-8 bytes of its text the token has consumed (-1: <eos>, unknown)
    starts.npy  (n+1,) int64       text i owns rows starts[i]:starts[i+1]
    keys.npy    (n, 20) uint8      sha1 of each text, for lookup
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
import torch
from torch import Tensor, nn

from distill.checkpoint import atomic_write, atomic_write_text
from distill.errors import DistillError
from distill.losses.cross_tokenizer import sparse_teacher
from distill.nlp.align import TokenBytes, batch_alignment, vocab_map, vocab_strings
from distill.nlp.collate import pad_batch
from distill.outputs import Batch, Outputs
from distill.teachers.store import store_lock, weights_hash

_FIELDS = ("probs", "ids", "tail", "ends", "starts", "keys")
_VERSION = 2  # 1: character spans and token strings (misaligned multibyte characters)


def _models(models) -> list[nn.Module]:
    ms = list(models) if isinstance(models, list | tuple) else [models]
    if not ms:
        raise DistillError("a cross-tokenizer teacher needs at least one model")
    for m in ms:
        m.eval().requires_grad_(False)
    return ms


def _texts_and_ends(batch: Batch) -> tuple[list[str], Tensor]:
    src = batch.inputs if isinstance(batch.inputs, Mapping) else {}
    if "text" not in src or "byte_ends" not in src:
        raise DistillError(
            "a teacher with another tokenizer needs the batch's raw 'text' and the student's 'byte_ends'; "
            "collate with distill.nlp.align.CrossTokenizerCollator(student_tokenizer)"
        )
    return list(src["text"]), src["byte_ends"]


@torch.inference_mode()
def _run(
    models: list[nn.Module], ids: list[list[int]], pad_id: int, k: int | None, device, vocab: int
) -> tuple:
    """Mean teacher probabilities (over models), as top-k (B, Tt, k) probs/ids and (B, Tt) tail.

    `vocab`: the tokenizer's ids; logit columns past them (a padded embedding) stand for no
    token and are dropped before the softmax.
    """
    enc = pad_batch(ids, None, pad_id)
    x, att = enc["input_ids"].to(device), enc["attention_mask"].to(device)
    probs = None
    for m in models:
        logits = m(input_ids=x, attention_mask=att).logits
        if logits.shape[-1] < vocab:
            raise DistillError(
                f"the teacher has {logits.shape[-1]} output tokens but its tokenizer has {vocab}; "
                "call model.resize_token_embeddings(len(tokenizer))"
            )
        p = torch.softmax(logits[..., :vocab].float(), dim=-1)  # (B, Tt, V)
        probs = p if probs is None else probs + p
    probs = probs / len(models)
    # sparse_teacher takes logits; log p is a valid logit vector for p.
    return sparse_teacher(probs.clamp_min(1e-38).log(), k)


def _save_npy(path, arr: np.ndarray) -> None:
    with open(path, "wb") as f:
        np.save(f, arr)


def text_key(text: str) -> bytes:
    return hashlib.sha1(text.encode("utf-8")).digest()


def _fingerprint(models: list[nn.Module], strings: dict) -> dict:
    tok = hashlib.sha256(json.dumps(strings["pieces"]).encode()).hexdigest()[:16]
    return {"teacher_weights": [weights_hash(m) for m in models], "tokenizer": tok}


def _xt_entry(probs, ids, tail, t_ends, t_lengths, s_ends, vmap) -> dict[str, Tensor]:
    align, fallback, valid = batch_alignment(s_ends.cpu(), t_ends, t_lengths)
    dev = s_ends.device
    return {
        "probs": probs.to(dev),
        "ids": ids.to(dev),
        "tail": tail.to(dev),
        "valid": valid.to(dev),
        "align": align.to(dev),
        "fallback": fallback.to(dev),
        "map": vmap.to(dev),
    }


def format_mass_kept(mass: Sequence[float], ks: Sequence[int] = (1, 5, 10, 20)) -> str:
    """'teacher mass kept by the top-k: k=1 0.62, k=5 0.91, ...' for a report line."""
    parts = [f"k={k} {mass[k - 1]:.3f}" for k in ks if k <= len(mass)]
    if len(mass) not in ks:
        parts.append(f"k={len(mass)} {mass[-1]:.3f}")
    return "teacher mass kept by the top-k (mean over tokens): " + ", ".join(parts)


class NoTaps:
    """What the Trainer asks of every teacher besides `__call__`: feature taps. Across tokenizers
    the teacher's positions are not the student's, so feature terms are refused."""

    def add_taps(self, paths) -> None:
        if paths:
            raise DistillError(
                f"feature terms (taps {', '.join(paths)}) with a teacher of another tokenizer: its positions "
                "are not the student's; use aligned_kd / uld"
            )

    def to(self, device):
        return self


class CrossTokenizerTeacher(NoTaps):
    """A frozen teacher (or a mean of several sharing one tokenizer) run on the batch's texts.

    Args:
        models: a causal LM (Hugging Face style: `model(input_ids=, attention_mask=).logits`) or a
            list of them sharing `tokenizer` (their probabilities are averaged).
        tokenizer: the teacher's fast tokenizer.
        student_tokenizer: the student's, for the token map.
        k: probabilities kept per teacher token (None: all), as a store would keep them.
        max_length: teacher tokens per text (longer texts are cut, like the student's).
        name: the key under `extras["xt"]` (the `teacher` argument of the terms).
        mode: the token map, "exact" or "prefix" (see `vocab_map`).
        add_eos / add_bos: as the student's `CrossTokenizerCollator` (an eos after each text; a
            bos before it, so the first positions of both sides align).
    """

    def __init__(
        self,
        models,
        tokenizer,
        student_tokenizer,
        k: int | None = 64,
        max_length: int = 128,
        name: str = "teacher",
        mode: str = "exact",
        add_eos: bool = True,
        add_bos: bool = False,
    ):
        self.models = _models(models)
        self.tokenizer = tokenizer
        self.tokens = TokenBytes(tokenizer, "teacher")
        self.k, self.max_length, self.name = k, max_length, name
        self.add_eos, self.add_bos = add_eos, add_bos
        self.map = vocab_map(vocab_strings(self.tokens), student_tokenizer, mode)

    @property
    def device(self) -> torch.device:
        return next(self.models[0].parameters()).device

    def to(self, device) -> CrossTokenizerTeacher:
        for m in self.models:
            m.to(device)
        return self

    def __call__(self, batch: Batch) -> Outputs:
        texts, s_ends = _texts_and_ends(batch)
        ids, ends = self.tokens.encode(texts, self.max_length, self.add_eos, self.add_bos)
        pad = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else 0
        probs, tids, tail = _run(self.models, ids, pad, self.k, self.device, len(self.map))
        entry = _xt_entry(probs, tids, tail, ends, [len(i) for i in ids], s_ends, self.map)
        return Outputs(logits=None, extras={"xt": {self.name: entry}})


def write_cross_store(
    path: str | os.PathLike,
    models,
    tokenizer,
    texts: Sequence[str],
    k: int = 64,
    max_length: int = 128,
    batch_size: int = 32,
    dtype: str = "float16",
    add_eos: bool = True,
    add_bos: bool = False,
    device: str | torch.device | None = None,
    verbose: bool = True,
    shard_texts: int = 4096,
) -> dict:
    """Runs the teacher once over `texts` and writes what any student tokenizer trains from.

    The texts are written in shards of `shard_texts` into `PATH.partial/`, each shard's files
    atomically and then recorded in its `progress.json`; an interrupted write, called again with
    the same teacher, tokenizer, texts and settings, resumes after the shards already done
    (anything else starts again). When every shard is done they are joined into the store's files
    (one shard in memory at a time) and the folder is renamed to PATH.

    A second process writing the same store is refused at once (the lock file `PATH.lock` beside
    it, as for the same-tokenizer store).

    Returns the manifest (with `bytes_per_token`); prints the size per teacher token.
    """
    with store_lock(Path(path)):
        return _write_cross_store(
            Path(path), models, tokenizer, texts, k, max_length, batch_size, dtype, add_eos, add_bos,
            device, verbose, shard_texts,
        )  # fmt: skip


def _write_cross_store(
    path: Path, models, tokenizer, texts, k, max_length, batch_size, dtype, add_eos, add_bos, device,
    verbose, shard_texts,
) -> dict:  # fmt: skip
    if dtype not in ("float16", "float32"):
        raise DistillError(f"store dtype '{dtype}' is not one of float16, float32")
    if shard_texts < 1:
        raise DistillError(f"shard_texts must be at least 1, got {shard_texts}")
    ms = _models(models)
    if device is not None:
        for m in ms:
            m.to(device)
    dev = next(ms[0].parameters()).device
    tokens = TokenBytes(tokenizer, "teacher")
    strings = vocab_strings(tokens)
    texts = list(dict.fromkeys(texts))
    tmp = path.with_name(path.name + ".partial")
    say = print if verbose else (lambda *_a, **_k: None)
    keys = [text_key(t) for t in texts]
    plan = {
        "fingerprint": _fingerprint(ms, strings),
        "texts_sha": hashlib.sha256(b"".join(keys)).hexdigest()[:16],
        "params": [_VERSION, k, max_length, add_eos, add_bos, dtype, shard_texts, len(texts)],
    }
    progress = None
    if (tmp / "progress.json").is_file():
        try:
            progress = json.loads((tmp / "progress.json").read_text())
        except json.JSONDecodeError:
            progress = None
        if progress is not None and progress.get("plan") != plan:
            say(f"{tmp} holds an interrupted write for another teacher, texts or settings: starting again")
            progress = None
        elif progress is not None:
            say(f"resuming {tmp}: {len(progress['done'])} shard(s) already written", flush=True)
    for stale in tmp.glob(".*.tmp-*"):  # a file a killed writer was writing (its shard is redone)
        stale.unlink(missing_ok=True)
    if progress is None:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        progress = {"plan": plan, "done": []}
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    n_shards = max(1, -(-len(texts) // shard_texts))
    for shard in range(n_shards):
        if shard in progress["done"]:
            continue
        parts: dict[str, list[np.ndarray]] = {f: [] for f in ("probs", "ids", "tail", "ends")}
        lengths = []
        shard_texts_ = texts[shard * shard_texts : (shard + 1) * shard_texts]
        for i in range(0, len(shard_texts_), batch_size):
            chunk = shard_texts_[i : i + batch_size]
            ids, ends = tokens.encode(chunk, max_length, add_eos, add_bos)
            probs, tids, tail = _run(ms, ids, pad, k, dev, len(strings["pieces"]))
            for r, row in enumerate(ids):
                n = len(row)
                parts["probs"].append(probs[r, :n].cpu().numpy().astype(dtype))
                parts["ids"].append(tids[r, :n].to(torch.int32).cpu().numpy())
                parts["tail"].append(tail[r, :n].cpu().numpy().astype(np.float32))
                parts["ends"].append(np.asarray(ends[r], dtype=np.int32).reshape(n))
                lengths.append(n)
        arrays = {f: np.concatenate(v) for f, v in parts.items()}
        arrays["lengths"] = np.asarray(lengths, dtype=np.int64)
        for f, a in arrays.items():
            atomic_write(tmp / f"{f}.{shard:05d}.npy", lambda p, a=a: _save_npy(p, a))
        progress["done"] = sorted(progress["done"] + [shard])
        atomic_write_text(tmp / "progress.json", json.dumps(progress))
        if n_shards > 1:
            say(f"shard {shard + 1}/{n_shards} written", flush=True)

    lengths = np.concatenate([np.load(tmp / f"lengths.{s:05d}.npy") for s in range(n_shards)])
    starts = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
    _join_shards(tmp, n_shards)
    atomic_write(tmp / "starts.npy", lambda p: _save_npy(p, starts))
    key_arr = np.frombuffer(b"".join(keys), dtype=np.uint8).reshape(-1, 20)
    atomic_write(tmp / "keys.npy", lambda p: _save_npy(p, key_arr))
    # The teacher's own loss of information: the mean share of its mass in its top 1..k.
    probs_all = np.load(tmp / "probs.npy", mmap_mode="r")
    kept = np.zeros(probs_all.shape[1])
    for i in range(0, len(probs_all), 1 << 16):
        kept += np.cumsum(probs_all[i : i + (1 << 16)].astype(np.float64), axis=1).clip(max=1.0).sum(0)
    kept /= max(len(probs_all), 1)
    total = sum((tmp / f"{f}.npy").stat().st_size for f in _FIELDS)
    manifest = {
        "kind": "cross_tokenizer",
        "version": _VERSION,
        "fingerprint": {**plan["fingerprint"], "texts": len(texts)},
        "k": int(np.load(tmp / "probs.npy", mmap_mode="r").shape[1]),
        "max_length": max_length,
        "add_eos": add_eos,
        "add_bos": add_bos,
        "dtype": dtype,
        "tokens": int(starts[-1]),
        "bytes": int(total),
        "bytes_per_token": round(total / max(int(starts[-1]), 1), 2),
        "mass_kept": [round(float(m), 6) for m in kept],
        "vocab": strings,
    }
    atomic_write_text(tmp / "manifest.json", json.dumps(manifest))
    for f in tmp.glob("*.npy"):
        if re.search(r"\.\d{5}\.npy$", f.name):  # the shards, joined above
            f.unlink()
    (tmp / "progress.json").unlink()
    if path.exists():
        shutil.rmtree(path)
    os.replace(tmp, path)
    say(
        f"cross-tokenizer store {path}: {len(texts)} texts, {starts[-1]} teacher tokens, k={manifest['k']}, "
        f"{manifest['bytes_per_token']:.1f} bytes per token ({total / 2**20:.1f} MiB); "
        + format_mass_kept(manifest["mass_kept"]),
        flush=True,
    )
    return manifest


def _join_shards(folder: Path, n_shards: int) -> None:
    """`<field>.<shard>.npy` -> `<field>.npy` for the row fields, written through a memory map one
    shard at a time (a store larger than memory joins as well)."""
    for f in ("probs", "ids", "tail", "ends"):
        shards = [np.load(folder / f"{f}.{s:05d}.npy", mmap_mode="r") for s in range(n_shards)]
        rows = sum(a.shape[0] for a in shards)

        def write(p, shards=shards, rows=rows):
            out = np.lib.format.open_memmap(
                p, mode="w+", dtype=shards[0].dtype, shape=(rows, *shards[0].shape[1:])
            )
            at = 0
            for a in shards:
                out[at : at + a.shape[0]] = a
                at += a.shape[0]
            out.flush()
            del out

        atomic_write(folder / f"{f}.npy", write)


class CachedCrossTokenizerTeacher(NoTaps):
    """Serves a store written by `write_cross_store` as a `CrossTokenizerTeacher` would.

    Args:
        path: the store folder.
        student_tokenizer: the student's fast tokenizer (the token map is built from the strings
            the store keeps; the teacher's tokenizer is not needed).
        teacher: optionally the teacher model(s) the run expects: a store written by other
            weights is refused.
        name, mode: as in `CrossTokenizerTeacher`.
    """

    def __init__(self, path, student_tokenizer, teacher=None, name: str = "teacher", mode: str = "exact"):
        path = Path(path)
        f = path / "manifest.json"
        if not f.is_file():
            hint = (
                " (an interrupted write left .partial; write it again)"
                if path.with_name(path.name + ".partial").exists()
                else ""
            )
            raise DistillError(
                f"{path} is not a cross-tokenizer teacher store (no manifest.json){hint}; write it with write_cross_store"
            )
        try:
            self.manifest = json.loads(f.read_text())
        except json.JSONDecodeError as e:
            raise DistillError(f"{f} is corrupt ({e}); delete {path} and write the store again") from None
        if self.manifest.get("kind") != "cross_tokenizer":
            raise DistillError(
                f"{path} is a teacher store for one tokenizer, not a cross-tokenizer one; write it with write_cross_store"
            )
        if self.manifest.get("version") != _VERSION:
            raise DistillError(
                f"cross-tokenizer store {path} has format {self.manifest.get('version')}, this distill reads "
                f"{_VERSION} (alignment by bytes); write it again with write_cross_store"
            )
        if teacher is not None:
            got = _fingerprint(_models(teacher), self.manifest["vocab"])["teacher_weights"]
            had = self.manifest["fingerprint"]["teacher_weights"]
            if got != had:
                raise DistillError(
                    f"teacher store {path} was written by other teacher weights (store {had}, this run {got}); "
                    "write the store again for this teacher, or pass the teacher it was written with"
                )
        self.arrays = {f: np.load(path / f"{f}.npy", mmap_mode="r", allow_pickle=False) for f in _FIELDS}
        keys = self.arrays["keys"]
        self.index = {bytes(keys[i]): i for i in range(keys.shape[0])}
        self.map = vocab_map(self.manifest["vocab"], student_tokenizer, mode)
        self.name, self.path = name, path
        self.bytes_per_token = self.manifest["bytes_per_token"]

    def __call__(self, batch: Batch) -> Outputs:
        texts, s_ends = _texts_and_ends(batch)
        starts = self.arrays["starts"]
        rows = []
        for t in texts:
            i = self.index.get(text_key(t))
            if i is None:
                raise DistillError(
                    f"text not in teacher store {self.path}: {t[:50]!r}; the store was written for other texts - "
                    "write it over this run's training texts"
                )
            rows.append((int(starts[i]), int(starts[i + 1])))
        tt = max(b - a for a, b in rows)
        k = self.manifest["k"]
        probs = torch.zeros(len(rows), tt, k)
        ids = torch.zeros(len(rows), tt, k, dtype=torch.long)
        tail = torch.zeros(len(rows), tt)
        ends = []
        for r, (a, b) in enumerate(rows):
            probs[r, : b - a] = torch.from_numpy(np.array(self.arrays["probs"][a:b], dtype=np.float32))
            ids[r, : b - a] = torch.from_numpy(np.array(self.arrays["ids"][a:b], dtype=np.int64))
            tail[r, : b - a] = torch.from_numpy(np.array(self.arrays["tail"][a:b], dtype=np.float32))
            ends.append(np.asarray(self.arrays["ends"][a:b]).tolist())
        entry = _xt_entry(probs, ids, tail, ends, [b - a for a, b in rows], s_ends, self.map)
        return Outputs(logits=None, extras={"xt": {self.name: entry}})


class CrossTeachers(NoTaps):
    """Several teachers at once: each one's `extras["xt"]` under its own name, in one `Outputs`.

    Give each teacher its own term (`aligned_kd` / `uld` with `teacher: <name>`); the `Objective`
    weights them, and any weight may follow a schedule.
    """

    def __init__(self, *teachers):
        names = [t.name for t in teachers]
        if len(set(names)) != len(names):
            raise DistillError(f"teachers need distinct names, got {names}; set name= on each")
        self.teachers = teachers

    def __call__(self, batch: Batch) -> Outputs:
        xt = {}
        for t in self.teachers:
            xt.update(t(batch).extras["xt"])
        return Outputs(logits=None, extras={"xt": xt})
