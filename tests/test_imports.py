"""The package's import graph has no cycle, counting imports made inside functions too (only imports
under `if TYPE_CHECKING:` are left out): a cycle that works only because one side imports late
breaks as soon as that import moves."""

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def modules() -> dict[str, Path]:
    found = {}
    for path in [*(ROOT / "essa").rglob("*.py"), *(ROOT / "rewards").glob("*.py")]:
        parts = list(path.relative_to(ROOT).with_suffix("").parts)
        parts = ["essa", *parts] if parts[0] == "rewards" else parts  # installed as essa.rewards
        found[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return found


def imports(path: Path, known: dict[str, Path]) -> set[str]:
    tree = ast.parse(path.read_text())
    typing_only = {id(n) for node in ast.walk(tree)
                   if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.dump(node.test) for n in ast.walk(node)}
    out = set()
    for node in ast.walk(tree):
        if id(node) in typing_only:
            continue
        if isinstance(node, ast.Import):
            out |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module:
            names = [f"{node.module}.{a.name}" for a in node.names]
            out |= {n for n in names if n in known}  # `from pkg import module` depends on the module
            if not all(n in known for n in names):
                out.add(node.module)
    return {m for m in out if m in known}


def test_the_import_graph_has_no_cycle():
    known = modules()
    graph = {name: imports(path, known) - {name} for name, path in known.items()}
    done: set[str] = set()

    def visit(name: str, path: list[str]) -> None:
        if name in path:
            raise AssertionError("import cycle: " + " -> ".join(path[path.index(name):] + [name]))
        if name not in done:
            for dependency in sorted(graph[name]):
                visit(dependency, path + [name])
            done.add(name)

    for name in sorted(graph):
        visit(name, [])
