"""schema/ARCHITECTURE.md's module map holds: every module is on it, imports run down its layers,
and no module imports itself through others."""

from __future__ import annotations

import ast
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def layers() -> dict[str, int]:
    """Each library module's layer on the map, counted from the top (0)."""
    out, layer = {}, -1
    for line in (ROOT / "schema" / "ARCHITECTURE.md").read_text().splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) != 3 or not cells[1].startswith("`"):
            continue
        if cells[0]:
            layer += 1
        name = cells[1].strip("`")
        if re.fullmatch(r"\w+\.py", name):
            out[name[:-3]] = layer
    return out


def imports(path: Path) -> set[str]:
    """The deltastore modules a module imports, at its top or inside functions; not those
    under `if TYPE_CHECKING:`, which never run."""
    out = set()
    todo = [ast.parse(path.read_text())]
    while todo:
        node = todo.pop()
        if isinstance(node, ast.If) and isinstance(node.test, ast.Name) and node.test.id == "TYPE_CHECKING":
            continue
        if isinstance(node, ast.ImportFrom) and node.level == 1:
            out |= {node.module.split(".")[0]} if node.module else {a.name for a in node.names}
        todo.extend(ast.iter_child_nodes(node))
    return out


def graph() -> dict[str, set[str]]:
    return {p.stem: imports(p) for p in (ROOT / "deltastore").glob("*.py") if p.stem != "__init__"}


def test_every_module_is_on_the_map():
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
