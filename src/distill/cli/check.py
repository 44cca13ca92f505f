"""`distill check RECIPE [key=value ...]`: build every component of a recipe and run one batch through
each stage it would train (no training), for any command's recipe; prints what it built."""

from __future__ import annotations

import argparse
import sys
import time
from typing import Any

from distill.errors import DistillError, missing_extra

DESCRIPTION = """Builds every component of RECIPE (data, teacher and student with their adapters and
checkpoints, objective terms and feature taps, evaluator; a chain's assistants, a teachers recipe's
candidates, a compression's model, a federated recipe's client models) and runs one batch through
teacher, student and objective for every stage it would train, with the Trainer's own preflight. Nothing
trains and nothing is written. The kind of recipe (run, tune, compress, chain, teachers, federated) is
read from its keys. Prints what it built; exits 0, or 2 with a one-line error."""

# The keys that make a recipe another command's (checked in this order); anything else is `distill run`'s.
KINDS: list[tuple[str, set[str]]] = [
    ("benchmark", {"benchmark"}),
    ("compress", {"compress"}),
    ("tune", {"search", "tune"}),
    ("teachers", {"candidates", "thresholds"}),
    ("chain", {"assistants", "generations"}),
    (
        "federated",
        {
            "clients",
            "rounds",
            "partition",
            "strategies",
            "client_models",
            "server_distill",
            "digest",
            "backend",
        },
    ),
]

EXTRAS = {
    "tune": [("optuna", "tune")],
    "federated": [("flwr", "federated")],
}


def add_parser(sub) -> None:
    p = sub.add_parser(
        "check",
        help="build a recipe's components and run one batch through them, without training",
        description=DESCRIPTION,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("recipe", help="a recipe YAML file of any command (run, tune, compress, chain, ...)")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="dotted overrides of recipe keys")


def recipe_kind(data: dict[str, Any]) -> str:
    for kind, keys in KINDS:
        if keys & set(data):
            return kind
    return "run"


def main(args) -> int:
    t0 = time.perf_counter()
    try:
        lines = check(args.recipe, list(args.overrides))
    except (DistillError, KeyboardInterrupt):
        raise  # `distill` prints a DistillError as one line, exit 2
    except Exception as e:  # noqa: BLE001 - checking is the point: any failure is one line, exit 2
        if (hint := missing_extra(e)) is not None:
            raise hint from e
        first = str(e).strip().splitlines()[0][:300] if str(e).strip() else ""
        print(f"distill check: error: {type(e).__name__}: {first}", file=sys.stderr)
        return 2
    print("\n".join(lines))
    print(
        f"ok: every component built and one batch ran through each stage ({time.perf_counter() - t0:.1f} s)"
    )
    return 0


def check(path: str, overrides: list[str]) -> list[str]:
    """Checks the recipe at `path`; returns the lines describing what was built."""
    import importlib.util

    from distill.run.config import apply_overrides, load_yaml

    data = apply_overrides(load_yaml(path), overrides)
    kind = recipe_kind(data)
    if kind == "benchmark":
        name = data.get("benchmark")
        raise DistillError(
            f"{path} holds the settings of benchmarks/{name}.py, not a recipe of a distill command; "
            f"run it with: python benchmarks/{name}.py --config {path}"
        )
    for module, extra in EXTRAS.get(kind, []):
        if importlib.util.find_spec(module) is None:
            raise DistillError(f"distill {kind} needs {module}: pip install 'distill[{extra}]'")
    lines = [f"recipe: {path} (distill {kind})"]
    lines += {
        "run": _check_run,
        "tune": _check_tune,
        "compress": _check_compress,
        "chain": _check_chain,
        "teachers": _check_teachers,
        "federated": _check_federated,
    }[kind](data, path)
    return lines


# --------------------------------------------------------------------------- printing


def _n(x: int) -> str:
    return f"{x:,}"


