"""`distill cache-teacher RECIPE.yaml`: run the recipe's teacher once over its training data and
write a store that recipes then read with `teacher.cache: PATH` (see `distill.teachers.store`)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from distill.errors import DistillError

HELP = "run the recipe's teacher once over the training data and store its outputs"
DESCRIPTION = (
    "Loads the recipe's teacher (teacher.checkpoint, or --teacher-checkpoint, e.g. a run's "
    "checkpoints/teacher/final.safetensors; or a pretrained hf model's own weights) with its adapter "
    "and, under teacher.calibrate, its temperature fitted on the validation split, runs it over the "
    "training split and writes a store "
    "of its logits (all of them up to 1,000 classes, else the top-k in float16) and any tapped "
    "features. An interrupted write continues where it stopped when run again. Train from the "
    "store by setting teacher.cache: STORE in the recipe."
)


def add_parser(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser("cache-teacher", help=HELP, description=DESCRIPTION)
    p.add_argument("recipe", help="path to a recipe YAML file")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="dotted overrides of recipe keys")
    p.add_argument("--out", default=None, help="store folder (default caches/<recipe name>-teacher)")
    p.add_argument(
        "--teacher-checkpoint", default=None, help="teacher weights (overrides teacher.checkpoint)"
    )
    p.add_argument(
        "--topk",
        default="auto",
        help="keep the K largest logits per sample; 'all' keeps every logit; 'auto' (default) keeps "
        "all up to 1,000 classes and the top 100 beyond",
    )
    p.add_argument(
        "--tap", action="append", default=[], metavar="PATH", help="also store this teacher feature"
    )
    p.add_argument(
        "--augment-copies",
        type=int,
        default=None,
        metavar="N",
        help="the training data augments randomly: store N seeded views of each sample",
    )
    p.add_argument(
        "--mix-views",
        type=int,
        default=None,
        metavar="K",
        help="the recipe mixes (trainer.mix): store K fixed mixed views of each input; epoch e of the "
        "run trains on view e mod K",
    )
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--shard-size", type=int, default=8192, help="samples per shard file (the unit of resume)")
    p.add_argument("--dtype", choices=["float16", "float32"], default="float16")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:1 ...")
    p.add_argument("--overwrite", action="store_true", help="replace a store already at --out")
    return p


def _topk(value: str) -> int | str | None:
    if value in ("auto", "all"):
        return "auto" if value == "auto" else None
    try:
        k = int(value)
    except ValueError:
        raise DistillError(f"--topk: '{value}' is not a positive integer, 'all' or 'auto'") from None
    if k < 1:
        raise DistillError(f"--topk must be at least 1, got {k}")
    return k


def _tokens_per_sample(dataset) -> int | None:
    """Tokens in one sample of token data (packed blocks have one length), else None."""
    try:
        item = dataset[0]
    except Exception:  # noqa: BLE001 - any dataset that cannot say: not token data
        return None
    ids = item.get("input_ids") if isinstance(item, dict) else None
    return len(ids) if ids is not None and hasattr(ids, "__len__") else None


def _cross_store(cfg, data, model, out: Path, args) -> int:
    """`distill run`'s cross-tokenizer store (`teacher.cache`), written here: the teacher's top-k
    (`--topk`, else `teacher.cross_k`) on the data's texts in its own tokens."""
    import json
    import shutil

    from distill.run.cross import cross_teacher

    manifest = out / "manifest.json"
    if manifest.is_file():
        try:
            kind = json.loads(manifest.read_text()).get("kind")
        except (OSError, ValueError, AttributeError):
            kind = None  # unreadable: not replaced
        if not args.overwrite:
            raise DistillError(
                f"a teacher store is at {out} already; train from it with teacher.cache={out}, or pass "
                "--overwrite to write it again"
            )
        if kind != "cross_tokenizer":
            raise DistillError(
                f"{out} holds something other than a cross-tokenizer store; choose another --out"
            )
        shutil.rmtree(out)  # a store distill wrote (its manifest says so)
    elif out.exists() and any(out.iterdir()):
        raise DistillError(f"{out} exists and is not a teacher store; choose another --out")
    k = _topk(args.topk)
    k = k if isinstance(k, int) else None  # 'auto' / 'all': the recipe's teacher.cross_k
    cfg = cfg.model_copy(update={"teacher": cfg.teacher.model_copy(update={"cache": str(out)})})
    cross_teacher(cfg, data, model, k=k)
    print(f"train from it with: teacher.cache={out}")
    return 0


