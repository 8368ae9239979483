"""The trainer's import graph, read from the source with ``ast`` (nothing is imported): no module imports another
that imports it back, directly or through others, the matrix never imports the trainer (which reads it), and
runtime weight loading (``trainer.models``) never imports the offline converter (``trainer.convert``), which depends
on it. Imports inside functions count: they run too; imports under ``if TYPE_CHECKING:`` do not."""

import ast
from pathlib import Path

import pytest

PACKAGES = ("trainer", "matrix")


def modules(repo: Path, package: str) -> dict[str, Path]:
    found = {}
    for path in sorted((repo / package).rglob("*.py")):
        name = ".".join(path.relative_to(repo).with_suffix("").parts)
        found[name.removesuffix(".__init__")] = path
    return found


def runtime_nodes(tree: ast.AST):
    """Every node under ``tree`` but those under ``if TYPE_CHECKING:`` (only a type checker runs them)."""
    for child in ast.iter_child_nodes(tree):
        if isinstance(child, ast.If) and "TYPE_CHECKING" in ast.unparse(child.test):
            for other in child.orelse:
                yield other
                yield from runtime_nodes(other)
            continue
        yield child
        yield from runtime_nodes(child)


def imported(name: str, path: Path, known: dict[str, Path]) -> set[str]:
    """The project modules ``name`` imports: ``from a.b import c`` is a.b, and a.b.c where that is a module."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in runtime_nodes(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(parts + ([node.module] if node.module else []))
            targets = [base] + [f"{base}.{alias.name}" for alias in node.names]
        else:
            continue
        found |= {t for t in targets if t in known and t != name}
    return found


def graph(repo: Path) -> dict[str, set[str]]:
    known = {name: path for package in PACKAGES for name, path in modules(repo, package).items()}
    return {name: imported(name, path, known) for name, path in known.items()}


def cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan), each sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        for w in sorted(edges[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in sorted(edges):
        if v not in index:
            visit(v)
    return found


@pytest.fixture(scope="module")
def edges():
    return graph(Path(__file__).resolve().parent.parent)


def test_no_module_imports_itself_back(edges):
    assert cycles(edges) == [], "import cycles (each a set of modules importing one another)"


def test_the_matrix_does_not_import_the_trainer(edges):
    offenders = sorted(f"{a} imports {b}" for a, targets in edges.items() if a.startswith("matrix")
                       for b in targets if b.startswith("trainer"))
    assert offenders == [], "the trainer reads the matrix, not back (the layout arithmetic lives in matrix.layout)"


def test_runtime_weight_loading_does_not_import_the_converter(edges):
    offenders = sorted(
        f"{a} imports {b}"
        for a, targets in edges.items()
        if a.startswith("trainer.models")
        for b in targets
        if b.startswith("trainer.convert")
    )
    assert offenders == [], "trainer.models reads weights; trainer.convert (offline) depends on it, not back"


def test_the_graph_sees_function_level_and_relative_imports(tmp_path):
    """The check would miss nothing that the two tests above rely on: lazy and relative imports count."""
    (tmp_path / "trainer" / "convert").mkdir(parents=True)
    (tmp_path / "trainer" / "models").mkdir()
    for init in ("trainer", "trainer/convert", "trainer/models"):
        (tmp_path / init / "__init__.py").write_text("")
    (tmp_path / "trainer" / "models" / "pretrained.py").write_text(
        "def f():\n    from ..convert import sharded\n"
    )
    (tmp_path / "trainer" / "convert" / "sharded.py").write_text(
        "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from trainer.models import other\n"
        "from trainer.models.pretrained import f\n")
    (tmp_path / "trainer" / "models" / "other.py").write_text("")
    g = {k: v for k, v in graph(tmp_path).items() if k.startswith("trainer")}
    assert g["trainer.models.pretrained"] == {"trainer.convert", "trainer.convert.sharded"}
    assert cycles(g) == [["trainer.convert.sharded", "trainer.models.pretrained"]]
