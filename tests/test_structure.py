"""The house: leaves at the bottom, no import circle, rooms of a size a newcomer can hold."""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "ray_whisper"
MAX_LINES = 400
LEAVES = ("constants", "errors", "languages")
# imports kept inside functions for a measured start-up cost (python -X importtime), each said at the import
DEFERRED = {
    ("cli", "pipeline"),  # 0.4 s of pyarrow, tokenizers and fsspec that --help and a bad flag do not need
    ("cli", "export"),  # the same for `ray-whisper export`
    ("cli", "serve"),  # ... and for `ray-whisper serve` (Ray Serve, FastAPI)
    ("pipeline", "inference"),  # torch and the network, ~3 s: the driver never runs the model
}


def own_imports(path: Path, top_level_only: bool) -> set[str]:
    """Modules of the package that `path` imports (at its top level, or anywhere)."""
    tree = ast.parse(path.read_text())
    nodes = tree.body if top_level_only else list(ast.walk(tree))
    found = set()
    for node in nodes:
        if isinstance(node, ast.ImportFrom) and node.level == 1:
            if node.module:
                found.add(node.module.split(".")[0])
            else:
                found.update(a.name for a in node.names)
    return found & {p.stem for p in PACKAGE.glob("*.py")}


def modules() -> dict[str, Path]:
    return {p.stem: p for p in sorted(PACKAGE.glob("*.py")) if p.stem != "__init__"}


def test_no_import_circle():
    graph = {name: own_imports(path, top_level_only=False) for name, path in modules().items()}
    state: dict[str, int] = {}

    def visit(node: str, trail: list[str]) -> None:
        if state.get(node) == 1:
            raise AssertionError("import circle: " + " -> ".join(trail[trail.index(node):] + [node]))
        if state.get(node) == 2:
            return
        state[node] = 1
        for nxt in sorted(graph[node]):
            visit(nxt, trail + [node])
        state[node] = 2

    for name in graph:
        visit(name, [])


def test_leaves_import_nothing_of_the_package():
    for leaf in LEAVES:
        assert own_imports(PACKAGE / f"{leaf}.py", top_level_only=False) == set(), leaf


def test_the_package_imports_its_own_modules_at_the_top_of_each_file():
    """A function-level import of the package's own module hides a circle or a cost: none are left."""
    for name, path in modules().items():
        hidden = own_imports(path, top_level_only=False) - own_imports(path, top_level_only=True)
        hidden -= {target for where, target in DEFERRED if where == name}
        assert not hidden, f"{name}.py imports {sorted(hidden)} inside functions"


def test_no_room_is_past_400_lines():
    sizes = {name: len(path.read_text().splitlines()) for name, path in modules().items() if name != "languages"}
    assert max(sizes.values()) <= MAX_LINES, {k: v for k, v in sizes.items() if v > MAX_LINES}


def test_every_error_shares_one_base():
    import inspect

    from ray_whisper import errors

    classes = [c for _, c in inspect.getmembers(errors, inspect.isclass) if c.__module__ == errors.__name__]
    assert len(classes) > 8
    assert all(issubclass(c, errors.RayWhisperError) for c in classes)
    for name, path in modules().items():  # nobody else defines exception classes
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ClassDef) and name != "errors":
                bases = {getattr(b, "id", getattr(b, "attr", "")) for b in node.bases}
                assert not bases & {"Exception", "ValueError", "RuntimeError"}, f"{name}.{node.name}"