def main(args) -> int:
    import torch

    from distill.data.bundle import build_data
    from distill.engine.trainer import resolve_device, seed_everything
    from distill.run.config import apply_overrides, load_yaml, parse_recipe
    from distill.run.cross import is_cross
    from distill.run.hf import resolve_recipe
    from distill.run.pipeline import add_transfer, build_objective, load_teacher, store_rows
    from distill.teachers import Teacher
    from distill.teachers.store import outputs_fingerprint, write_store

    try:
        cfg = parse_recipe(apply_overrides(load_yaml(args.recipe), args.overrides), source=args.recipe)
        cfg = resolve_recipe(cfg)  # what an hf teacher implies (the data's tokenizer, ...)
        if cfg.teacher.served is not None:
            raise DistillError(
                "teacher.served: the responses file is the served teacher's store already; distil from it "
                "with distill run (nothing to cache)"
            )
        checkpoint = args.teacher_checkpoint or cfg.teacher.checkpoint
        pretrained = cfg.teacher.name == "hf" and cfg.teacher.init_args.get("path")  # its own weights
        if not checkpoint and (cfg.teacher.train is not None or not pretrained):
            raise DistillError(
                "cache-teacher needs trained teacher weights: set teacher.checkpoint in the recipe or pass "
                "--teacher-checkpoint (e.g. runs/<name>/checkpoints/teacher/final.safetensors)"
            )
        if checkpoint and not Path(checkpoint).exists():
            raise DistillError(f"teacher checkpoint {checkpoint} does not exist")
        data = build_data(cfg.data.name, cfg.data.class_path, cfg.data.init_args, seed=cfg.seed)
        seed_everything(cfg.seed)
        out = Path(args.out) if args.out else Path("caches") / f"{cfg.name}-teacher"
        # the teacher as `distill run` builds it: its weights, its adapter (teacher.adapter) and its
        # calibration (teacher.calibrate), so the store holds what the live teacher would teach
        tc = cfg.teacher.model_copy(update={"checkpoint": checkpoint})
        model, adapter, info = load_teacher(tc, "teacher", data, cfg, out)
        if is_cross(cfg):  # a teacher of another tokenizer: a store of texts, for any student tokenizer
            return _cross_store(cfg, data, model, out, args)
        dtype = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}[cfg.teacher.dtype]
        teacher = Teacher(model, adapter=adapter, dtype=dtype, compile=cfg.teacher.compile)
        if args.mix_views is not None and args.augment_copies is not None:
            raise DistillError(
                "--mix-views replays the augmentation of each view already; drop --augment-copies"
            )
        objective = build_objective(cfg)
        train, _ = store_rows(cfg, add_transfer(cfg, data, objective), objective, args.mix_views)
        spec = cfg.teacher.adapter.spec() if cfg.teacher.adapter is not None else None
        info = write_store(
            teacher,
            train,
            out,
            topk=_topk(args.topk),
            taps=args.tap,
            batch_size=args.batch_size,
            shard_size=args.shard_size,
            device=resolve_device(args.device),
            dtype=args.dtype,
            augment_copies=args.augment_copies,
            augment_seed=cfg.seed,
            outputs=outputs_fingerprint(spec, info.get("temperature")),
            num_workers=cfg.data.num_workers,
            collate_fn=data.collate_fn,
            overwrite=args.overwrite,
        )
        tokens = _tokens_per_sample(train)
        if tokens and info is not None:  # language models: the store's cost per token
            print(f"{info.bytes_per_sample / tokens:.1f} bytes per token ({tokens} tokens per sample)")
        print(f"train from it with: teacher.cache={out}")
        return 0
    except DistillError as e:
        print(f"distill cache-teacher: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("distill cache-teacher: interrupted; run the same command again to continue", file=sys.stderr)
        return 130