def _data_line(d: dict[str, Any]) -> str:
    sizes = ", ".join(f"{k} {_n(v)}" for k, v in d["sizes"].items())
    classes = f", {d['num_classes']} classes" if d.get("num_classes") else ""
    return f"data: {d['name']}: {sizes}{classes}; one batch: inputs {d['batch_inputs']}, targets {d['batch_targets']}"


def _model_line(role: str, m: dict[str, Any], extra: str = "") -> str:
    frozen = "" if m["trainable"] == m["params"] else f" ({_n(m['trainable'])} trainable)"
    return f"{role}: {m['spec']} ({m['class']}), {_n(m['params'])} parameters{frozen}{extra}"


def _objective_lines(o: dict[str, Any]) -> list[str]:
    terms = ", ".join(
        f"{n} x{t['weight']} ({t['class']}{', needs the teacher' if t['needs_teacher'] else ''})"
        for n, t in o["terms"].items()
    )
    taps = f"student {o['student_taps'] or '-'}, teacher {o['teacher_taps'] or '-'}"
    return [f"objective: {terms}", f"taps: {taps}"]


def _stage_lines(stages: dict[str, Any]) -> list[str]:
    out = []
    for name, s in stages.items():
        losses = ", ".join(f"{k} {v:.4g}" for k, v in s["losses"].items())
        metrics = ", ".join(f"{k} {v:.4g}" for k, v in s["metrics"].items())
        out.append(f"preflight {name}: {losses}" + (f"; evaluator: {metrics}" if metrics else ""))
    return out


def _report_lines(report: dict[str, Any]) -> list[str]:
    lines = [
        _data_line(report["data"]),
        _model_line("teacher", report["teacher"], f", {report['teacher']['source']}"),
    ]
    cut = report["student"].get("cut")
    how = cut and (f"by importance ({cut.get('importance')})" if cut["select"] == "importance" else "spread")
    blocks = f", teacher blocks {cut['blocks']} of {cut['teacher_blocks']} {how}" if cut else ""
    lines.append(_model_line("student", report["student"], blocks))
    if "tokenizers" in report:  # a teacher of another tokenizer: how well the pair fits
        lines.append(report["tokenizers"])
    return lines + _objective_lines(report["objective"]) + _stage_lines(report["stages"])


# --------------------------------------------------------------------------- kinds


def _check_run(data: dict[str, Any], path: str) -> list[str]:
    from distill.run.config import parse_recipe, require_sections
    from distill.run.pipeline import preflight_recipe

    require_sections(data, path)
    return _report_lines(preflight_recipe(parse_recipe(data, source=path)))


def _check_tune(data: dict[str, Any], path: str) -> list[str]:
    from distill.run.pipeline import preflight_recipe
    from distill.tune.config import parse_tune_recipe

    cfg = parse_tune_recipe(data, source=path)  # validates the search space against the recipe
    lines = [f"search: {', '.join(cfg.search) or '-'}; {cfg.tune.trials} trials"]
    return lines + _report_lines(preflight_recipe(cfg))


def _objective_and_stage_lines(cfg, kd, stages: dict[str, Any]) -> list[str]:
    """The distillation objective's terms and each stage's preflight, as printed lines."""
    from distill.run.preflight import describe_objective

    weights = {n: t.weight for n, t in cfg.objective.terms.items()}
    return _objective_lines(describe_objective(kd, weights)) + _stage_lines(stages)


def _setup(cfg) -> tuple[Any, Any, Any]:
    """(data, first batch on the device, device) of a recipe."""
    from distill.data.bundle import build_data
    from distill.engine.trainer import resolve_device
    from distill.run.preflight import first_batch

    bundle = build_data(cfg.data.name, cfg.data.class_path, cfg.data.init_args, seed=cfg.seed)
    device = resolve_device(cfg.trainer.device)
    return bundle, first_batch(bundle, cfg.data.batch_size, cfg.seed).to(device), device


def _model(spec, bundle, device, teacher=None):
    from distill.checkpoint import load_weights
    from distill.models.build import build_model

    model = build_model(spec.spec(), bundle, teacher=teacher)
    if spec.checkpoint:
        load_weights(model, spec.checkpoint)
    return model.to(device)


