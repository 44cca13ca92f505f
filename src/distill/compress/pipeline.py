"""`distill compress`: baseline -> prune -> recover (KD vs fine-tuning) -> INT8 -> export.

Every stage writes its outputs atomically and is skipped when they exist, so an interrupted or
failed run continues with `--resume`. Each stage's outputs carry a fingerprint of the recipe keys
they depend on; changing a later stage's keys (say the calibration size) and resuming redoes that
stage and the ones after it, never the earlier ones. Every model is measured the same way, on
ONNX Runtime CPU: file size, latency p50/p95, test accuracy and agreement with the baseline.
"""

from __future__ import annotations

import copy
import json
import shutil
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
from torch import nn

from distill.checkpoint import atomic_write_text, load_weights, save_weights
from distill.compress.config import CompressRecipe
from distill.compress.export import export_onnx, input_names, to_numpy_inputs
from distill.compress.prune import load_pruned, prune_model, reinitialize, save_pruned
from distill.compress.quantize import calibration_reader, latency, predict, quantize_dynamic, quantize_static
from distill.data.bundle import DataBundle, build_data
from distill.engine.trainer import make_loader, seed_everything
from distill.errors import ConfigError, DistillError
from distill.models.build import build_model
from distill.outputs import as_batch
from distill.run.measure import count_params, size_mb
from distill.run.pipeline import aggregate, build_objective, scratch_objective, train_stage
from distill.run.rundir import RunDir
from distill.teachers import Teacher

STAGES = ("baseline", "prune", "recovery", "quantize", "export")
RECOVERY_ROWS = {"kd": "pruned_kd", "finetune": "pruned_finetune", "kd_student": "kd_student"}
KNOWN_ROWS = ("baseline", "pruned", *RECOVERY_ROWS.values())


def _fingerprints(cfg: CompressRecipe) -> dict[str, str]:
    """For each stage, the recipe keys its outputs depend on (cumulative)."""
    d = cfg.model_dump(mode="json")
    c = d["compress"]
    parts = {
        "baseline": {"seed": d["seed"], "data": d["data"], "teacher": d["teacher"]},
        "prune": {"prune": c["prune"]},
        "recovery": {
            "objective": d["objective"],
            "trainer": d["trainer"],
            "recovery": c["recovery"],
            "batch": [d["data"]["batch_size"]],
        },
        "quantize": {"quantize": c["quantize"], "opset": c["export"]["opset"]},
        "export": {"export": c["export"]},
        "measure": {"bench": c["bench"]},
    }
    out, acc = {}, {}
    for stage in STAGES:
        acc[stage] = parts[stage]
        out[stage] = json.dumps(acc, sort_keys=True)
    out["measure"] = json.dumps(parts["measure"], sort_keys=True)
    return out


def _stage_outputs(out: Path, stage: str) -> list[Path]:
    if stage == "baseline":
        return [out / "checkpoints" / "baseline", out / "onnx"]
    if stage == "prune":
        return [out / "pruned", out / "onnx"]
    if stage == "recovery":
        return [out / "checkpoints" / r for r in RECOVERY_ROWS.values()] + [out / "onnx"]
    if stage == "quantize":
        return list((out / "onnx").glob("*_int8.onnx")) if (out / "onnx").exists() else []
    if stage == "export":
        return [out / "export"]
    return [out / "rows"]


def _invalidate(out: Path, cfg: CompressRecipe) -> None:
    """Deletes the outputs of the first stage whose recipe keys changed, and of all later ones."""
    path = out / "stages.json"
    old = json.loads(path.read_text()) if path.exists() else {}
    new = _fingerprints(cfg)
    stale = False
    for stage in (*STAGES, "measure"):
        stale = stale or (stage in old and old[stage] != new[stage])
        if stale:
            for p in _stage_outputs(out, stage):
                shutil.rmtree(p, ignore_errors=True) if p.is_dir() else p.unlink(missing_ok=True)
            if stage != "measure":
                shutil.rmtree(out / "rows", ignore_errors=True)
    atomic_write_text(path, json.dumps(new, indent=1))


