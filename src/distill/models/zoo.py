"""`torchvision.models` and `timm` models by name, registered as `torchvision` and `timm`:

    teacher: {name: timm, init_args: {model: resnet50, checkpoint: weights/resnet50.safetensors}}

Nothing is downloaded: weights come only from a local `checkpoint` (safetensors, or a plain
weights file read without executing code). `num_classes` comes from the data; when the checkpoint's
classifier has another number of classes (ImageNet's 1,000), the backbone is loaded and the
classifier starts fresh, with a warning.
"""

from __future__ import annotations

import warnings
from typing import Any

from torch import nn

from distill.checkpoint import load_into, load_weights_file
from distill.errors import ConfigError


def _last_linear(model: nn.Module) -> str | None:
    """The dotted name of the last `nn.Linear`: the classifier of torchvision's classifiers."""
    name = None
    for n, m in model.named_modules():
        if isinstance(m, nn.Linear):
            name = n
    return name


def _load_backbone(model: nn.Module, checkpoint: str, head: list[str], label: str) -> nn.Module:
    """Loads `checkpoint` strictly, except that a classifier of another size is left as built."""
    state = load_weights_file(checkpoint)
    own = model.state_dict()
    heads = tuple(f"{h}." for h in head if h)
    resized = [
        k for k in own if k in state and k.startswith(heads) and tuple(state[k].shape) != tuple(own[k].shape)
    ]
    if resized:
        warnings.warn(
            f"{label}: {checkpoint} has a classifier for another number of classes "
            f"({', '.join(f'{k} {tuple(state[k].shape)}' for k in resized[:2])}); loading the rest, "
            "the classifier starts fresh",
            stacklevel=3,
        )
        state = {**state, **{k: own[k] for k in resized}}
    load_into(model, state, source=checkpoint)
    return model


def torchvision_model(
    model: str,
    num_classes: int | None = None,
    checkpoint: str | None = None,
    **kwargs: Any,
) -> nn.Module:
    """A `torchvision.models` architecture by name (`resnet18`, `mobilenet_v3_small`, `vit_b_16`, ...).

    Args:
        model: the name `torchvision.models.get_model` knows.
        num_classes: classifier size (default: the data's number of classes).
        checkpoint: a local weights file to load (never downloaded).
        **kwargs: the architecture's own arguments (`dropout`, `width_mult`, ...).
    """
    try:
        import torchvision
    except ImportError as e:
        raise ConfigError("model 'torchvision' needs torchvision: pip install 'distill[vision]'") from e
    if kwargs.get("weights") not in (None, "None") or kwargs.get("pretrained"):
        raise ConfigError(
            f"torchvision model '{model}': weights are never downloaded; give a local file as "
            "init_args.checkpoint instead of weights/pretrained"
        )
    kwargs.pop("weights", None)
    kwargs.pop("pretrained", None)
    names = torchvision.models.list_models()
    if model not in names:
        import difflib

        near = difflib.get_close_matches(model, names, n=3)
        hint = f" (did you mean {', '.join(near)}?)" if near else ""
        raise ConfigError(f"torchvision has no model '{model}'{hint}; see torchvision.models.list_models()")
    if num_classes is not None:
        kwargs["num_classes"] = num_classes
    try:
        net = torchvision.models.get_model(model, weights=None, **kwargs)
    except (TypeError, ValueError) as e:
        raise ConfigError(f"torchvision model '{model}': {e}") from e
    if checkpoint:
        _load_backbone(net, checkpoint, [_last_linear(net) or ""], f"torchvision model '{model}'")
    return net


def timm_model(
    model: str,
    num_classes: int | None = None,
    in_channels: int | None = None,
    checkpoint: str | None = None,
    **kwargs: Any,
) -> nn.Module:
    """A `timm` architecture by name (`resnet50`, `convnext_tiny`, `vit_small_patch16_224`, ...).

    Args:
        model: the name `timm.create_model` knows.
        num_classes: classifier size (default: the data's number of classes).
        in_channels: input channels (default: the data's), timm's `in_chans`.
        checkpoint: a local weights file to load (never downloaded).
        **kwargs: the architecture's own arguments (`drop_rate`, `drop_path_rate`, ...).
    """
    try:
        import timm
    except ImportError as e:
        raise ConfigError(
            "model 'timm' needs timm: pip install 'distill[vision]' (or pip install timm)"
        ) from e
    if kwargs.pop("pretrained", False) or kwargs.get("pretrained_cfg_overlay"):
        raise ConfigError(
            f"timm model '{model}': weights are never downloaded; give a local file as init_args.checkpoint"
        )
    if not timm.is_model(model):
        near = timm.list_models(f"*{model}*")[:3]
        hint = f" (did you mean {', '.join(near)}?)" if near else ""
        raise ConfigError(f"timm has no model '{model}'{hint}; see timm.list_models()")
    if num_classes is not None:
        kwargs["num_classes"] = num_classes
    if in_channels is not None:
        kwargs["in_chans"] = in_channels
    try:
        net = timm.create_model(model, pretrained=False, **kwargs)
    except (TypeError, ValueError) as e:
        raise ConfigError(f"timm model '{model}': {e}") from e
    if checkpoint:
        head = getattr(net, "pretrained_cfg", {}).get("classifier") or _last_linear(net) or ""
        heads = [head] if isinstance(head, str) else list(head)
        _load_backbone(net, checkpoint, heads, f"timm model '{model}'")
    return net
