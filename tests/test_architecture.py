"""schema/ARCHITECTURE.md's module map holds: every module is on it under its package, imports run
down its layers (a module's layer is its package's), and no module imports itself through others."""

from __future__ import annotations

import ast
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

# Old module paths kept for one release (CHANGELOG.md): each is the module it names, off the map.
SHIMS = {"deltastore.hub": "deltastore.sharing.hub", "deltastore.spare": "deltastore.core.spare"}


def layers() -> dict[str, int]:
    """Each library module's layer on the map, counted from the top (0): its package's row."""
    out, layer, package = {}, -1, ""
    for line in (ROOT / "schema" / "ARCHITECTURE.md").read_text().splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) != 3 or not cells[1].startswith("`"):
            continue
        if cells[0]:
            layer += 1
            package = re.match(r"`([\w/]+)/`", cells[0]).group(1).replace("/", ".")
        name = cells[1].strip("`")
        if package.startswith("deltastore") and re.fullmatch(r"\w+\.py", name):
            out[f"{package}.{name[:-3]}"] = layer
    return out


def dotted(path: Path) -> str:
    return ".".join(path.relative_to(ROOT).with_suffix("").parts)


def modules() -> dict[str, Path]:
    """Every library module but the packages' `__init__.py` and the old paths."""
    found = {dotted(p): p for p in (ROOT / "deltastore").rglob("*.py") if p.stem != "__init__"}
    return {m: p for m, p in found.items() if m not in SHIMS}


def imports(path: Path, known: set[str]) -> set[str]:
    """The deltastore modules a module imports, at its top, inside functions or under `if
    TYPE_CHECKING:` (a type named from an upper layer is a dependency on it too), relative or by
    full name."""
    package = dotted(path).split(".")[:-1]
    out = set()
    todo = [ast.parse(path.read_text())]
    while todo:
        node = todo.pop()
        if isinstance(node, ast.ImportFrom) and (node.level or (node.module or "").split(".")[0] == "deltastore"):
            base = ".".join(package[:len(package) - node.level + 1] if node.level else [])
            full = ".".join(filter(None, [base, node.module]))
            out |= {f"{full}.{a.name}" if f"{full}.{a.name}" in known | SHIMS.keys() else full for a in node.names}
        if isinstance(node, ast.Import):
            out |= {a.name for a in node.names if a.name.split(".")[0] == "deltastore"}
        todo.extend(ast.iter_child_nodes(node))
    return {SHIMS.get(m, m) for m in out} & known


def graph() -> dict[str, set[str]]:
    found = modules()
    return {m: imports(p, set(found)) for m, p in found.items()}


def test_every_module_is_on_the_map_under_its_package():
    assert set(graph()) == set(layers())


def test_imports_run_down_the_layers():
    layer = layers()
    upward = sorted(f"{m} imports {d}" for m, deps in graph().items() for d in deps
                    if d in layer and layer[d] < layer[m])
    assert upward == []


def test_no_module_imports_itself_through_others():
    g = graph()

    def reaches(start: str) -> set[str]:
        seen, todo = set(), list(g[start])
        while todo:
            m = todo.pop()
            if m not in seen and m in g:
                seen.add(m)
                todo.extend(g[m])
        return seen

    assert sorted(m for m in g if m in reaches(m)) == []


def test_a_subpackage_imports_nothing_when_opened():
    """A subpackage's `__init__.py` is its docstring alone, so opening one package never loads
    another behind the map's back."""
    inits = sorted((ROOT / "deltastore").glob("*/__init__.py"))
    assert len(inits) >= 10
    assert {dotted(p): imports(p, set(modules())) for p in inits} == {dotted(p): set() for p in inits}


def test_an_old_module_path_is_the_module_it_names():
    import importlib

    for old, new in SHIMS.items():
        assert importlib.import_module(old) is importlib.import_module(new)
    top = {dotted(p) for p in (ROOT / "deltastore").glob("*.py") if p.stem != "__init__"}
    assert top - set(layers()) == set(SHIMS)