class _Runner:
    def __init__(self, cfg: CompressRecipe, out: Path):
        self.cfg, self.out = cfg, out
        self.cc = cfg.compress
        self.rows: list[dict[str, Any]] = []
        self.models: dict[str, nn.Module] = {}
        self.data: DataBundle = build_data(
            cfg.data.name, cfg.data.class_path, cfg.data.init_args, seed=cfg.seed
        )
        loader, _ = make_loader(self.data.train, 1, False, cfg.seed, collate_fn=self.data.collate_fn)
        self.example = as_batch(next(iter(loader))).inputs
        self.names = input_names(self.example)
        self.base_preds: np.ndarray | None = None

    # ------------------------------------------------------------------ helpers

    def loader(self, split: str, batch_size: int | None = None):
        ds = getattr(self.data, split) or (self.data.val if split == "test" else None)
        if ds is None:
            raise DistillError(f"the dataset has no {split} split")
        bs = batch_size or self.cfg.data.eval_batch_size
        return make_loader(ds, bs, False, self.cfg.seed, collate_fn=self.data.collate_fn)[0]

    def fresh(self) -> nn.Module:
        seed_everything(self.cfg.seed)
        return build_model(self.cfg.teacher.spec(), self.data)

    def onnx_path(self, name: str) -> Path:
        return self.out / "onnx" / f"{name}.onnx"

    def measure(self, name: str, onnx: Path, model: nn.Module, stage: str, extra: dict | None = None) -> None:
        """Adds a row measured on ONNX Runtime (cached in rows/<name>.json)."""
        cache = self.out / "rows" / f"{name}.json"
        if cache.exists():
            row = json.loads(cache.read_text())
        else:
            from distill.compress.quantize import session

            b = self.cc.bench
            sess = session(onnx, b.intra_op_threads)
            preds, targets = predict(sess, self.loader("test"), self.names)
            row: dict[str, Any] = {"name": name, "stage": stage, "params": count_params(model)}
            row["size_mb"] = onnx.stat().st_size / 1e6
            if not name.endswith("_int8"):
                row["safetensors_mb"] = size_mb(model)
            feed = to_numpy_inputs(self.example, self.names)
            for bs in b.batch_sizes:
                lat = latency(sess, feed, bs, b.repeats, b.warmup)
                row[f"latency_ms_b{bs}"] = lat["p50"]
                row[f"latency_ms_b{bs}_p95"] = lat["p95"]
            if targets is not None:
                row["accuracy"] = float((preds == targets).mean())
            if name == "baseline":
                self.base_preds = preds
                cache.parent.mkdir(parents=True, exist_ok=True)
                np.save(self.out / "rows" / "baseline.preds.npy", preds)
            if self.base_preds is not None:
                row["agreement"] = float((preds == self.base_preds).mean())
            row.update(extra or {})
            atomic_write_text(cache, json.dumps(row, indent=1))
        if name == "baseline" and self.base_preds is None:
            self.base_preds = np.load(self.out / "rows" / "baseline.preds.npy", allow_pickle=False)
        self.rows.append(row)

    def export(self, name: str, model: nn.Module) -> Path:
        path = self.onnx_path(name)
        if not path.exists():
            export_onnx(copy.deepcopy(model).cpu().eval(), self.example, path, self.cc.export.opset)
        return path

    # ------------------------------------------------------------------ stages

    def baseline(self) -> None:
        cfg = self.cfg
        model = self.fresh()
        if cfg.teacher.checkpoint:
            load_weights(model, cfg.teacher.checkpoint)
        elif cfg.teacher.train is not None:
            train_stage(
                "baseline", model, scratch_objective(cfg), self.data, cfg, cfg.teacher.train, self.out
            )
        else:
            raise ConfigError("teacher: give a checkpoint of the model to compress, or a train: section")
        model = model.cpu().eval()
        self.models["baseline"] = model
        self.measure("baseline", self.export("baseline", model), model, "baseline")

    def prune(self) -> None:
        folder = self.out / "pruned"
        if (folder / "shapes.json").exists():
            model = load_pruned(self.fresh(), folder)
        else:
            model = copy.deepcopy(self.models["baseline"]).requires_grad_(True)
            grads = None
            if self.cc.prune.importance == "taylor":
                grads = (
                    (b.inputs, b.targets)
                    for b in map(as_batch, self.loader("train", self.cfg.data.batch_size))
                )
            info = prune_model(model, self.example, self.cc.prune, grads)
            save_pruned(folder, model, info)
        model = model.cpu().eval()
        self.models["pruned"] = model
        self.measure("pruned", self.export("pruned", model), model, "prune")

    def recover(self) -> None:
        cfg = self.cfg
        teacher = Teacher(copy.deepcopy(self.models["baseline"]))
        for method in self.cc.recovery.methods:
            name = RECOVERY_ROWS[method]
            model = load_pruned(self.fresh(), self.out / "pruned")
            if method == "kd_student":
                reinitialize(model, cfg.seed)
            objective = scratch_objective(cfg) if method == "finetune" else build_objective(cfg)
            t = None if method == "finetune" else teacher
            model = train_stage(name, model, objective, self.data, cfg, cfg.trainer, self.out, t)
            model = model.cpu().eval()
            self.models[name] = model
            self.measure(name, self.export(name, model), model, "recovery")

    def quantize(self) -> None:
        q = self.cc.quantize
        if q.qat:
            raise ConfigError(
                "compress.quantize.qat: quantization-aware training (torchao PT2E) is not implemented; set it false"
            )
        mode = q.mode
        if mode == "auto":
            tokens = isinstance(self.example, Mapping) and not any(
                v.is_floating_point() for v in self.example.values()
            )
            mode = "dynamic" if tokens else "static"
        for src in q.rows:
            if src not in self.models:
                if src in KNOWN_ROWS:  # its stage is disabled in this recipe
                    continue
                raise ConfigError(
                    f"compress.quantize.rows: '{src}' is not a row of this run (rows: {', '.join(self.models)})"
                )
            name = f"{src}_int8"
            dst = self.onnx_path(name)
            if not dst.exists():
                if mode == "static":
                    reader = calibration_reader(
                        self.loader("train", self.cfg.data.batch_size), self.names, q.calibration_samples
                    )
                    quantize_static(self.onnx_path(src), dst, reader, q.per_channel, q.calibration_method)
                else:
                    quantize_dynamic(self.onnx_path(src), dst, q.per_channel)
            self.measure(name, dst, self.models[src], "quantize", {"quantization": mode})

    def export_final(self) -> None:
        row = self.cc.export.row
        if row not in self.models and row in KNOWN_ROWS and not self.cc.prune.enabled:
            row = "baseline"  # nothing was pruned: ship the baseline
        if row not in self.models:
            raise ConfigError(
                f"compress.export.row: '{row}' is not a row of this run (rows: {', '.join(self.models)})"
            )
        folder = self.out / "export"
        if (folder / "model.safetensors").exists():
            return
        folder.mkdir(parents=True, exist_ok=True)
        for suffix in (".onnx", ".int8.onnx"):
            src = self.out / "onnx" / f"{row}{suffix.replace('.int8', '_int8')}"
            if src.exists():
                shutil.copyfile(src, folder / f"model{suffix}")
        if (self.out / "pruned" / "shapes.json").exists() and row != "baseline":
            shutil.copyfile(self.out / "pruned" / "shapes.json", folder / "shapes.json")
        save_weights(folder / "model.safetensors", self.models[row].state_dict(), {"row": row})


