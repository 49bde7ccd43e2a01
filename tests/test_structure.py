"""The house: rooms grouped by role, layers that point one way, leaves at the bottom, no import circle, rooms
of a size a newcomer can hold."""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "ray_whisper"
MAX_LINES = 400
LEAVES = ("constants", "errors", "languages")  # import nothing of the package
# Each room's layer: a module imports only from lower layers and from its own room. io and model sit side by
# side and never import each other; so do batch and serve (the endpoint never imports the batch job).
LAYER = {"constants": 0, "errors": 0, "languages": 0, "schema": 1, "config": 1,
         "io": 2, "model": 2, "asr": 3, "batch": 4, "serve": 4, "cli": 5, "__init__": 5}
ROOMS = ("config", "io", "model", "asr", "batch", "serve")
# imports kept inside functions for a measured start-up cost (python -X importtime), each said at the import
DEFERRED = {
    ("cli", "batch.pipeline"),  # 0.4 s of pyarrow, tokenizers and fsspec that --help and a bad flag do not need
    ("cli", "io.export"),  # the same for `ray-whisper export`
    ("cli", "serve.app"),  # ... and for `ray-whisper serve` (Ray Serve, FastAPI)
    ("batch.model_stage", "asr.engine"),  # torch and the network, ~3 s: the driver never runs the model
}


def modules() -> dict[str, Path]:
    """Every module of the package by its dotted name below ray_whisper ("io.storage", "cli")."""
    out = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = path.relative_to(PACKAGE).with_suffix("").parts
        if parts[-1] == "__init__" and len(parts) > 1:
            continue  # a room's __init__ is its docstring (serve's re-exports its app)
        out[".".join(parts)] = path
    return out


def own_imports(name: str, path: Path, top_level_only: bool) -> set[str]:
    """Modules of the package that module `name` imports (at its top level, or anywhere), by dotted name."""
    known = set(modules())
    package = name.split(".")[:-1]
    tree = ast.parse(path.read_text())
    nodes = list(ast.walk(tree))
    if top_level_only:  # the module's own statements, and its imports for type checkers only
        typing_only = [n.body for n in tree.body if isinstance(n, ast.If) and getattr(n.test, "id", "") == "TYPE_CHECKING"]
        nodes = tree.body + [n for body in typing_only for n in body]
    found = set()
    for node in nodes:
        if not isinstance(node, ast.ImportFrom) or node.level == 0:
            continue
        base = package[: len(package) - (node.level - 1)]
        target = ".".join(base + (node.module.split(".") if node.module else []))
        for alias in node.names:
            candidate = f"{target}.{alias.name}" if target else alias.name
            found.add(candidate if candidate in known else target)
    return found & known


def room(module: str) -> str:
    return module.split(".")[0]


def test_every_module_lives_in_a_room_or_is_a_leaf_or_the_front():
    top = {m for m in modules() if "." not in m}
    assert top == {"__init__", "cli", "constants", "errors", "languages", "schema"}, top
    assert {room(m) for m in modules()} <= set(LAYER)


def test_layers_point_one_way():
    wrong = []
    for name, path in modules().items():
        for target in own_imports(name, path, top_level_only=False):
            same_room = room(name) == room(target) and room(name) in ROOMS
            if not same_room and LAYER[room(target)] >= LAYER[room(name)]:
                wrong.append(f"{name} -> {target}")
    assert not wrong, wrong


def test_serve_never_imports_the_batch_job():
    for name, path in modules().items():
        if room(name) == "serve":
            assert not {t for t in own_imports(name, path, False) if room(t) == "batch"}, name


def test_no_import_circle():
    graph = {name: own_imports(name, path, top_level_only=False) for name, path in modules().items()}
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
        assert own_imports(leaf, PACKAGE / f"{leaf}.py", top_level_only=False) == set(), leaf


def test_the_package_imports_its_own_modules_at_the_top_of_each_file():
    """A function-level import of the package's own module hides a circle or a cost: none are left."""
    for name, path in modules().items():
        hidden = own_imports(name, path, top_level_only=False) - own_imports(name, path, top_level_only=True)
        hidden -= {target for where, target in DEFERRED if where == name}
        if name == "__init__":
            continue  # the public front imports lazily: `import ray_whisper` stays cheap
        assert not hidden, f"{name} imports {sorted(hidden)} inside functions"


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
