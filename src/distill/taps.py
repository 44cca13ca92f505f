"""Intermediate features by forward hooks on module paths, so no model is edited to return them."""

from __future__ import annotations

import difflib
from collections.abc import Iterable

from torch import Tensor, nn

from distill.errors import DistillError


def _first_tensor(x):
    if isinstance(x, Tensor):
        return x
    if isinstance(x, tuple | list):
        for v in x:
            if isinstance(v, Tensor):
                return v
    if hasattr(x, "last_hidden_state"):
        return x.last_hidden_state
    return None


class FeatureTap:
    """Captures the outputs of named submodules on every forward pass.

    Args:
        model: the module to tap.
        paths: dotted module paths as in `model.named_modules()`, e.g. `"layer3.1"`; `""`
            taps the whole model's output.
        detach: store detached tensors (for a frozen teacher).

    A path that does not exist fails here, at construction, with the nearest existing names.
    A module returning a tuple (a transformer block) is read at its first tensor.
    """

    def __init__(self, model: nn.Module, paths: Iterable[str], detach: bool = False):
        self.paths = list(dict.fromkeys(paths))
        self.detach = detach
        self.store: dict[str, Tensor] = {}
        modules = dict(model.named_modules())
        self._handles = []
        for path in self.paths:
            if path not in modules:
                near = difflib.get_close_matches(path, list(modules), n=5, cutoff=0.4)
                hint = f"; nearest: {', '.join(near)}" if near else ""
                raise DistillError(
                    f"no module '{path}' in {type(model).__name__} to tap{hint} "
                    "(names as in model.named_modules())"
                )
            self._handles.append(modules[path].register_forward_hook(self._hook(path)))

    def _hook(self, path: str):
        def hook(_module, _inputs, output):
            t = _first_tensor(output)
            if t is not None:
                self.store[path] = t.detach() if self.detach else t

        return hook

    def collect(self) -> dict[str, Tensor]:
        """The features of the last forward pass; the store is emptied."""
        out, self.store = self.store, {}
        return out

    def remove(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.remove()