def run_compress(
    cfg: CompressRecipe, out: str | Path, resume: bool = False, overwrite: bool = False
) -> dict[str, Any]:
    """Runs the stages the recipe enables; writes summary.json (one row per model) and report.md.

    On a DistillError in a stage, the rows measured so far are written with the error, then the
    error is raised again: earlier stages stay on disk and `--resume` continues from them.
    """
    from distill.compress.report import write_compress_report

    out = Path(out)
    t0 = time.perf_counter()
    if resume and (out / "stages.json").exists():
        atomic_write_text(out / "config.yaml", cfg.to_yaml())  # stages.json decides what is redone
    with RunDir(out, cfg.to_yaml(), resume=resume, overwrite=overwrite):
        _invalidate(out, cfg)
        runner = _Runner(cfg, out)
        summary: dict[str, Any] = {"command": "compress", "recipe": cfg.name, "seed": cfg.seed}
        stage = "setup"
        try:
            stage = "baseline"
            runner.baseline()
            if cfg.compress.prune.enabled:
                stage = "prune"
                runner.prune()
                stage = "recovery"
                runner.recover()
            if cfg.compress.quantize.enabled:
                stage = "quantize"
                runner.quantize()
            stage = "export"
            runner.export_final()
        except DistillError as e:
            summary.update(failed_stage=stage, error=str(e))
            raise
        finally:
            summary["wall_seconds"] = round(time.perf_counter() - t0, 1)
            summary["rows"] = runner.rows
            atomic_write_text(out / "summary.json", json.dumps(summary, indent=2))
            write_compress_report(out)
        return summary


def run_compress_seeds(
    cfg: CompressRecipe, out: str | Path, seeds: int, resume: bool = False, overwrite: bool = False
) -> dict[str, Any]:
    """`seeds` runs (seed, seed+1, ...) in `out/seed<k>/`, summarised as mean ± std in `out/`."""
    from distill.compress.report import write_compress_report

    out = Path(out)
    if seeds == 1:
        return run_compress(cfg, out, resume, overwrite)
    if resume and (out / "config.yaml").exists():
        atomic_write_text(out / "config.yaml", cfg.to_yaml())
    with RunDir(out, cfg.to_yaml(), resume=resume, overwrite=overwrite):
        summaries = []
        for k in range(seeds):
            seed_cfg = cfg.model_copy(update={"seed": cfg.seed + k})
            summaries.append(run_compress(seed_cfg, out / f"seed{cfg.seed + k}", resume=True))
        summary = aggregate(summaries, "compress")
        atomic_write_text(out / "summary.json", json.dumps(summary, indent=2))
        write_compress_report(out)
        return summary
