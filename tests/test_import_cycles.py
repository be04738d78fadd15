"""No import circle among the modules of src/llada_hf: each module's imports (relative or absolute, at the top or
inside a function) read with `ast`, and the graph they make must have no cycle."""

import ast
import graphlib
from pathlib import Path


PACKAGE = Path(__file__).parents[1] / "src" / "llada_hf"


def module_files(package: Path) -> dict[str, Path]:
    """Every module of the package by its dotted name (a package by its own name, not `....__init__`)."""
    modules = {}
    for path in sorted(package.rglob("*.py")):
        parts = path.relative_to(package.parent).with_suffix("").parts
        modules[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return modules


def imported_modules(node: ast.Import | ast.ImportFrom, importer: str, is_package: bool,
                     modules: dict[str, Path]) -> list[str]:
    """The package's modules that one import statement runs: `from .x import y` runs `.x.y` when that is a module,
    else `.x` (y is a name defined there); `import a.b` runs `a.b`."""
    if isinstance(node, ast.Import):
        return [alias.name for alias in node.names if alias.name in modules]
    base = node.module or ""
    if node.level:  # relative: `.` is the importer's package, each further dot one package up
        package = importer if is_package else importer.rpartition(".")[0]
        for _ in range(node.level - 1):
            package = package.rpartition(".")[0]
        base = f"{package}.{base}" if base else package
    found = [f"{base}.{alias.name}" for alias in node.names if f"{base}.{alias.name}" in modules]
    if len(found) < len(node.names) and base in modules:
        found.append(base)
    return found


def import_graph(package: Path) -> tuple[dict[str, set[str]], dict[tuple[str, str], str]]:
    """module -> the modules it imports, and where each edge is written (`file:line`). A module's parent packages
    are imported before it but are no edge of it: otherwise every `__init__` importing its own submodules would
    close a circle."""
    modules = module_files(package)
    graph: dict[str, set[str]] = {name: set() for name in modules}
    where: dict[tuple[str, str], str] = {}
    for importer, path in modules.items():
        is_package = path.name == "__init__.py"
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), filename=str(path))):
            if not isinstance(node, (ast.Import, ast.ImportFrom)):
                continue
            for imported in imported_modules(node, importer, is_package, modules):
                if imported != importer:
                    graph[importer].add(imported)
                    where.setdefault((importer, imported), f"{path.relative_to(package.parent)}:{node.lineno}")
    return graph, where


def import_cycle(package: Path) -> str | None:
    """One import circle, as `a -> b (a.py:3) -> a (b.py:7)`, or None when there is none."""
    graph, where = import_graph(package)
    try:
        graphlib.TopologicalSorter(graph).prepare()
    except graphlib.CycleError as error:
        chain = error.args[1][::-1]  # [a, b, ..., a]: graphlib lists each module before the one importing it
        return " -> ".join([chain[0]] + [f"{imported} ({where[importer, imported]})"
                                         for importer, imported in zip(chain, chain[1:])])
    return None


def test_the_package_has_no_import_cycle():
    assert import_cycle(PACKAGE) is None


def test_a_cycle_through_relative_absolute_and_function_level_imports_is_named(tmp_path):
    package = tmp_path / "pkg"
    (package / "sub").mkdir(parents=True)
    (package / "__init__.py").write_text("from . import a\n")  # a package importing its submodule: no circle
    (package / "a.py").write_text("from .sub.b import f\n")
    (package / "sub" / "__init__.py").write_text("")
    (package / "sub" / "b.py").write_text("def f():\n    from .. import c\n")
    (package / "c.py").write_text("import os\n\n\ndef g():\n    import pkg.a\n")
    cycle = import_cycle(package)
    assert cycle is not None
    assert {"pkg.a", "pkg.sub.b", "pkg.c"} <= {step.split(" ")[0] for step in cycle.split(" -> ")}
    assert "pkg/sub/b.py:2" in cycle and "pkg/c.py:5" in cycle
