"""The import graph of ``longtail`` (docs/ARCHITECTURE.md, "Layers"): no circle between modules, and
no function-local import in ``commands/`` or ``engine/`` that could hide one. Read with ``ast``, so
every import counts, also those inside functions and ``if TYPE_CHECKING`` blocks."""
from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "longtail"

# function-local imports allowed in commands/ and engine/, each with its reason: an optional dependency,
# or start-up speed (a module that is only imported when it is used)
LAZY_ALLOWED = {
    ("longtail.engine.logging", "torch.utils.tensorboard"): "start-up speed: TensorBoard's import takes about a "
                                                            "second and only the main rank writes a log",
    ("longtail.commands.export", "onnx"): "optional dependency (pip install 'longtail[export]')",
    ("longtail.commands.export", "onnxruntime"): "optional dependency (pip install 'longtail[export]')",
}
# folders whose function-local imports are checked
CHECKED = ("longtail.commands", "longtail.engine")


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _resolve(module: str, is_package: bool, node: ast.ImportFrom) -> str:
    if node.level == 0:
        return node.module or ""
    base = module.split(".") if is_package else module.split(".")[:-1]
    base = base[: len(base) - (node.level - 1)]
    return ".".join([*base, node.module] if node.module else base)


def imports(path: Path, known: set[str]) -> list[tuple[str, bool, int]]:
    """(imported longtail module, function-local?, line) of every import in ``path``. ``from a import b``
    counts as an import of ``a.b`` when that is a module, else of ``a``."""
    module = module_name(path)
    tree = ast.parse(path.read_text(), str(path))
    local_lines: set[int] = set()
    for node in ast.walk(tree):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)):
            for inner in ast.walk(node):
                if isinstance(inner, (ast.Import, ast.ImportFrom)):
                    local_lines.add(inner.lineno)
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = _resolve(module, path.name == "__init__.py", node)
            targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in known else base for a in node.names]
        else:
            continue
        for target in targets:
            found.append((target, node.lineno in local_lines, node.lineno))
    return found


def graph() -> tuple[dict[str, set[str]], list[tuple[str, str, int]]]:
    """(module -> longtail modules it imports, [(module, function-local import, line)])."""
    files = {module_name(p): p for p in PACKAGE.rglob("*.py")}
    known = set(files)
    edges: dict[str, set[str]] = {m: set() for m in files}
    local: list[tuple[str, str, int]] = []
    for module, path in files.items():
        for target, is_local, line in imports(path, known):
            if is_local:
                local.append((module, target, line))
            if target.startswith("longtail") and target in known and target != module:
                edges[module].add(target)
                # importing a.b.c runs a/__init__ and a/b/__init__ first
                parts = target.split(".")
                for i in range(2, len(parts)):
                    parent = ".".join(parts[:i])
                    if parent in known and parent != module and not module.startswith(parent + "."):
                        edges[module].add(parent)
    return edges, local


def cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []
    counter = [0]

    def visit(node: str) -> None:
        index[node] = low[node] = counter[0]
        counter[0] += 1
        stack.append(node)
        on_stack.add(node)
        for nxt in sorted(edges.get(node, ())):
            if nxt not in index:
                visit(nxt)
                low[node] = min(low[node], low[nxt])
            elif nxt in on_stack:
                low[node] = min(low[node], index[nxt])
        if low[node] == index[node]:
            component = []
            while True:
                item = stack.pop()
                on_stack.discard(item)
                component.append(item)
                if item == node:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for node in sorted(edges):
        if node not in index:
            visit(node)
    return found


def test_no_import_circle_between_longtail_modules():
    edges, _ = graph()
    # a package's __init__ importing its own modules (for registration) is not a circle between floors:
    # leave out the edges from a module to the __init__ of its own package
    edges = {m: {t for t in targets if not m.startswith(t + ".")} for m, targets in edges.items()}
    assert cycles(edges) == []


def test_no_function_local_import_in_commands_and_engine():
    _, local = graph()
    offending = [f"{module}:{line} imports {target}" for module, target, line in local
                 if module.startswith(CHECKED) and (module, target.split(".")[0]) not in LAZY_ALLOWED
                 and (module, target) not in LAZY_ALLOWED]
    assert offending == []


def test_the_checker_sees_circles_and_local_imports():
    """The checker itself: a circle through a function-local import is found."""
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert cycles({"a": {"b"}, "b": set()}) == []
