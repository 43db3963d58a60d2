"""The package's shape, checked by walking its imports (``docs/architecture.md`` draws it).

Every import in ``src/celery_breaker`` counts, the ones inside functions and the
``importlib.import_module`` calls too (only ``if TYPE_CHECKING:`` blocks are left out:
they never run). On that graph:

* there is no import cycle, so no function-local import can be hiding one;
* each layer imports only the layers below it: ``core`` nothing but the leaf modules,
  ``storage`` only ``core``, the guard API (``breaker``, ``health``) only ``storage`` and ``core``,
  ``integration`` (Celery) neither ``monitoring`` nor ``ops``, ``monitoring`` not ``ops``;
* ``core``, ``storage`` and the guard API import neither Celery nor kombu nor click;
  redis-py is imported only inside ``storage/redis``;
* no module imports another module's private (``_``-prefixed) name;
* an import placed inside a function is allowed only where the module says why: the
  ``celery breaker`` entry point and the remote-control commands (every ``celery``
  command imports them: import cost), and optional dependencies. (The packages whose
  public names load on first use, PEP 562, name them in a table the walk does not
  follow; their targets are ordinary modules, checked like any other.)
"""

from __future__ import annotations

import ast
from dataclasses import dataclass, field
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src"
PACKAGE = "celery_breaker"

#: The modules every layer may use: errors, the clock, breaker names and labels.
LEAVES = {"celery_breaker.errors", "celery_breaker.clock", "celery_breaker.labels", "celery_breaker.names"}

#: Layer -> the layers (and leaves) it may import, besides itself.
ALLOWED: dict[str, set[str]] = {
    "leaf": set(),
    "core": {"leaf"},
    "storage": {"leaf", "core"},
    "guard": {"leaf", "core", "storage"},
    "integration": {"leaf", "core", "storage", "guard"},
    "monitoring": {"leaf", "core", "storage", "guard", "integration"},
    "ops": {"leaf", "core", "storage", "guard", "integration", "monitoring"},
    "public": {"leaf", "core", "storage", "guard", "integration", "monitoring", "ops"},
}

#: Third-party packages a layer must not import.
FORBIDDEN_THIRD_PARTY = {
    "leaf": {"celery", "kombu", "click", "billiard", "redis", "prometheus_client"},
    "core": {"celery", "kombu", "click", "billiard", "redis", "prometheus_client"},
    "storage": {"celery", "kombu", "click", "billiard", "prometheus_client"},
    "guard": {"celery", "kombu", "click", "billiard", "redis", "prometheus_client"},
}

#: Modules that may import inside functions, and why (anything else is a design smell).
LAZY_IMPORTS_ALLOWED = {
    "celery_breaker.ops.cli": "import cost: every celery command imports the entry point",
    "celery_breaker.ops.control": "import cost: every celery command imports it, through the entry point",
    "celery_breaker.integration.plugin": "import cost: breaker_routes load only for an app that sets some",
    "celery_breaker.storage.redis": "optional dependency: redis-py loads when a Redis store is opened",
    "celery_breaker.monitoring.endpoint": "optional dependency: prometheus-client, when the port is set",
    "celery_breaker.monitoring.flower": "optional dependency: prometheus-client, when Flower registers",
}


def layer_of(module: str) -> str:
    if module in LEAVES:
        return "leaf"
    parts = module.split(".")
    if len(parts) == 1:
        return "public"
    top = parts[1]
    if top in ("core", "storage", "integration", "monitoring", "ops"):
        return top
    if top in ("breaker", "health"):
        return "guard"
    return "public"  # testing.py: helpers for users' tests, may use anything


@dataclass
class Module:
    name: str
    path: Path
    is_package: bool
    imports: set[str] = field(default_factory=set)
    """celery_breaker modules this one imports (at any depth)."""
    lazy: set[str] = field(default_factory=set)
    """...of which inside a function, or through importlib.import_module."""
    third_party: set[str] = field(default_factory=set)
    private_names: list[str] = field(default_factory=list)


def module_name(path: Path) -> tuple[str, bool]:
    relative = path.relative_to(SRC).with_suffix("")
    parts = list(relative.parts)
    if parts[-1] == "__init__":
        return ".".join(parts[:-1]), True
    return ".".join(parts), False


def _resolve(module: Module, level: int, target: str | None) -> str:
    if level == 0:
        return target or ""
    base = module.name.split(".") if module.is_package else module.name.split(".")[:-1]
    base = base[: len(base) - (level - 1)] if level > 1 else base
    return ".".join([*base, target] if target else base)


