"""The code's layout: imports run one way through the subpackages, no cycles, units a reader can hold in mind.

``pipeline/`` is organised by capability in the order data flows. A module may import
its own subpackage, the shared top-level modules (``config``, ``errors``) and the
subpackages below its own, and those only through the names their ``__init__``
exports (``__all__``). ``transforms/`` and ``models/`` import nothing of ``pipeline/``;
``models/`` knows no files, data or MLflow.
"""

from __future__ import annotations

import ast
import importlib
from collections.abc import Iterator
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

#: Lower first. A subpackage may import those at a lower rank; equal ranks do not import each other.
RANKS = {
    "errors": 0, "host_jobs": 0.2, "benchmarking": 0.25, "cpus": 0.25, "config": 0.5, "dicomweb": 0.75,
    "data": 1, "quality": 1.5, "inference": 2, "evaluation": 3, "training": 4, "registry": 5,
    "scheduling": 6, "pacs": 6, "stages": 7, "cli": 8, "__main__": 9,
}
SHARED = {"config", "errors"}
MAX_MODULE_LINES = 500
MAX_FUNCTION_LINES = 80
#: Units allowed past the limits, each with the reason the closing note gives.
EXCEPTIONS: dict[str, str] = {}


def _modules(root: Path, package: str) -> Iterator[tuple[str, Path]]:
    for path in sorted((root / package).rglob("*.py")):
        parts = list(path.relative_to(root).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        yield ".".join(parts), path


def _imports(path: Path) -> Iterator[tuple[str, list[str], int]]:
    """(module, imported names, line) of every import in a file, function-level ones included."""
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            yield node.module, [a.name for a in node.names], node.lineno
        elif isinstance(node, ast.Import):
            for alias in node.names:
                yield alias.name, [], node.lineno


def _unit(module: str) -> str:
    """The layout unit of a ``pipeline`` module: its subpackage, or the top-level module's name."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "pipeline"


def _exports(root: Path, package: str) -> set[str]:
    init = root / "pipeline" / package / "__init__.py"
    for node in ast.parse(init.read_text()).body:
        if isinstance(node, ast.Assign) and any(getattr(t, "id", "") == "__all__" for t in node.targets):
            return set(ast.literal_eval(node.value))
    return set()


def layout_violations(root: Path) -> list[str]:
    """Every import that breaks the layout's rules, as ``file:line: reason``.

    Args:
        root: the project root (holding ``pipeline/``, ``transforms/`` and ``models/``).
    """
    problems = []
    packages = {p.name for p in (root / "pipeline").iterdir() if (p / "__init__.py").is_file()}
    for module, path in _modules(root, "pipeline"):
        unit = _unit(module)
        if unit == "pipeline":
            continue
        for target, names, line in _imports(path):
            if not target.startswith("pipeline.") and target != "pipeline":
                continue
            where = f"{path.relative_to(root)}:{line}"
            targets = [f"pipeline.{n}" for n in names] if target == "pipeline" else [target]
            for full in targets:
                other = _unit(full)
                if other == unit or other == "pipeline":
                    continue
                if other not in RANKS:
                    problems.append(f"{where}: {module} imports {full}, which has no place in the layout")
                    continue
                if RANKS[other] >= RANKS[unit]:
                    problems.append(f"{where}: {module} ({unit}) imports {full} ({other}), which is not below it")
                    continue
                if other in packages and other not in SHARED:
                    if full.count(".") > 1:
                        problems.append(f"{where}: {module} imports {full}: use the names pipeline.{other} exports")
                    elif target != "pipeline":
                        hidden = sorted(set(names) - _exports(root, other))
                        if hidden:
                            problems.append(f"{where}: {module} imports {hidden} from pipeline.{other}, "
                                            f"which does not export them (__all__)")
    for package, banned in (("transforms", ("pipeline",)),
                            ("models", ("pipeline", "transforms", "mlflow", "nibabel", "pydicom", "SimpleITK", "monai.data"))):
        for module, path in _modules(root, package):
            for target, _, line in _imports(path):
                if target.split(".")[0] in banned or any(target.startswith(b + ".") or target == b for b in banned):
                    problems.append(f"{path.relative_to(root)}:{line}: {module} imports {target}")
    return problems


def import_cycles(root: Path) -> list[list[str]]:
    """Cycles in the module import graph of ``pipeline``, ``transforms`` and ``models`` (strongly connected parts).

    Importing ``a.b.c`` runs the ``__init__`` of ``a.b`` first, so an import of a
    module is also an edge to each package above it.

    Args:
        root: the project root.
    """
    modules = {m: p for pkg in ("pipeline", "transforms", "models") for m, p in _modules(root, pkg)}
    graph: dict[str, set[str]] = {m: set() for m in modules}
    for module, path in modules.items():
        for target, names, _ in _imports(path):
            candidates = [target] + [f"{target}.{n}" for n in names]
            for full in candidates:
                parts = full.split(".")
                for i in range(1, len(parts) + 1):
                    dep = ".".join(parts[:i])
                    if dep in modules and dep != module and not module.startswith(dep + "."):
                        graph[module].add(dep)
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    cycles: list[list[str]] = []

    def visit(v: str) -> None:  # Tarjan's strongly connected components
        index[v] = low[v] = len(index)
        stack.append(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            part = []
            while True:
                w = stack.pop()
                part.append(w)
                if w == v:
                    break
            if len(part) > 1:
                cycles.append(sorted(part))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return cycles


def oversized_units(root: Path) -> list[str]:
    """Modules over :data:`MAX_MODULE_LINES` lines and functions over :data:`MAX_FUNCTION_LINES`, less the exceptions.

    Args:
        root: the project root.
    """
    found = []
    for package in ("pipeline", "transforms", "models"):
        for module, path in _modules(root, package):
            text = path.read_text()
            if len(text.splitlines()) > MAX_MODULE_LINES and module not in EXCEPTIONS:
                found.append(f"{module}: {len(text.splitlines())} lines")
            for node in ast.walk(ast.parse(text)):
                if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                    length = node.end_lineno - node.lineno + 1
                    if length > MAX_FUNCTION_LINES and f"{module}.{node.name}" not in EXCEPTIONS:
                        found.append(f"{module}.{node.name}: {length} lines")
    return found


def test_imports_follow_the_layout() -> None:
    assert layout_violations(ROOT) == []


def test_no_import_cycles() -> None:
    assert import_cycles(ROOT) == []


def test_no_unit_too_large_to_hold_in_mind() -> None:
    assert oversized_units(ROOT) == []


def test_every_subpackage_exports_what_it_says() -> None:
    for init in sorted((ROOT / "pipeline").glob("*/__init__.py")):
        package = importlib.import_module(f"pipeline.{init.parent.name}")
        assert package.__doc__ and len(package.__doc__.split()) > 20, f"{init}: say what it does and must not import"
        assert package.__all__, f"{init}: no __all__"
        missing = [name for name in package.__all__ if not hasattr(package, name)]
        assert missing == [], f"{init}: __all__ names what it does not define: {missing}"


def _tree(tmp_path: Path, files: dict[str, str]) -> Path:
    for name, text in files.items():
        path = tmp_path / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    for package in ("pipeline", "transforms", "models"):
        (tmp_path / package).mkdir(exist_ok=True)
        (tmp_path / package / "__init__.py").touch()
    return tmp_path


@pytest.mark.parametrize("files, expected", [
    ({"pipeline/data/__init__.py": "__all__ = []\n", "pipeline/data/a.py": "def f():\n    from pipeline.training import x\n",
      "pipeline/training/__init__.py": "__all__ = ['x']\nx = 1\n"}, "not below it"),
    ({"pipeline/data/__init__.py": "__all__ = []\n", "pipeline/training/__init__.py": "__all__ = []\n",
      "pipeline/training/a.py": "from pipeline.data.files import write\n"}, "use the names"),
    ({"pipeline/data/__init__.py": "__all__ = ['a']\n", "pipeline/training/__init__.py": "__all__ = []\n",
      "pipeline/training/a.py": "from pipeline.data import hidden\n"}, "does not export"),
    ({"transforms/a.py": "import pipeline.errors\n"}, "transforms.a imports pipeline.errors"),
    ({"models/a.py": "import mlflow\n"}, "models.a imports mlflow"),
    ({"pipeline/scheduling/__init__.py": "__all__ = []\n", "pipeline/pacs/__init__.py": "__all__ = ['b']\nb = 1\n",
      "pipeline/scheduling/a.py": "from pipeline.pacs import b\n"}, "not below it"),
])
def test_the_layout_check_sees_a_violation(tmp_path: Path, files: dict[str, str], expected: str) -> None:
    problems = layout_violations(_tree(tmp_path, files))
    assert any(expected in p for p in problems), problems


def test_the_cycle_check_sees_a_cycle(tmp_path: Path) -> None:
    root = _tree(tmp_path, {"pipeline/data/a.py": "from pipeline.data.b import f\n",
                            "pipeline/data/b.py": "def f():\n    from pipeline.data.a import g\n"})
    assert import_cycles(root) == [["pipeline.data.a", "pipeline.data.b"]]


def test_the_size_check_sees_a_long_function(tmp_path: Path) -> None:
    body = "\n".join(f"    x{i} = {i}" for i in range(MAX_FUNCTION_LINES))
    root = _tree(tmp_path, {"pipeline/data/a.py": f"def long():\n{body}\n"})
    assert oversized_units(root) == [f"pipeline.data.a.long: {MAX_FUNCTION_LINES + 1} lines"]
