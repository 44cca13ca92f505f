"""The package layout keeps its arrows pointing down (DESIGN.md, "Layout").

Every `import` in `src/distill`, also those inside functions, is read with `ast`; a module may import
only its own part or a part below it, and the module graph has no cycle, not even between two modules
of one package and not even through an `if TYPE_CHECKING:` import (a circle a type checker must break
is still a circle in the design).
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src" / "distill"

# Parts from the bottom up; a part may import its own modules and any part of a lower rank.
# `data`, `models` and `nlp` are domain packages beside the stack: they never import the engine, run,
# workflows or cli.
RANKS = {
    "contracts": 0,  # errors, registry, outputs, taps, adapters, schedules, checkpoint
    "data": 1,
    "losses": 1,
    "models": 1,
    "objective": 2,
    "teachers": 2,
    "engine": 3,
    "nlp": 3,
    "run": 4,
    "workflows": 5,  # chain, multitask, teacher_choice, compress, tune, federated
    "cli": 6,
}
SIDEWAYS = {("models", "data")}  # a model builder may read the data's shapes (number of classes)
CONTRACTS = {"errors", "registry", "outputs", "taps", "adapters", "schedules", "checkpoint", "__init__"}
WORKFLOWS = {"chain", "multitask", "teacher_choice", "compress", "tune", "federated"}
# Named exceptions to "may import any lower part", each with its reason.
FORBIDDEN = {
    "engine": {"losses"},  # the loop knows no method: the pipeline builds objectives
}
# The public aliases the README shows sit on top of everything.
PUBLIC = {"distill", "distill.trainer", "distill.__main__"}


def part(module: str) -> str:
    name = module.split(".")[1] if "." in module else "__init__"
    if name in CONTRACTS:
        return "contracts"
    if name in WORKFLOWS:
        return "workflows"
    return name


def module_name(path: Path) -> str:
    rel = path.relative_to(SRC.parent).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def imports_of(path: Path, type_checking: bool = False) -> set[str]:
    """Every module `path` imports, at the top or inside functions; `if TYPE_CHECKING:` blocks never
    run, so they are skipped unless `type_checking`."""
    found = set()

    def walk(node: ast.AST) -> None:
        if (
            not type_checking
            and isinstance(node, ast.If)
            and getattr(node.test, "id", None) == "TYPE_CHECKING"
        ):
            return
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module)
            found.update(f"{node.module}.{a.name}" for a in node.names)
        for child in ast.iter_child_nodes(node):
            walk(child)

    walk(ast.parse(path.read_text(), str(path)))
    return {m for m in found if m == "distill" or m.startswith("distill.")}


def graph(type_checking: bool = False) -> dict[str, set[str]]:
    modules = {module_name(p): p for p in SRC.rglob("*.py")}
    g = {}
    for name, path in modules.items():
        # `from distill.x import y` names module distill.x.y when y is a module, else distill.x
        g[name] = {m for m in imports_of(path, type_checking) if m in modules and m != name}
    return g


def test_arrows_point_down():
    bad = []
    for mod, deps in graph().items():
        if mod in PUBLIC:
            continue
        src = part(mod)
        for dep in deps:
            dst = part(dep)
            if dep == "distill" or src == dst:
                continue
            if RANKS[dst] >= RANKS[src] and (src, dst) not in SIDEWAYS:
                bad.append(f"{mod} ({src}) imports {dep} ({dst})")
            elif dst in FORBIDDEN.get(src, ()):
                bad.append(f"{mod} ({src}) imports {dep} ({dst}), which that part must never import")
    assert not bad, "imports against the layout:\n" + "\n".join(sorted(bad))


def test_no_import_cycle():
    g = graph(type_checking=True)
    state: dict[str, int] = {}
    stack: list[str] = []
    cycles = []

    def visit(m: str) -> None:
        state[m] = 1
        stack.append(m)
        for d in sorted(g[m]):
            if state.get(d) == 1:
                cycles.append(" -> ".join(stack[stack.index(d) :] + [d]))
            elif d not in state:
                visit(d)
        stack.pop()
        state[m] = 2

    for m in sorted(g):
        if m not in state and m not in PUBLIC:
            visit(m)
    assert not cycles, "import cycles:\n" + "\n".join(cycles)


def test_top_level_stays_small_and_packages_say_what_they_hold():
    top = sorted(p.name for p in SRC.glob("*.py"))
    assert len(top) <= 15, f"{len(top)} modules directly in src/distill: {top}"
    for init in SRC.glob("*/__init__.py"):
        doc = ast.get_docstring(ast.parse(init.read_text()))
        assert doc and "may import" in doc.lower(), (
            f"{init.parent.name}/__init__.py must say what lives there and what it may import"
        )


PLANTS = {
    "engine imports a loss": (
        {"engine/planted.py": "from distill.losses.logits import KD\n"},
        test_arrows_point_down,
    ),
    "losses import the engine": (
        {"losses/planted.py": "import distill.engine.trainer\n"},
        test_arrows_point_down,
    ),
    "cycle": (
        {
            "data/planted_a.py": "from distill.data import planted_b\n",
            "data/planted_b.py": "import distill.data.planted_a\n",
        },
        test_no_import_cycle,
    ),
    "cycle inside a package through TYPE_CHECKING": (
        {
            "tune/planted_a.py": "from distill.tune.planted_b import f\n",
            "tune/planted_b.py": (
                "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from distill.tune.planted_a import g\n"
            ),
        },
        test_no_import_cycle,
    ),
}


@pytest.mark.parametrize("plant", sorted(PLANTS))
def test_the_checker_catches_what_it_forbids(tmp_path, plant, monkeypatch):
    """A test that cannot fail proves nothing: plant each kind of mistake and see it reported."""
    fake = tmp_path / "distill"
    for p in SRC.rglob("*.py"):
        dst = fake / p.relative_to(SRC)
        dst.parent.mkdir(parents=True, exist_ok=True)
        dst.write_text(p.read_text())
    files, check = PLANTS[plant]
    for rel, text in files.items():
        (fake / rel).write_text(text)
    monkeypatch.setitem(globals(), "SRC", fake)
    with pytest.raises(AssertionError, match="planted"):
        check()
