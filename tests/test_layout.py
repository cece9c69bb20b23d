"""The package's shape: modules of bounded size, and imports in layers with no cycle and none running back up."""
import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "brainsurgeon"
MAX_LINES = 400
# Lower layers never import higher ones: the basics; curvature, models and datasets; the methods; the drivers;
# bench and the demo; the command line.
LAYERS = [
    {"errors", "validation", "progress", "atomic", "modes", "distributed", "memory"},
    {"curvature", "models", "datasets"},
    {"methods"},
    {"drivers"},
    {"bench", "bench_plot", "bench_structured", "bench_structured_vision", "demo"},
    {"cli", "cli_lm", "cli_options", "cli_ranks", "cli_structured", "cli_table", "__main__"},
]


def modules() -> dict:
    """Dotted name (without 'brainsurgeon.') -> path, for every module but the package's own __init__."""
    found = {}
    for path in PACKAGE.rglob("*.py"):
        parts = path.relative_to(PACKAGE).with_suffix("").parts
        if parts == ("__init__",):
            continue
        found[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return found


def imports(name: str, path: Path) -> set:
    """The brainsurgeon modules `name` imports, at any depth of its code."""
    package = name.split(".")[:-1] if path.name != "__init__.py" else name.split(".")
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = package[: len(package) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            elif (node.module or "").startswith("brainsurgeon."):
                target = node.module[len("brainsurgeon."):]
            else:
                continue
            for alias in node.names:
                candidate = f"{target}.{alias.name}".strip(".")
                found.add(candidate if candidate in modules() else target)
        elif isinstance(node, ast.Import):
            found |= {alias.name[len("brainsurgeon."):] for alias in node.names
                      if alias.name.startswith("brainsurgeon.")}
    return {target for target in found if target}


def layer(name: str) -> int:
    top = name.split(".")[0]
    return next(index for index, names in enumerate(LAYERS) if top in names)


def test_every_module_is_in_a_layer_and_under_the_size_limit():
    for name, path in modules().items():
        layer(name)
        assert len(path.read_text().splitlines()) <= MAX_LINES, f"{name} is above {MAX_LINES} lines"


def test_no_import_runs_up_a_layer():
    for name, path in modules().items():
        for target in imports(name, path):
            if target == "":
                continue
            assert layer(target) <= layer(name), f"{name} (layer {layer(name)}) imports {target} ({layer(target)})"


def test_imports_form_no_cycle():
    graph = {name: {t for t in imports(name, path) if t in modules() and t != name}
             for name, path in modules().items()}
    state = {}

    def visit(name, trail):
        if state.get(name) == "done":
            return
        assert state.get(name) != "open", "import cycle: " + " -> ".join(trail + [name])
        state[name] = "open"
        for target in sorted(graph[name]):
            visit(target, trail + [name])
        state[name] = "done"

    for name in sorted(graph):
        visit(name, [])
