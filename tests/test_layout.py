"""The package's layering rule, read from the source: which subpackage may import which (imports inside
functions count), no import cycle, every module readable in one sitting, every subpackage saying what it owns."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "tl_multimodal"
PRIVATE = {"_validate", "_io", "_compat", "_config", "_cli_checks"}  # top-level helpers any layer may use; they import nothing of ours
ALLOWED = {  # a subpackage -> the subpackages it may import (besides itself and PRIVATE)
    "data": set(),
    "models": set(),
    "pretrained": {"models"},
    "analysis": {"models", "sae"},
    "evaluation": {"analysis", "data", "models", "sae"},
    "views": {"analysis", "models", "sae"},
    "training": {"analysis", "data", "models", "pretrained", "sae"},
    "experiments": {"models"},
    "sae": {"models"},
}


def _modules() -> dict[str, Path]:
    out = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
        out[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return out


def _imports(path: Path, name: str, known: set[str]) -> set[str]:
    """The package modules ``path`` imports anywhere in its body (``from a import b`` counts b if a module)."""
    found = set()
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names if a.name.startswith("tl_multimodal")}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join(package.split(".")[: len(package.split(".")) - node.level + 1] + ([base] if base else []))
            if not base.startswith("tl_multimodal"):
                continue
            for alias in node.names:
                found.add(f"{base}.{alias.name}" if f"{base}.{alias.name}" in known else base)
    return found - {name}


@pytest.fixture(scope="module")
def graph() -> dict[str, set[str]]:
    modules = _modules()
    return {name: _imports(path, name, set(modules)) for name, path in modules.items()}


def _layer(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else ""


def test_each_subpackage_imports_only_what_its_layer_allows(graph):
    bad = []
    for module, deps in graph.items():
        layer = _layer(module)
        if layer in PRIVATE:
            bad += [f"{module} -> {d}" for d in deps]
        elif layer in ALLOWED:
            bad += [f"{module} -> {d}" for d in deps
                    if _layer(d) not in ALLOWED[layer] | PRIVATE | {layer}]
    assert not bad, "imports that break the layering rule (CONTRIBUTING.md):\n" + "\n".join(sorted(bad))


def test_no_import_cycle(graph):
    state: dict[str, int] = {}  # 1: on the stack, 2: done

    def visit(module: str, stack: list[str]) -> None:
        state[module] = 1
        for dep in sorted(graph.get(module, ())):
            if dep == "tl_multimodal" or dep not in graph:
                continue  # the top level only re-exports lazily
            if state.get(dep) == 1:
                raise AssertionError("import cycle: " + " -> ".join(stack[stack.index(dep):] + [dep]))
            if dep not in state:
                visit(dep, stack + [dep])
        state[module] = 2

    for module in sorted(graph):
        if module not in state:
            visit(module, [module])


def test_no_package_module_imports_the_top_level_door(graph):
    """Inside the package, names come from their modules, not through ``tl_multimodal``'s lazy exports
    (the CLI, on top of everything, may)."""
    bad = [m for m, deps in graph.items() if "tl_multimodal" in deps and m not in {"tl_multimodal.cli",
                                                                                    "tl_multimodal.__main__"}]
    assert not bad


def test_every_module_reads_in_one_sitting():
    long = {str(p.relative_to(PACKAGE)): n for p in PACKAGE.rglob("*.py")
            if (n := len(p.read_text().splitlines())) > 600}
    assert not long, f"modules over 600 lines: {long}"


def test_every_subpackage_says_what_it_owns_and_may_import():
    subpackages = sorted(p.parent.name for p in PACKAGE.glob("*/__init__.py"))
    assert set(subpackages) == set(ALLOWED), subpackages
    for name in subpackages:
        doc = ast.get_docstring(ast.parse((PACKAGE / name / "__init__.py").read_text()))
        assert doc and "May import" in doc, f"tl_multimodal/{name}/__init__.py needs its docstring"
