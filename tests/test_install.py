"""The front door: the lock covers what the project declares, and CI installs and tests exactly as the README
says. (That the install resolves on a fresh machine is what .ci/run itself proves: it builds a brand-new virtual
environment on every run, from the project's own files.)"""

from __future__ import annotations

import re
import tomllib
from pathlib import Path

from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

ROOT = Path(__file__).resolve().parents[1]
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())
CI = (ROOT / ".ci" / "run").read_text()
README = (ROOT / "README.md").read_text()


def lock() -> dict[str, str]:
    pins = {}
    for line in (ROOT / "constraints.txt").read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if line:
            name, version = line.split("==")
            pins[canonicalize_name(name)] = version
    return pins


def declared(extras: tuple[str, ...] = ()) -> list[Requirement]:
    project = PYPROJECT["project"]
    reqs = [Requirement(r) for r in project["dependencies"]]
    for extra in extras:
        reqs += [Requirement(r) for r in project["optional-dependencies"][extra]]
    return reqs


def quickstart() -> list[str]:
    """The Quickstart section's command blocks, in order."""
    section = README.split("## Quickstart", 1)[1].split("\n## ", 1)[0]
    return [b.strip() for b in re.findall(r"```bash\n(.*?)```", section, re.S)]


def test_the_lock_pins_every_declared_dependency_within_its_bounds():
    pins = lock()
    extras = tuple(PYPROJECT["project"]["optional-dependencies"])
    for req in declared(extras):
        name = canonicalize_name(req.name)
        assert name in pins, f"{req.name} is declared in pyproject.toml but not pinned in constraints.txt"
        assert req.specifier.contains(pins[name], prereleases=True), (
            f"constraints.txt pins {req.name}=={pins[name]}, outside pyproject.toml's {req}"
        )
        for extra in req.extras:  # ray[serve] etc: the extra's packages are locked too
            assert extra in ("data", "default", "serve", "server"), extra
    for must in ("fastapi", "uvicorn", "botocore", "aiobotocore"):  # what those extras bring
        assert must in pins, must


def test_ci_installs_with_the_lock_and_runs_the_readmes_test_command():
    install, tests = quickstart()[:2]
    assert tests == "python -m pytest -q"
    assert re.search(r"^python -m pytest -q$", CI, re.M), ".ci/run must run the README's test command as written"
    steps = [s.strip() for s in install.split("&&")]
    pip_steps = [s for s in steps if s.startswith("pip install")]
    assert pip_steps and all("-c constraints.txt" in s for s in pip_steps), pip_steps
    for step in pip_steps:
        assert re.search(rf"^{re.escape(step)}$", CI, re.M), f".ci/run must install as the README does: {step}"
    assert "python3 -m venv" in CI and "rm -rf" in CI, ".ci/run must build (and remove) a brand-new environment"
    assert steps[-1] == "ray-whisper transcribe examples/manifest.csv out/"


def test_torch_is_the_same_release_everywhere():
    pins = lock()
    refresh = (ROOT / "tools" / "refresh-constraints").read_text()
    wanted = f"torch=={pins['torch']}"
    for where, text in (("README.md", quickstart()[0]), (".ci/run", CI), ("tools/refresh-constraints", refresh)):
        assert wanted in text, f"{where} does not install {wanted}"


def test_every_package_the_code_imports_comes_with_a_plain_install():
    """A module of ray_whisper/ that imports a package only the test extra brings breaks for a user who ran
    `pip install ray-whisper` (the export once wrote SRT with a test-only package): every third-party import
    must be a main dependency or something one of them requires."""
    import ast
    import importlib.metadata as md
    import sys

    from packaging.markers import Marker

    def requirements(req: Requirement) -> list[Requirement]:
        out = []
        for text in md.requires(req.name) or []:
            sub = Requirement(text)
            marker = sub.marker or Marker("python_version >= '0'")
            if any(marker.evaluate({"extra": e}) for e in (*req.extras, "")):
                out.append(sub)
        return out

    brought, todo = set(), list(declared())
    while todo:
        req = todo.pop()
        key = (canonicalize_name(req.name), tuple(sorted(req.extras)))
        if key in brought:
            continue
        brought.add(key)
        todo += requirements(req)
    names = {name for name, _ in brought}
    providers = md.packages_distributions()
    for path in sorted((ROOT / "ray_whisper").rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                modules = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and not node.level:
                modules = [node.module]
            else:
                continue
            for top in {m.split(".")[0] for m in modules}:
                if top in sys.stdlib_module_names or top == "ray_whisper":
                    continue
                dists = {canonicalize_name(d) for d in providers.get(top, [])}
                assert dists & names, f"{path.name} imports {top} ({dists or 'not installed'}), which no main dependency brings"