def test_every_import_of_deltastore_names_what_is_there():
    """Each `deltastore` module named in an import, relative or full, in the library, the CLI, the
    tests and the examples exists where the import looks for it (an edit made against the old
    flat layout shows here, even in an import inside a function that no test runs)."""
    known = set(modules()) | SHIMS.keys()
    packages = {dotted(p.parent) for p in (ROOT / "deltastore").rglob("__init__.py")}
    import deltastore

    top = set(deltastore.__all__) | {"__version__"}
    wrong = []
    for folder in ("deltastore", "cli", "tests", "examples"):
        for path in sorted((ROOT / folder).rglob("*.py")):
            package = dotted(path).split(".")[:-1]
            for node in ast.walk(ast.parse(path.read_text())):
                if isinstance(node, ast.Import):
                    named = [a.name for a in node.names if a.name.split(".")[0] == "deltastore"]
                elif isinstance(node, ast.ImportFrom) and ((node.level and folder == "deltastore")
                                                           or (node.module or "").split(".")[0] == "deltastore"):
                    base = ".".join(package[:len(package) - node.level + 1] if node.level else [])
                    full = ".".join(filter(None, [base, node.module]))
                    named = [full] if full in known else [
                        f"{full}.{a.name}" if f"{full}.{a.name}" in known | packages or full != "deltastore"
                        or a.name not in top else full for a in node.names]
                else:
                    continue
                wrong += [f"{path.relative_to(ROOT)}:{node.lineno} {m}" for m in named
                          if m not in known | packages]
    assert wrong == []



def test_every_command_is_a_short_function():
    """cli/ is a thin layer: each command parses, makes its library call and renders, in under
    30 lines (from its `def`; rendering helpers beside it)."""
    import inspect

    from cli.docs import commands

    long = []
    for path, command in commands():
        f = command.callback
        while hasattr(f, "__wrapped__"):
            f = f.__wrapped__
        lines = inspect.getsourcelines(f)[0]
        length = len(lines) - next(i for i, line in enumerate(lines) if line.lstrip().startswith("def "))
        if length >= 30:
            long.append(f"{' '.join(path)}: {length} lines")
    assert long == []


def test_the_command_line_is_installed_inside_the_package():
    """pyproject.toml ships cli/ as `deltastore.cli`, with no top-level `cli` package that another
    distribution's could collide with, and the `deltastore` command points into it; cli/'s own
    modules import each other relatively, so both names reach the same code."""
    import tomllib

    project = tomllib.loads((ROOT / "pyproject.toml").read_text())
    setuptools = project["tool"]["setuptools"]
    assert setuptools["package-dir"] == {"deltastore.cli": "cli"}
    assert "deltastore.cli" in setuptools["packages"] and "cli" not in setuptools["packages"]
    assert project["project"]["scripts"] == {"deltastore": "deltastore.cli.main:main"}
    absolute = [f"{p.name}:{node.lineno}" for p in (ROOT / "cli").glob("*.py")
                for node in ast.walk(ast.parse(p.read_text()))
                if isinstance(node, ast.ImportFrom) and not node.level and (node.module or "").split(".")[0] == "cli"]
    assert absolute == []


def test_nothing_below_the_store_names_it():
    """engine/, patching/ and the layers under them take the small object they need (a Reader,
    a Repo), never the `Store` that composes them: no name, annotation or import of it."""
    layer, top = layers(), layers()["deltastore.store"]
    named = sorted(f"{m}:{node.lineno}" for m, p in modules().items() if layer.get(m, -1) > top
                   for node in ast.walk(ast.parse(p.read_text()))
                   if (isinstance(node, ast.Name) and node.id == "Store")
                   or (isinstance(node, ast.alias) and node.name in ("Store", "store")))
    assert named == []


def test_no_module_uses_another_modules_private_names():
    """A `_name` of another deltastore module is never imported or reached through the module."""
    found = modules()
    used = []
    for m, p in found.items():
        tree = ast.parse(p.read_text())
        aliases = {a.asname or a.name: a.name for node in ast.walk(tree) if isinstance(node, ast.ImportFrom)
                   for a in node.names}
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and (node.level or (node.module or "").startswith("deltastore")):
                used += [f"{m}: imports {a.name}" for a in node.names if a.name.startswith("_")]
            if isinstance(node, ast.Attribute) and node.attr.startswith("_") and not node.attr.startswith("__") \
                    and isinstance(node.value, ast.Name) and node.value.id in aliases \
                    and any(k.endswith("." + aliases[node.value.id]) for k in found):
                used.append(f"{m}: {node.value.id}.{node.attr}")
    assert used == []
