"""Short names for what users type often, and import paths for everything else."""

from __future__ import annotations

import difflib
import importlib
import inspect
import os
import site
import sys
import sysconfig
import typing
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

    def __init__(self, kind: str, home: str | None = None):
        self.kind = kind
        self._home = home  # the module whose import registers the entries (imported on first lookup)
        self._items: dict[str, Callable[..., Any]] = {}
        self._lazy: dict[str, str] = {}
        self._bases: tuple[type, ...] = ()
        self._methods: tuple[str, ...] = ()
        self._what = f"a {kind} class"

    def accept(self, *bases: type, methods: tuple[str, ...] = (), what: str) -> None:
        """Declares what a `class_path` in this slot may name (the module that defines the slot's
        base class calls it): a subclass of one of `bases`, or a class whose instances have all of
        `methods`; `what` says it in words for the error."""
        self._bases, self._methods, self._what = bases, methods, what

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

    def _load_home(self) -> None:
        """Imports the home module, so a lookup does not depend on what the caller imported first
        (while it is being imported, this returns its partial module: no recursion)."""
        if self._home is not None:
            importlib.import_module(self._home)

    def names(self) -> list[str]:
        self._load_home()
        return sorted(set(self._items) | set(self._lazy))

    def __contains__(self, name: str) -> bool:
        self._load_home()
        return name in self._items or name in self._lazy

    def get(self, name: str) -> Callable[..., Any]:
        self._load_home()
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
        target = self.resolve(class_path) if class_path else self.get(name or "")
        kwargs = {**(init_args or {}), **extra}
        try:
            return target(**kwargs)
        except TypeError as e:
            raise ConfigError(f"{self.kind} '{class_path or name}': {e}") from e

    def resolve(self, class_path: str) -> Callable[..., Any]:
        """What `class_path` names, checked (before anything is called) to be what this slot
        builds: a recipe is code, but a recipe alone must not run `os.system` or `shutil.rmtree`.

        Accepted: a registered entry; a class of the slot's kind (`accept`); a function annotated
        to return that kind; a function of the user's own code (a module outside the Python
        installation and its site-packages, e.g. beside the recipe). Everything of the standard
        library is refused, and so are distill's own unregistered functions."""
        target = import_path(class_path)
        if self._registered(target, class_path):
            return target
        problem = self._refusal(target)
        if problem is None:
            return target
        raise ConfigError(
            f"{self.kind} class_path '{class_path}' names {problem}, not {self._what}; class_path runs what "
            f"it names, so it must name {self._what}, a function of your own (in a file beside the recipe, "
            "or annotated to return that kind), or a registered name"
        )

    def _registered(self, target: Any, class_path: str) -> bool:
        dotted = f"{getattr(target, '__module__', '')}.{getattr(target, '__qualname__', '')}"
        return any(target is v for v in self._items.values()) or any(
            p.replace(":", ".") in (class_path.replace(":", "."), dotted) for p in self._lazy.values()
        )

    def _refusal(self, target: Any) -> str | None:
        """None when `target` may be called for this slot, else what it is, in words."""
        module = getattr(target, "__module__", None) or ""
        where = f"{module}.{getattr(target, '__qualname__', getattr(target, '__name__', '?'))}"
        if inspect.isclass(target):
            if _standard_library(module):
                return f"the class {where} of Python's standard library"
            if self._bases and issubclass(target, self._bases):
                return None
            if self._methods and all(_defines(target, m) for m in self._methods):
                return None
            return f"the class {where}"
        if inspect.isfunction(target):
            if _standard_library(module):
                return f"the function {where} of Python's standard library"
            if self._bases and _returns(target, self._bases):
                return None
            if _user_code(target) and module.split(".")[0] != "distill":
                return None
            return f"the function {where}"
        kind = "built-in function" if inspect.isbuiltin(target) else type(target).__name__
        return f"the {kind} {where}"


def _defines(cls: type, method: str) -> bool:
    """Whether `cls` (not `object` or the metaclass) defines `method`."""
    return any(method in vars(c) for c in cls.__mro__ if c is not object)


def _returns(fn: Callable[..., Any], bases: tuple[type, ...]) -> bool:
    """Whether `fn`'s return annotation is a subclass of one of `bases` (read by name when the
    annotation cannot be evaluated)."""
    try:
        ret = typing.get_type_hints(fn).get("return")
    except Exception:  # noqa: BLE001 - a forward reference that does not resolve: read the text
        ret = getattr(fn, "__annotations__", {}).get("return")
    if isinstance(ret, str):
        return ret.rsplit(".", 1)[-1] in {b.__name__ for b in bases}
    return inspect.isclass(ret) and issubclass(ret, bases)


def _standard_library(module: str) -> bool:
    top = module.split(".")[0]
    return top in sys.stdlib_module_names or top in ("builtins", "__main__", "posix", "nt")


def _installed_dirs() -> list[Path]:
    """Python's own library folders and its site-packages: what is not the user's own code."""
    paths = {sysconfig.get_paths()[k] for k in ("stdlib", "platstdlib", "purelib", "platlib")}
    try:
        paths.update(site.getsitepackages())
        paths.add(site.getusersitepackages())
    except AttributeError:  # a virtualenv's old site.py
        pass
    return [Path(p).resolve() for p in paths if p]


def _user_code(fn: Callable[..., Any]) -> bool:
    """Whether `fn` is defined in a file outside the Python installation and its packages (a
    module beside the recipe, or a project of the user's on PYTHONPATH or installed editable)."""
    try:
        source = inspect.getsourcefile(fn)
    except TypeError:
        return False
    if source is None:
        return False
    f = Path(source).resolve()
    return not any(f.is_relative_to(d) for d in _installed_dirs() if d != Path("/"))


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


LOSSES = Registry("loss", home="distill.losses")
MODELS = Registry("model")
SCHEDULES = Registry("schedule")
DATASETS = Registry("dataset")
ADAPTERS = Registry("adapter")  # builders returning an adapter `(model, batch) -> Outputs`
EVALUATORS = Registry("evaluator")  # builders returning an Evaluator
