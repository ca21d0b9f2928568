"""Imports run one way: no cycle among the project's modules (counting imports inside
functions too), and main -> program -> {train, presets} -> {model, data}: model/ never
imports data/, data/ never imports model/, nothing imports the program, and the presets
never import the run."""
import ast
from pathlib import Path

from tests.conftest import ROOT

PACKAGES = ("model", "data", "presets", "train", "program")


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports(path: Path) -> set[str]:
    """Project modules this file imports, anywhere in it."""
    name = module_name(path)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".")
                base = ".".join(parts[: len(parts) - node.level + 1] + ([base] if base else []))
            found.add(base)
            found |= {f"{base}.{a.name}" for a in node.names}
    return {m for m in found if m.split(".")[0] in PACKAGES}


def graph() -> dict[str, set[str]]:
    files = [p for pkg in PACKAGES for p in (ROOT / pkg).rglob("*.py")]
    mods = {module_name(p): p for p in files}
    return {m: {i for i in imports(p) if i in mods and i != m} for m, p in mods.items()}


def test_no_import_cycles():
    g = graph()
    # a package's __init__ re-exporting its submodules is not a cycle: drop edges into a parent package
    g = {m: {i for i in deps if not m.startswith(i + ".")} for m, deps in g.items()}
    state, cycles = {}, []

    def visit(m, stack):
        state[m] = "open"
        for i in sorted(g[m]):
            if state.get(i) == "open":
                cycles.append(stack[stack.index(i):] + [i])
            elif i not in state:
                visit(i, stack + [i])
        state[m] = "done"

    for m in sorted(g):
        if m not in state:
            visit(m, [m])
    assert not cycles, cycles


# what each package may import of the project's other packages
ALLOWED = {
    "model": set(),
    "data": set(),
    "presets": {"model", "data"},
    "train": {"presets", "model", "data"},
    "program": {"train", "presets", "model", "data"},
}


def test_packages_import_one_way():
    bad = [(m, i) for m, deps in graph().items() for i in deps
           if i.split(".")[0] != m.split(".")[0] and i.split(".")[0] not in ALLOWED[m.split(".")[0]]]
    assert not bad, bad