def _evaluator_spec(cfg):
    return cfg.evaluator.spec() if cfg.evaluator is not None else None


def _check_compress(data: dict[str, Any], path: str) -> list[str]:
    import copy
    import importlib.util

    from distill.compress.config import parse_compress_recipe
    from distill.run.pipeline import build_adapter, build_objective, scratch_objective
    from distill.run.preflight import describe_data, describe_model, run_stage
    from distill.teachers import Teacher

    cfg = parse_compress_recipe(data, source=path)
    cc = cfg.compress
    needs = [("torch_pruning", cc.prune.enabled), ("onnx", True), ("onnxruntime", True)]
    for module, needed in needs:
        if needed and importlib.util.find_spec(module) is None:
            raise DistillError(f"distill compress needs {module}: pip install 'distill[compress]'")
    bundle, batch, device = _setup(cfg)
    adapter = build_adapter(cfg.teacher.adapter)
    model = _model(cfg.teacher, bundle, device)
    stages: dict[str, Any] = {}
    ev = _evaluator_spec(cfg)
    if not cfg.teacher.checkpoint:
        stages["baseline"] = run_stage(
            "baseline", model, scratch_objective(cfg), None, adapter, batch, device, ev
        )
    described = describe_model(cfg.teacher.spec(), model)
    recovered = copy.deepcopy(model)  # stands in for the pruned copy: same calls, same terms
    teacher = Teacher(model, adapter=adapter)
    kd = build_objective(cfg)
    try:
        stages["pruned_kd"] = run_stage("pruned_kd", recovered, kd, teacher, adapter, batch, device, ev)
    finally:
        teacher.tap.remove()
    source = f"checkpoint {cfg.teacher.checkpoint}" if cfg.teacher.checkpoint else "trained first"
    lines = [
        _data_line(describe_data(bundle, batch, cfg.data.name or cfg.data.class_path)),
        _model_line("model to compress", described, f", {source}"),
        f"compress: prune {'ratio ' + str(cc.prune.ratio) if cc.prune.enabled else 'off'}, "
        f"quantize {'on' if cc.quantize.enabled else 'off'}",
    ]
    return lines + _objective_and_stage_lines(cfg, kd, stages)


def _check_chain(data: dict[str, Any], path: str) -> list[str]:
    from distill.chain import ChainRecipe, chain_stages
    from distill.run.config import format_validation_error
    from distill.run.pipeline import build_adapter, build_objective, scratch_objective
    from distill.run.preflight import describe_data, describe_model, run_stage
    from distill.teachers import Teacher

    cfg = _validate(ChainRecipe, data, path, format_validation_error)
    bundle, batch, device = _setup(cfg)
    ev = _evaluator_spec(cfg)
    lines = [_data_line(describe_data(bundle, batch, cfg.data.name or cfg.data.class_path))]
    stages: dict[str, Any] = {}
    prev = None
    kd = build_objective(cfg)
    for name, spec in chain_stages(cfg):
        model = _model(spec, bundle, device)
        adapter = build_adapter(spec.adapter)
        lines.append(_model_line(name, describe_model(spec.spec(), model)))
        if prev is None:
            if not cfg.teacher.checkpoint:
                if cfg.teacher.train is None:
                    raise DistillError("teacher: give a checkpoint to load or a train: section to train it")
                stages[name] = run_stage(
                    name, model, scratch_objective(cfg), None, adapter, batch, device, ev
                )
        else:
            teacher = Teacher(prev[0], adapter=prev[1])
            try:
                stages[name] = run_stage(
                    name, model, build_objective(cfg), teacher, adapter, batch, device, ev
                )
            finally:
                teacher.tap.remove()
        prev = (model, adapter)
    return lines + _objective_and_stage_lines(cfg, kd, stages)