def _type_checking(node: ast.If) -> bool:
    test = node.test
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def read(path: Path, known: set[str]) -> Module:
    name, is_package = module_name(path)
    module = Module(name, path, is_package)
    tree = ast.parse(path.read_text(encoding="utf-8"))

    def add(target: str, *, lazy: bool) -> None:
        if target == PACKAGE or target.startswith(PACKAGE + "."):
            module.imports.add(target)
            if lazy:
                module.lazy.add(target)
        elif target:
            module.third_party.add(target.split(".", maxsplit=1)[0])

    def visit(node: ast.AST, *, in_function: bool) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.If) and _type_checking(child):
                for orelse in child.orelse:
                    visit(orelse, in_function=in_function)
                continue
            nested = in_function or isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda))
            if isinstance(child, ast.Import):
                for alias in child.names:
                    add(alias.name, lazy=in_function)
            elif isinstance(child, ast.ImportFrom):
                base = _resolve(module, child.level, child.module)
                for alias in child.names:
                    candidate = f"{base}.{alias.name}"
                    add(candidate if candidate in known else base, lazy=in_function)
                    if alias.name.startswith("_") and not alias.name.startswith("__") and base.startswith(PACKAGE):
                        module.private_names.append(f"{base}.{alias.name}")
            elif isinstance(child, ast.Call) and _is_import_module(child):
                target = child.args[0]
                assert isinstance(target, ast.Constant)
                text = str(target.value)
                if text.startswith("."):
                    level = len(text) - len(text.lstrip("."))
                    add(_resolve(module, level, text[level:] or None), lazy=True)
                else:
                    add(text, lazy=True)
            visit(child, in_function=nested)

    visit(tree, in_function=False)
    module.imports.discard(name)
    return module


def _is_import_module(node: ast.Call) -> bool:
    func = node.func
    named = (isinstance(func, ast.Attribute) and func.attr == "import_module") or (
        isinstance(func, ast.Name) and func.id == "import_module"
    )
    return named and bool(node.args) and isinstance(node.args[0], ast.Constant) and isinstance(node.args[0].value, str)


@pytest.fixture(scope="module")
def graph() -> dict[str, Module]:
    paths = sorted((SRC / PACKAGE).rglob("*.py"))
    known = {module_name(path)[0] for path in paths}
    return {module.name: module for module in (read(path, known) for path in paths)}


def test_the_walk_sees_the_package(graph: dict[str, Module]) -> None:
    assert len(graph) > 40
    assert "celery_breaker.core" in graph["celery_breaker.storage.memory"].imports
    assert "celery_breaker.storage.redis.store" in graph["celery_breaker.storage.redis"].lazy


def _cycles(graph: dict[str, Module]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []
    counter = [0]

    def connect(node: str) -> None:
        index[node] = low[node] = counter[0]
        counter[0] += 1
        stack.append(node)
        on_stack.add(node)
        for target in sorted(graph[node].imports):
            if target not in graph:
                continue
            if target not in index:
                connect(target)
                low[node] = min(low[node], low[target])
            elif target in on_stack:
                low[node] = min(low[node], index[target])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            connect(node)
    return found


def test_no_import_cycles_even_counting_imports_inside_functions(graph: dict[str, Module]) -> None:
    assert _cycles(graph) == []


def test_each_layer_imports_only_the_layers_below_it(graph: dict[str, Module]) -> None:
    upward = []
    for module in graph.values():
        layer = layer_of(module.name)
        for target in module.imports:
            target_layer = layer_of(target)
            if target_layer != layer and target_layer not in ALLOWED[layer]:
                upward.append(f"{module.name} ({layer}) imports {target} ({target_layer})")
    assert sorted(upward) == []


def test_the_core_the_stores_and_the_guard_know_nothing_of_celery(graph: dict[str, Module]) -> None:
    found = []
    for module in graph.values():
        forbidden = FORBIDDEN_THIRD_PARTY.get(layer_of(module.name), set())
        for package in sorted(module.third_party & forbidden):
            if package == "redis" and module.name.startswith("celery_breaker.storage.redis"):
                continue
            found.append(f"{module.name} imports {package}")
    assert found == []


def test_no_module_imports_another_modules_private_name(graph: dict[str, Module]) -> None:
    assert [f"{m.name}: {name}" for m in graph.values() for name in m.private_names] == []


def test_imports_inside_functions_only_where_the_module_says_why(graph: dict[str, Module]) -> None:
    lazy = sorted(m.name for m in graph.values() if m.lazy and m.name not in LAZY_IMPORTS_ALLOWED)
    assert lazy == []
    unused = sorted(name for name in LAZY_IMPORTS_ALLOWED if not graph[name].lazy)
    assert unused == []  # an allowance nobody needs any more goes
