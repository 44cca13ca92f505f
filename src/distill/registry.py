"""Short names for what users type often, and import paths for everything else."""

from __future__ import annotations

import difflib
import importlib
import os
import sys
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

from distill.errors import ConfigError


class Registry:
    """Maps short names to builders (classes or functions).

    `build(name=..., class_path=..., init_args=...)` instantiates either a registered name or
    any importable `package.module.Name`. Registering a name twice warns and keeps the latest.
    """

    def __init__(self, kind: str):
        self.kind = kind
        self._items: dict[str, Callable[..., Any]] = {}
        self._lazy: dict[str, str] = {}

    def add_lazy(self, name: str, path: str) -> None:
        """Registers `name` as the import path `package.module.Name`, imported on first use, so
        entries that need an optional extra cost nothing until they are used."""
        self._lazy[name] = path

    def register(self, name: str | None = None):
        def deco(obj):
            key = name or obj.__name__.lower()
            if key in self._items and self._items[key] is not obj:
                warnings.warn(
                    f"{self.kind} '{key}' is registered again; the new one replaces the old", stacklevel=2
                )
            self._items[key] = obj
            return obj

        return deco

    def add(self, name: str, obj: Callable[..., Any]) -> None:
        self.register(name)(obj)

    def names(self) -> list[str]:
        return sorted(set(self._items) | set(self._lazy))

    def __contains__(self, name: str) -> bool:
        return name in self._items or name in self._lazy

    def get(self, name: str) -> Callable[..., Any]:
        if name not in self._items and name in self._lazy:
            self._items[name] = import_path(self._lazy[name])
        if name not in self._items:
            near = difflib.get_close_matches(name, self.names(), n=3)
            hint = f" (did you mean {', '.join(near)}?)" if near else ""
            raise ConfigError(
                f"unknown {self.kind} '{name}'{hint}; known: {', '.join(self.names())}, "
                "or give class_path: package.module.Name"
            )
        return self._items[name]

    def build(
        self,
        name: str | None = None,
        class_path: str | None = None,
        init_args: dict[str, Any] | None = None,
        **extra: Any,
    ) -> Any:
        target = import_path(class_path) if class_path else self.get(name or "")
        kwargs = {**(init_args or {}), **extra}
        try:
            return target(**kwargs)
        except TypeError as e:
            raise ConfigError(f"{self.kind} '{class_path or name}': {e}") from e


# Folders whose Python files `class_path` may name (the folder of every recipe loaded), so that
# `class_path: mydata.wine` finds `mydata.py` beside the recipe without PYTHONPATH.
_IMPORT_DIRS: list[str] = []


def add_import_dir(folder: str | Path) -> None:
    """Makes the modules in `folder` importable by `class_path` (and by plain `import`): the folder
    goes first on `sys.path`, as a script's own folder does, so a file beside the recipe wins. It is
    added to `PYTHONPATH` too, for processes started from this one (simulation workers, spawned
    data loader workers)."""
    p = str(Path(folder).resolve())
    if p not in _IMPORT_DIRS:
        _IMPORT_DIRS.append(p)
    if p not in sys.path:
        sys.path.insert(0, p)
        importlib.invalidate_caches()
    env = os.environ.get("PYTHONPATH", "")
    if p not in env.split(os.pathsep):
        os.environ["PYTHONPATH"] = os.pathsep.join([p, env]) if env else p


def import_dirs() -> list[str]:
    """The folders added by `add_import_dir`, in order."""
    return list(_IMPORT_DIRS)


def import_path(path: str) -> Any:
    """Imports `package.module.Name` (or `package.module:Name`)."""
    mod_name, _, attr = path.replace(":", ".").rpartition(".")
    if not mod_name:
        raise ConfigError(f"class_path '{path}' is not of the form package.module.Name")
    try:
        module = importlib.import_module(mod_name)
    except ModuleNotFoundError as e:
        if e.name is None or not (mod_name == e.name or mod_name.startswith(e.name + ".")):
            raise ConfigError(f"class_path '{path}': importing {mod_name} failed: {e}") from e
        # The module itself (or its package) is missing: say where it was looked for.
        where = ", ".join(_IMPORT_DIRS) or "no recipe folder"
        raise ConfigError(
            f"class_path '{path}': no module named '{e.name}' (looked beside the recipe in {where}, "
            "then on sys.path); put "
            f"{e.name.replace('.', '/')}.py next to the recipe or install it"
        ) from e
    except ImportError as e:
        raise ConfigError(f"class_path '{path}': cannot import {mod_name} ({e})") from e
    if not hasattr(module, attr):
        raise ConfigError(f"class_path '{path}': {mod_name} has no attribute {attr}")
    return getattr(module, attr)


LOSSES = Registry("loss")
MODELS = Registry("model")
SCHEDULES = Registry("schedule")
DATASETS = Registry("dataset")
ADAPTERS = Registry("adapter")  # builders returning an adapter `(model, batch) -> Outputs`
EVALUATORS = Registry("evaluator")  # builders returning an Evaluator