def _check_teachers(data: dict[str, Any], path: str) -> list[str]:
    from distill.run.config import format_validation_error
    from distill.run.pipeline import build_adapter, scratch_objective
    from distill.run.preflight import describe_data, describe_model, run_stage
    from distill.teacher_choice import CandidateConfig, TeachersRecipe

    cfg = _validate(TeachersRecipe, data, path, format_validation_error)
    bundle, batch, device = _setup(cfg)
    ev = _evaluator_spec(cfg)
    lines = [_data_line(describe_data(bundle, batch, cfg.data.name or cfg.data.class_path))]
    stages: dict[str, Any] = {}
    student = _model(cfg.student, bundle, device)
    lines.append(_model_line("student", describe_model(cfg.student.spec(), student)))
    stages["student_scratch"] = run_stage(
        "student_scratch",
        student,
        scratch_objective(cfg),
        None,
        build_adapter(cfg.student.adapter),
        batch,
        device,
        ev,
    )
    candidates = cfg.candidates or [CandidateConfig(**cfg.teacher.model_dump(), label="teacher")]
    for i, cand in enumerate(candidates):
        label = cand.label or f"{cand.name or cand.class_path.rsplit('.', 1)[-1]}{i}"
        if not cand.checkpoint and cand.train is None:
            raise DistillError(f"candidate '{label}': give a checkpoint to load or a train: section")
        model = _model(cand, bundle, device)
        source = (
            f"checkpoint {cand.checkpoint}"
            if cand.checkpoint
            else f"trained first ({cand.train.epochs} epochs)"
        )
        lines.append(_model_line(f"candidate {label}", describe_model(cand.spec(), model), f", {source}"))
        stages[f"candidate_{label}"] = run_stage(
            f"candidate_{label}",
            model,
            scratch_objective(cfg),
            None,
            build_adapter(cand.adapter),
            batch,
            device,
            ev,
        )
    return lines + _stage_lines(stages)


def _check_federated(data: dict[str, Any], path: str) -> list[str]:
    from distill.federated.config import parse_federated
    from distill.federated.task import FederatedTask
    from distill.losses import CrossEntropy
    from distill.objective import Objective
    from distill.run.pipeline import build_adapter
    from distill.run.preflight import describe_data as _describe
    from distill.run.preflight import describe_model, first_batch, run_stage

    recipe = parse_federated(data, source=path)
    task = FederatedTask(recipe)
    batch = first_batch(task.bundle, recipe.local.batch_size, recipe.seed).to(task.device)
    split = task.split.describe()
    lines = [
        _data_line(_describe(task.bundle, batch, recipe.data.name or recipe.data.class_path)),
        f"split: {recipe.clients} clients of {split['client_sizes']} samples ({recipe.partition.scheme}), "
        f"public {_n(split['public'])}, test {_n(split['test'])}; {recipe.rounds} rounds of "
        f"{', '.join(recipe.strategies)}",
    ]
    stages: dict[str, Any] = {}
    specs = [("model", recipe.model)] + [
        (f"client_models[{i}]", m) for i, m in enumerate(recipe.client_models)
    ]
    for role, spec in specs:
        model = _model(spec, task.bundle, task.device)
        lines.append(_model_line(role, describe_model(spec.spec(), model)))
        stages[role] = run_stage(
            role,
            model,
            Objective({"ce": CrossEntropy()}),
            None,
            build_adapter(spec.adapter),
            batch,
            task.device,
        )
    return lines + _stage_lines(stages)


def _validate(model_cls, data: dict[str, Any], path: str, fmt):
    from pydantic import ValidationError

    from distill.errors import ConfigError

    try:
        return model_cls.model_validate(data)
    except ValidationError as e:
        raise ConfigError(f"{path}: {fmt(e, model_cls)}") from None


if __name__ == "__main__":  # python -m distill.cli.check RECIPE ...
    parser = argparse.ArgumentParser(prog="distill")
    add_parser(parser.add_subparsers(dest="command"))
    sys.exit(main(parser.parse_args(["check", *sys.argv[1:]])))
