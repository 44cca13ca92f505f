"""Structured pruning with Torch-Pruning, and the pruned architecture's save/reload without pickle.

Torch-Pruning builds a dependency graph of the model (which channels of which layers must go
together: a conv's outputs, the next BatchNorm, the next conv's inputs, residual sums) and
removes whole channel groups, so the result is a genuinely smaller dense model. Importance:
magnitude (L1/L2 of the grouped weights) or first-order Taylor |w * dL/dw| (Molchanov et al.,
"Importance Estimation for Neural Network Pruning", CVPR 2019); the group criterion follows
Fang et al., "DepGraph: Towards Any Structural Pruning", CVPR 2023.

A pruned model's shapes differ from its class's constructor arguments. It is saved as plain
safetensors weights plus `shapes.json` (each module's parameter shapes and size attributes);
`rebuild` resizes a freshly built model to those shapes, then the weights load strictly.
"""

from __future__ import annotations

import fnmatch
import json
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from distill.adapters import call_model, read_outputs
from distill.checkpoint import atomic_write_text, load_into, load_weights_file, save_weights
from distill.errors import CheckpointError, DistillError

# Size attributes that modules keep beside their parameters; rebuilt with the shapes.
_SIZE_ATTRS = (
    "in_channels",
    "out_channels",
    "groups",
    "in_features",
    "out_features",
    "num_features",
    "normalized_shape",
    "num_embeddings",
    "embedding_dim",
    "num_attention_heads",
    "attention_head_size",
    "all_head_size",
    "num_heads",
    "head_dim",
    "embed_dim",
)
_PRUNABLE = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear)


def _width(m: nn.Module) -> int:
    return int(m.out_channels if isinstance(m, nn.modules.conv._ConvNd) else m.out_features)


def classifier_path(model: nn.Module, example: Any) -> str:
    """The module path of the last conv/linear layer run in a forward pass (the one producing
    the logits), found with hooks so no model needs to name it."""
    order: list[str] = []
    hooks = [
        m.register_forward_hook(lambda mod, i, o, n=name: order.append(n))
        for name, m in model.named_modules()
        if isinstance(m, _PRUNABLE)
    ]
    try:
        with torch.no_grad():
            call_model(model, example)
    finally:
        for h in hooks:
            h.remove()
    if not order:
        raise DistillError("the model has no conv or linear layer: nothing to prune")
    return order[-1]


def _matches(path: str, patterns: Iterable[str]) -> bool:
    return any(fnmatch.fnmatchcase(path, p) for p in patterns)


def _importance(name: str):
    import torch_pruning as tp

    if name == "l1":
        return tp.importance.GroupMagnitudeImportance(p=1)
    if name == "l2":
        return tp.importance.GroupMagnitudeImportance(p=2)
    if name == "taylor":
        return tp.importance.GroupTaylorImportance()
    return tp.importance.RandomImportance()


def prune_model(
    model: nn.Module,
    example: Any,
    cfg: Any,
    grad_batches: Iterable[tuple[Any, Tensor]] | None = None,
) -> dict[str, Any]:
    """Prunes `model` in place as `cfg` (a `PruneConfig`) says; returns what was done.

    Args:
        example: one input (a tensor or a mapping of tensors) to trace the dependency graph.
        grad_batches: (inputs, targets) batches whose cross-entropy gradients feed the Taylor
            criterion (needed only for `importance: taylor`).

    Raises:
        DistillError: a ratio that would remove every channel of a layer, or a layer emptied anyway.
    """
    import torch_pruning as tp

    model.eval()
    head = classifier_path(model, example)
    ignored_patterns = list(cfg.ignored) if cfg.ignored is not None else [head]
    modules = dict(model.named_modules())
    ignored, targets = [], {}
    for path, m in modules.items():
        if not isinstance(m, _PRUNABLE):
            continue
        if _matches(path, ignored_patterns) or path == head or (cfg.only and not _matches(path, cfg.only)):
            ignored.append(m)
        else:
            targets[path] = m
    if not targets:
        raise DistillError(
            "compress.prune: no layer left to prune (all are ignored or outside 'only'); "
            "check compress.prune.only / ignored patterns against the model's module paths"
        )
    ratio_dict = {}
    for pattern, r in cfg.layer_ratios.items():
        hits = [p for p in targets if fnmatch.fnmatchcase(p, pattern)]
        if not hits:
            raise DistillError(
                f"compress.prune.layer_ratios: '{pattern}' matches no prunable layer "
                f"(e.g. {', '.join(list(targets)[:4])})"
            )
        for p in hits:
            ratio_dict[targets[p]] = r
    if not cfg.global_pruning:
        for path, m in targets.items():
            r = ratio_dict.get(m, cfg.ratio)
            c = _width(m)
            if int(c * (1 - r)) < 1:
                key = "layer_ratios" if m in ratio_dict else "ratio"
                raise DistillError(
                    f"compress.prune.{key} {r} would remove all {c} output channels of '{path}' "
                    f"(a whole layer); use a ratio below {1 - 1 / c:.3f} or add '{path}' to "
                    "compress.prune.ignored"
                )
    before = {p: _width(m) for p, m in targets.items()}
    params_before = sum(p.numel() for p in model.parameters())
    pruner = tp.pruner.MetaPruner(
        model,
        example,
        importance=_importance(cfg.importance),
        global_pruning=cfg.global_pruning,
        pruning_ratio=cfg.ratio,
        pruning_ratio_dict=ratio_dict or None,
        max_pruning_ratio=cfg.max_layer_ratio,
        iterative_steps=cfg.iterative_steps,
        ignored_layers=ignored,
        round_to=cfg.round_to,
    )
    for _ in range(cfg.iterative_steps):
        if cfg.importance == "taylor":
            _taylor_grads(model, grad_batches, cfg.taylor_batches)
        pruner.step()
    model.zero_grad(set_to_none=True)
    after = {p: _width(m) for p, m in targets.items()}
    for path, m in modules.items():
        if isinstance(m, _PRUNABLE) and (m.weight.shape[0] == 0 or m.weight.shape[1] == 0):
            raise DistillError(
                f"pruning emptied layer '{path}' (weight {tuple(m.weight.shape)}); lower "
                "compress.prune.ratio or max_layer_ratio"
            )
    return {
        "classifier": head,
        "params_before": params_before,
        "params_after": sum(p.numel() for p in model.parameters()),
        "channels": {p: [before[p], after[p]] for p in targets},
    }


