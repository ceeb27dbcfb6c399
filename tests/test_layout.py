"""The layout keeps the design readable (`../shared/DESIGN.md`, "Layout"): no import circle between our
modules, no Python module at the repository root but the two configuration modules, each layer importing
only the layers below it, the webhooks free of Celery, and a provider's name written out only in its own
folders, its settings and the demo's configuration.
"""
from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

from providers.registry import PROVIDERS

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("tasks", "workflow", "providers", "db", "celery_ext", "webhooks", "smsctl", "simulators")
ROOT_MODULES = ("settings", "celeryconfig")
OURS = PACKAGES + ROOT_MODULES

MAY_IMPORT = {
    "providers": {"providers"},
    "db": {"db"},
    "celery_ext": {"celery_ext"},
    "simulators": {"simulators"},
    "settings": {"providers"},
    "celeryconfig": {"settings", "providers", "celery_ext"},
    "workflow": {"workflow", "db", "providers", "settings"},
    "webhooks": {"webhooks", "workflow", "db", "providers", "settings"},
    "tasks": {"tasks", "workflow", "celery_ext", "providers", "settings", "celeryconfig"},
}
"""Which of our top-level names each may import (`smsctl` may import everything)."""


def _modules() -> dict[str, Path]:
    found = {name: ROOT / f"{name}.py" for name in ROOT_MODULES}
    for package in PACKAGES:
        for path in (ROOT / package).rglob("*.py"):
            if "migrations" in path.parts:
                continue
            parts = path.relative_to(ROOT).with_suffix("").parts
            found[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return found


def _imports(name: str, path: Path, known: set[str]) -> set[str]:
    """Our modules that `name` imports anywhere in its file (inside functions too)."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join(package.split(".")[: len(package.split(".")) - node.level + 1] + ([base] if base else []))
            targets = [f"{base}.{alias.name}" for alias in node.names] + [base]
        else:
            continue
        for target in targets:
            while target and target not in known:
                target = target.rpartition(".")[0]
            if target and target != name and target.split(".")[0] in OURS:
                found.add(target)
    return found


def _graph() -> dict[str, set[str]]:
    modules = _modules()
    known = set(modules)
    return {name: _imports(name, path, known) for name, path in modules.items()}


def test_no_import_circle():
    graph = _graph()
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(node: str) -> None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph[node]):
            # A package's __init__ importing its own submodules is how a package exposes them, not a circle.
            if nxt.startswith(node + "."):
                continue
            if state.get(nxt) == 1:
                raise AssertionError("import circle: " + " -> ".join(stack[stack.index(nxt):] + [nxt]))
            if state.get(nxt) is None:
                visit(nxt)
        stack.pop()
        state[node] = 2

    for module in sorted(graph):
        if module not in state:
            visit(module)


def test_the_root_holds_only_the_configuration_modules():
    assert sorted(p.stem for p in ROOT.glob("*.py")) == sorted(ROOT_MODULES)


@pytest.mark.parametrize("layer", sorted(MAY_IMPORT))
def test_each_layer_imports_only_what_it_may(layer):
    graph = _graph()
    wrong = {f"{module} imports {target}" for module, targets in graph.items()
             if module.split(".")[0] == layer for target in targets
             if target.split(".")[0] not in MAY_IMPORT[layer]}
    assert not wrong


def test_the_webhooks_and_the_workflow_import_no_celery():
    for path in [*(ROOT / "webhooks").rglob("*.py"), *(ROOT / "workflow").rglob("*.py")]:
        tree = ast.parse(path.read_text())
        names = {alias.name for node in ast.walk(tree) if isinstance(node, ast.Import) for alias in node.names}
        names |= {node.module or "" for node in ast.walk(tree) if isinstance(node, ast.ImportFrom)}
        assert not {n for n in names if n.split(".")[0] in ("celery", "kombu", "celery_ext", "tasks")}, path


def test_a_providers_name_is_written_out_in_at_most_two_modules_outside_its_folders():
    """Adding a provider means its client, its registry entry, its settings and its stand-in; nothing else
    names it (`settings.py` holds its settings, the demo its sample configuration)."""
    literal = re.compile(r"""["'](%s)["']""" % "|".join(PROVIDERS))
    naming = {str(path.relative_to(ROOT)) for path in _modules().values()
              if path.relative_to(ROOT).parts[0] not in ("providers", "simulators")
              and literal.search(path.read_text())}
    assert naming <= {"settings.py", "smsctl/demo.py"}, naming