def _taylor_grads(model: nn.Module, batches, n: int) -> None:
    if batches is None:
        raise DistillError("importance 'taylor' needs training batches for gradients")
    model.zero_grad(set_to_none=True)
    k = 0
    for inputs, targets in batches:
        logits = read_outputs(call_model(model, inputs)).require_logits("model")
        loss = nn.functional.cross_entropy(logits.float(), targets)
        loss.backward()
        k += 1
        if k >= n:
            break
    if k == 0:
        raise DistillError("importance 'taylor': the training data yielded no batch for gradients")


# --------------------------------------------------------------------------- shapes: save and rebuild


def shapes_of(model: nn.Module) -> dict[str, Any]:
    """Each module's own parameter/buffer shapes and size attributes, as JSON-ready data."""
    out: dict[str, Any] = {}
    for path, m in model.named_modules():
        tensors = {
            n: list(t.shape)
            for n, t in list(m._parameters.items()) + list(m._buffers.items())
            if t is not None
        }
        attrs = {}
        for a in _SIZE_ATTRS:
            v = getattr(m, a, None)
            if isinstance(v, int) and not isinstance(v, bool):
                attrs[a] = v
            elif isinstance(v, tuple | list) and all(isinstance(i, int) for i in v):
                attrs[a] = list(v)
        if tensors or attrs:
            out[path] = {"type": type(m).__name__, "tensors": tensors, "attrs": attrs}
    return out


def rebuild(model: nn.Module, shapes: dict[str, Any]) -> nn.Module:
    """Resizes a freshly built `model` (same class and arguments as the unpruned one) in place to
    `shapes`; parameters that change shape are re-created empty (load weights next)."""
    modules = dict(model.named_modules())
    for path, rec in shapes.items():
        m = modules.get(path)
        if m is None or type(m).__name__ != rec["type"]:
            found = "missing" if m is None else type(m).__name__
            raise CheckpointError(
                f"pruned shapes do not fit this model: module '{path}' is {found}, expected "
                f"{rec['type']}; build the model with the recipe it was pruned from"
            )
        for name, shape in rec["tensors"].items():
            if name in m._parameters and m._parameters[name] is not None:
                old = m._parameters[name]
                if list(old.shape) != shape:
                    m._parameters[name] = nn.Parameter(
                        torch.empty(shape, dtype=old.dtype), requires_grad=old.requires_grad
                    )
            elif name in m._buffers and m._buffers[name] is not None:
                old = m._buffers[name]
                if list(old.shape) != shape:
                    m._buffers[name] = torch.zeros(shape, dtype=old.dtype)
        for a, v in rec["attrs"].items():
            setattr(m, a, tuple(v) if isinstance(v, list) else v)
    return model


def save_pruned(folder: str | Path, model: nn.Module, info: dict[str, Any]) -> None:
    """Writes `model.safetensors` and `shapes.json` (with `info`) into `folder`; shapes last, so a
    folder with shapes.json is complete."""
    folder = Path(folder)
    save_weights(folder / "model.safetensors", model.state_dict(), {"stage": "pruned"})
    atomic_write_text(
        folder / "shapes.json", json.dumps({"info": info, "shapes": shapes_of(model)}, indent=1)
    )


def load_pruned(model: nn.Module, folder: str | Path, weights: str | Path | None = None) -> nn.Module:
    """Rebuilds `model` (fresh, unpruned) to the shapes saved in `folder`, loads the weights."""
    folder = Path(folder)
    spec = folder / "shapes.json"
    if not spec.is_file():
        raise CheckpointError(f"{folder} has no shapes.json: not a pruned-model folder")
    rebuild(model, json.loads(spec.read_text())["shapes"])
    path = Path(weights) if weights is not None else folder / "model.safetensors"
    load_into(model, load_weights_file(path), source=str(path))
    return model


def reinitialize(model: nn.Module, seed: int) -> nn.Module:
    """Fresh random weights for every module that can reset itself (for a same-size student)."""
    torch.manual_seed(seed)
    for m in model.modules():
        if hasattr(m, "reset_parameters") and m is not model:
            m.reset_parameters()
    return model
