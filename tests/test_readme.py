"""The README's front door cannot rot: every fenced command block (of the README, and of docs/, whose
findings each come with the command that reproduces them) either checks here, cheaply, or says why it
cannot, on the line just above its fence.

- `<!-- needs: cloud -->` / `<!-- needs: cluster -->`: it needs AWS, a bucket or a real cluster. Not run; its
  `ray-whisper` commands still parse and its repo paths still exist.
- `<!-- needs: gpu -->`: it needs a CUDA machine (the CUDA build of PyTorch). Not run.
- `<!-- needs: endpoint -->`: it talks to the endpoint a block above it starts; the routes it calls exist.
- `<!-- runs-in: tests/test_x.py -->`: that test runs this command; the file exists and holds the block's key
  arguments (its long flags, scripts and `name=value` option names).
- Unmarked: every command is one this test can check without running it: `ray-whisper` (its subcommand and
  flags parse with the CLI's own parser), `python` on a repo script (the script exists; its flags parse with
  a parser rebuilt from the script's `add_argument` calls, without importing it), `python -m pytest|venv`,
  `pip install` (constraints file, extras and pins agree with the project), and shell plumbing.

Every `ray ...` and `serve ...` command, marked or not, must name a real subcommand and real flags of Ray's
own CLI. Python blocks compile. The README stays short and, with docs/, free of development-history words and
of the modules' old flat names. No Ray starts and no model loads here (~4 s, most of it importing Ray's CLI).
"""

from __future__ import annotations

import argparse
import ast
import contextlib
import io
import re
import shlex
import tomllib
from dataclasses import dataclass
from functools import cache
from pathlib import Path

import pytest

from ray_whisper import cli, config

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()
MAX_LINES = 320
# How the project was developed is not what the project is: no such words in the README or docs/.
HISTORY = re.compile(r"\bstops?[ -][0-9]+\b|at stop|/tmp script|\bsessions? [0-9]|was lent|this task\b|patched", re.I)
# Modules that moved into rooms: a doc that names the old place sends a reader nowhere.
OLD_MODULES = re.compile(r"^(ray_whisper/)?(inference|passes|tuning|model|preprocess|batching|cache|serve)\.py\b"
                         r"|^(inference|passes|tuning|preprocess|batching)\.[A-Za-z_]")

COMMAND_LANGS = {"bash", "sh", "shell", "console"}
# Programs a command block may use unmarked: each is checked below, or is shell plumbing with nothing to check.
CHEAP = {"ray-whisper", "python", "python3", "pip", "export", "cd", ".", "source", "lscpu", "grep", "echo"}
# Programs that announce a command block even without a language on its fence.
PROGRAMS = CHEAP | {"ray", "serve", "curl", "kubectl", "aws", "jupyter", "docker", "helm"}
# Set-up lines of a runs-in block that the named test does differently (its own token, its own teardown); they
# are still checked against Ray's CLI.
SETUP = {("export",), ("cd",), (".",), ("source",), ("pip",), ("ray", "get-auth-token"), ("ray", "stop")}
REPO_FILE = re.compile(r"(?:^|[=@])([\w.-]+(?:/[\w.-]+)*\.(?:py|csv|tsv|jsonl|parquet|yaml|yml|ipynb|txt|flac|mp3|wav|toml))$")


@dataclass
class Block:
    lang: str
    body: str
    marker: str  # the HTML comment just above the fence, or ""
    line: int  # 1-based line of the opening fence
    doc: str = "README.md"

    def where(self) -> str:
        return f"{self.doc}:{self.line}"


def blocks(text: str, doc: str = "README.md") -> list[Block]:
    """Every fenced block, with its language and the marker on the line before its fence."""
    found, lines, i = [], text.splitlines(), 0
    while i < len(lines):
        m = re.match(r"^(```+)\s*([\w+-]*)\s*$", lines[i])
        if not m:
            i += 1
            continue
        fence, start = m.group(1), i
        end = next((j for j in range(i + 1, len(lines)) if lines[j].strip() == fence), None)
        assert end is not None, f"{doc}:{i + 1}: a fence that never closes"
        above = lines[start - 1].strip() if start else ""
        marker = above if above.startswith("<!--") else ""
        found.append(Block(m.group(2).lower(), "\n".join(lines[start + 1:end]), marker, start + 1, doc))
        i = end + 1
    return found


def command_lines(block: Block) -> list[str]:
    """The block's commands, one logical line each (backslash continuations joined); for `console` blocks
    only the `$ ` lines."""
    text = block.body.replace("\\\n", " ")
    out = []
    for line in text.splitlines():
        line = line.strip()
        if block.lang == "console" or line.startswith("$ "):
            if not line.startswith("$ "):
                continue
            line = line[2:]
        if line and not line.startswith("#"):
            out.append(line)
    return out


def is_command_block(block: Block) -> bool:
    if block.lang in COMMAND_LANGS:
        return True
    if block.lang:
        return False
    first = [ln.strip().removeprefix("$ ").split()[:1] for ln in block.body.splitlines() if ln.strip()]
    return bool(first) and first[0][0] in PROGRAMS


def commands(line: str) -> list[list[str]]:
    """Shell words of each simple command on a line: split at && || ; | &, redirections dropped."""
    lexer = shlex.shlex(line, posix=True, punctuation_chars=True)
    lexer.whitespace_split = True
    words, cmds, skip = [], [], False
    for tok in lexer:
        if skip:
            skip = False
        elif tok in {"&&", "||", ";", "|", "&"}:
            cmds.append(words)
            words = []
        elif re.fullmatch(r"[<>]+&?", tok):  # > /dev/null, >> log, < in: the target is not an argument
            skip = True
        else:
            words.append(tok)
    cmds.append(words)
    return [c for c in cmds if c]


# ------------------------------------------------------------------------------------------- the checkers


@cache
def ray_clis():
    """Ray's click command groups: `ray` and `serve`."""
    import warnings

    with warnings.catch_warnings():  # Ray Serve's pydantic models warn on import; not this test's business
        warnings.simplefilter("ignore")
        from ray.scripts.scripts import cli as ray_cli
        from ray.serve.scripts import cli as serve_cli

    return {"ray": ray_cli, "serve": serve_cli}


def check_click(argv: list[str]) -> list[str]:
    """`ray ...` / `serve ...`: the subcommand exists and every flag is one of its options."""
    import click

    cmd, rest, path = ray_clis()[argv[0]], argv[1:], [argv[0]]
    while isinstance(cmd, click.Group):
        if not rest or rest[0] not in cmd.commands:
            return [f"`{' '.join(path)}` has no subcommand {rest[:1]}"]
        cmd, rest = cmd.commands[rest[0]], rest[1:]
        path.append(cmd.name)
    if "--" in rest:
        rest = rest[:rest.index("--")]
    opts = {o for p in cmd.params for o in [*getattr(p, "opts", []), *getattr(p, "secondary_opts", [])]}
    return [f"`{' '.join(path)}` has no option {tok}" for tok in rest
            if tok.startswith("-") and tok != "-" and tok.split("=", 1)[0] not in opts]


def check_parser(parser: argparse.ArgumentParser, argv: list[str], what: str) -> list[str]:
    """argv parses with this parser: no unknown flag, no bad choice or value, the positionals it needs, and
    every flag spelled in full (argparse would take a prefix, a reader would copy it)."""
    err = io.StringIO()
    try:
        with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
            _, unknown = parser.parse_known_args(argv)
    except SystemExit as e:
        return [] if e.code == 0 else [f"`{what}` does not parse: {err.getvalue().strip().splitlines()[-1:]}"]
    if unknown:
        return [f"`{what}`: unknown argument(s) {unknown}"]
    flags = option_strings(parser, argv)
    return [f"`{what}`: {tok} is not a flag (a prefix of one?)" for tok in argv
            if re.fullmatch(r"--[\w-]+(=.*)?", tok) and tok.split("=", 1)[0] not in flags]


def option_strings(parser: argparse.ArgumentParser, argv: list[str]) -> set[str]:
    """The flags of this parser, and of the subcommand argv names."""
    flags = set()
    for action in parser._actions:
        flags |= set(action.option_strings)
        if isinstance(action, argparse._SubParsersAction):
            sub = next((a for a in argv if a in action.choices), None)
            if sub:
                flags |= option_strings(action.choices[sub], argv[argv.index(sub) + 1:])
    return flags


def script_parser(path: Path) -> argparse.ArgumentParser | None:
    """The script's argparse parser rebuilt from its `add_argument` calls (names, action, nargs, choices),
    without importing the script; None when it defines none."""
    parser, found = argparse.ArgumentParser(prog=path.name, add_help=True), False
    tree = ast.parse(path.read_text())
    constants = {}  # the script's module-level literals (RUNS = (...)), which `choices=[*RUNS, ...]` may name
    for node in tree.body:
        if isinstance(node, ast.Assign) and len(node.targets) == 1 and isinstance(node.targets[0], ast.Name):
            with contextlib.suppress(ValueError, SyntaxError, TypeError):
                constants[node.targets[0].id] = ast.literal_eval(node.value)
    for node in ast.walk(tree):
        if not (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr == "add_argument"):
            continue
        names = [a.value for a in node.args if isinstance(a, ast.Constant) and isinstance(a.value, str)]
        kwargs = {}
        for kw in node.keywords:
            if kw.arg in {"action", "nargs", "choices"}:
                with contextlib.suppress(ValueError, NameError, TypeError):
                    kwargs[kw.arg] = eval(compile(ast.Expression(kw.value), str(path), "eval"),  # noqa: S307
                                          {"__builtins__": {}}, dict(constants))
        if names:
            parser.add_argument(*names, **kwargs)
            found = True
    return parser if found else None


def check_python(argv: list[str], cwd: Path) -> list[str]:
    if argv[1:3] == ["-m", "pytest"]:
        missing = [a for a in argv[3:] if not a.startswith("-") and a.startswith("tests")
                   and not (cwd / a.split("::")[0]).exists()]
        return [f"`{' '.join(argv)}`: no {m}" for m in missing]
    if argv[1:3] in (["-m", "venv"], ["-m", "pip"]):
        return []
    if len(argv) < 2 or not argv[1].endswith(".py"):
        return [f"`{' '.join(argv)}`: only `python SCRIPT.py ...` and `python -m pytest|venv` are checked here"]
    script = cwd / argv[1]
    if not script.is_file():
        return [f"`{' '.join(argv)}`: {argv[1]} does not exist"]
    args = argv[2:]
    if script == ROOT / "jobs" / "transcribe.py":  # the job entrypoint takes `ray-whisper transcribe`'s flags
        return check_parser(cli.build_parser(), ["transcribe", *args], " ".join(argv))
    parser = script_parser(script)
    problems = check_parser(parser, args, " ".join(argv)) if parser else []
    if "--pipeline-args" in args:  # benchmarks/throughput.py hands these to `ray-whisper transcribe`
        extra = shlex.split(args[args.index("--pipeline-args") + 1])
        problems += check_parser(cli.build_parser(), ["transcribe", "m.csv", "out", *extra], " ".join(argv))
    return problems


def check_pip(argv: list[str], cwd: Path) -> list[str]:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    pins = {}
    for line in (ROOT / "constraints.txt").read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if "==" in line:
            name, version = line.split("==")
            pins[name.lower().replace("_", "-")] = version
    problems, args = [], argv[2:] if argv[1:2] == ["install"] else []
    for i, arg in enumerate(args):
        if arg in {"-c", "-r"} and not (cwd / args[i + 1]).is_file():
            problems.append(f"`{' '.join(argv)}`: no {args[i + 1]}")
        if arg == "-e" and (m := re.fullmatch(r"\.(?:\[([\w,-]+)\])?", args[i + 1])):
            for extra in filter(None, (m.group(1) or "").split(",")):
                if extra not in project["optional-dependencies"]:
                    problems.append(f"`{' '.join(argv)}`: pyproject.toml has no extra [{extra}]")
        if m := re.fullmatch(r"([A-Za-z0-9_.-]+)(?:\[[\w,]+\])?==([\w.]+)", arg):
            name = m.group(1).lower().replace("_", "-")
            if name in pins and pins[name] != m.group(2):
                problems.append(f"`{' '.join(argv)}`: {arg} but constraints.txt pins {name}=={pins[name]}")
    return problems


def check_paths(argv: list[str], cwd: Path) -> list[str]:
    """A relative path with a file's extension names a file of the repo: it must exist."""
    problems = []
    for word in argv:
        if "://" in word or word.startswith(("-", "/", "~")):
            continue
        if (m := REPO_FILE.search(word)) and not (cwd / m.group(1)).exists():
            problems.append(f"`{' '.join(argv)}`: {m.group(1)} does not exist")
    return problems


def key_arguments(argv: list[str]) -> list[str]:
    """What the test that runs a command must hold: its long flags, its scripts and notebooks, the option names
    of a `serve run`."""
    keys = []
    for i, word in enumerate(argv):
        if re.fullmatch(r"--[\w-]+(=.*)?", word):
            keys.append(word.split("=", 1)[0])
        elif word.endswith((".py", ".ipynb")):
            keys.append(word)
        elif argv[:2] == ["serve", "run"] and i > 2 and re.fullmatch(r"[\w-]+=.*", word):
            keys.append(word.split("=", 1)[0])
    return keys


def holds(text: str, key: str) -> bool:
    return key in text or key.replace("_", "-") in text or key.replace("-", "_") in text


def check_block(block: Block, earlier: list[Block]) -> list[str]:
    marker = re.fullmatch(r"<!--\s*(needs|runs-in):\s*(\S+)\s*-->", block.marker)
    if block.marker and not marker:
        return [f"{block.where()}: unknown marker {block.marker!r}"]
    kind, value = marker.groups() if marker else ("", "")
    if kind == "needs" and value not in {"cloud", "cluster", "endpoint", "gpu"}:
        return [f"{block.where()}: needs {value!r}? (cloud, cluster, endpoint or gpu)"]
    test_text = ""
    if kind == "runs-in":
        test = ROOT / value
        if not (value.startswith("tests/test_") and test.is_file()):
            return [f"{block.where()}: runs-in names {value}, which is not a test file of this repo"]
        test_text = test.read_text()

    problems, cwd = [], ROOT
    for line in command_lines(block):
        for argv in commands(line):
            if "--" in argv and argv[0] == "ray":  # `ray job submit ... -- ENTRYPOINT`: both halves
                cut = argv.index("--")
                parts = [argv[:cut + 1], argv[cut + 1:]]
            else:
                parts = [argv]
            for words in filter(None, parts):
                prog = words[0]
                where = f"{block.where()}: "
                problems += [where + p for p in check_paths(words, cwd)]
                if prog == "ray-whisper":
                    problems += [where + p for p in check_parser(cli.build_parser(), words[1:], " ".join(words))]
                elif prog in {"python", "python3"}:
                    problems += [where + p for p in check_python(words, cwd)]
                elif prog == "pip":
                    problems += [where + p for p in check_pip(words, cwd)]
                elif prog in {"ray", "serve"}:
                    problems += [where + p for p in check_click([w for w in words if w != "--"])]
                    if words[:2] == ["serve", "run"]:
                        problems += [where + p for p in check_serve_run(words)]
                elif prog == "cd":
                    cwd = cwd / words[1]
                    if not cwd.is_dir():
                        problems.append(f"{where}`cd {words[1]}`: no such folder in the repo")
                if not kind and prog not in CHEAP:
                    problems.append(f"{where}`{prog}` cannot be checked here: mark the block (<!-- needs: cloud -->, "
                                    "<!-- needs: cluster -->, <!-- needs: endpoint --> or <!-- runs-in: tests/... -->)")
                if kind == "runs-in" and tuple(words[:2]) not in SETUP and (prog,) not in SETUP:
                    problems += [f"{where}{value} does not hold {key!r} of `{' '.join(words)}`"
                                 for key in key_arguments(words) if not holds(test_text, key)]
                if kind == "needs" and value == "endpoint":
                    problems += [where + p for p in check_endpoint_call(words, earlier)]
    return problems


def check_serve_run(argv: list[str]) -> list[str]:
    """`serve run ray_whisper.serve:app name=value ...`: the import path binds the app, and every name is an
    option of the endpoint (as `ray-whisper serve --help` lists them)."""
    target = next((w for w in argv[2:] if ":" in w and not w.startswith("-")), "")
    module, _, attr = target.partition(":")
    path = ROOT / Path(*module.split("."))
    source = path / "__init__.py" if path.is_dir() else path.with_suffix(".py")
    if not source.is_file():
        return [f"`{' '.join(argv)}`: no module {module}"]
    tree = ast.parse(source.read_text())
    bound = {a.asname or a.name for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) for a in n.names}
    bound |= {n.name for n in tree.body if isinstance(n, ast.FunctionDef | ast.ClassDef)}
    problems = [] if attr in bound else [f"`{' '.join(argv)}`: {module} does not define {attr}"]
    options = {n for cls in (config.ServeOptions, config.DecodingOptions, config.ChunkOptions) for n in config.field_names(cls)}
    for word in argv[argv.index(target) + 1:]:
        if "=" in word and not word.startswith("-") and word.split("=", 1)[0].replace("-", "_") not in options:
            problems.append(f"`{' '.join(argv)}`: {word.split('=', 1)[0]} is not an option of the endpoint")
    return problems


def check_endpoint_call(argv: list[str], earlier: list[Block]) -> list[str]:
    starts = any(re.search(r"^(\$ )?(ray-whisper serve|serve run)\b", b.body, re.M) for b in earlier)
    problems = [] if starts else [f"`{' '.join(argv)}` needs the endpoint, but no block above starts it"]
    serve = "\n".join(p.read_text() for p in (ROOT / "ray_whisper" / "serve").glob("*.py"))
    for word in argv:
        if m := re.match(r"https?://[^/]+(/[\w/.-]*)", word):
            if m.group(1) not in serve:
                problems.append(f"`{' '.join(argv)}`: the endpoint has no route {m.group(1)}")
    return problems


def problems_of(text: str, doc: str = "README.md") -> list[str]:
    """Everything wrong with a document's command blocks (empty: the front door holds)."""
    found, seen = [], []
    for block in blocks(text, doc):
        if block.lang == "python":
            try:
                compile(block.body, block.where(), "exec")
            except SyntaxError as e:
                found.append(f"{block.where()}: python block does not compile: {e}")
        elif is_command_block(block):
            found += check_block(block, seen)
        seen.append(block)
    return list(dict.fromkeys(found))


# ------------------------------------------------------------------------------------------------ the tests


DOCS = ["README.md", *sorted(str(p.relative_to(ROOT)) for p in (ROOT / "docs").glob("*.md"))]


@pytest.mark.parametrize("doc", DOCS)
def test_every_command_block_checks_here_or_says_what_it_needs(doc):
    """The README's blocks above all; docs/ holds the commands that reproduce each finding, kept to the same
    rule."""
    text = (ROOT / doc).read_text()
    problems = problems_of(text, doc)
    assert not problems, "\n".join(problems)
    if doc == "README.md":
        assert sum(is_command_block(b) for b in blocks(README)) >= 8  # the parser still sees the README's blocks


def test_the_readme_is_a_front_door():
    lines = README.count("\n")
    assert lines <= MAX_LINES, f"README.md has {lines} lines (at most {MAX_LINES}): move details to docs/"
    headings = re.findall(r"^## (.+)$", README, re.M)
    for must in ("Quickstart", "Usage", "Output", "Failure semantics", "Benchmark", "Layout", "Where to go next"):
        assert any(h.startswith(must) for h in headings), f"README.md has no '## {must}' section: {headings}"


def slug(heading: str) -> str:
    """GitHub's anchor for a heading."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


@pytest.mark.parametrize("doc", DOCS)
def test_every_link_between_the_docs_arrives(doc):
    path = ROOT / doc
    for target, anchor in re.findall(r"\]\((?!https?://)([^)#\s]*)(?:#([^)\s]+))?\)", path.read_text()):
        dest = (path.parent / target).resolve() if target else path
        assert dest.exists(), f"{doc} links to {target}, which does not exist"
        if anchor:
            anchors = {slug(h) for h in re.findall(r"^#+ (.+)$", dest.read_text(), re.M)}
            assert anchor in anchors, f"{doc} links to {target}#{anchor}; {dest.name} has no such heading"


@pytest.mark.parametrize("path", DOCS)
def test_docs_speak_of_the_project_not_of_its_history(path):
    text = (ROOT / path).read_text()
    history = [f"{path}:{n}: {line.strip()}" for n, line in enumerate(text.splitlines(), 1) if HISTORY.search(line)]
    assert not history, "development history in the docs; write the finding and its command:\n" + "\n".join(history)
    old = sorted({span for span in re.findall(r"`([^`\n]+)`", text) if OLD_MODULES.search(span)})
    assert not old, f"{path} names modules by their old flat names: {old}"


@pytest.mark.parametrize("doc", DOCS)
def test_the_files_the_docs_name_exist(doc):
    """A path in backticks (`tests/test_x.py`, `benchmarks/results/...json`, `asr/engine.py` inside the package)
    names a file of the repo, so a move or rename that forgets the docs fails here."""
    rooms = ("config/", "io/", "model/", "asr/", "batch/", "serve/")
    missing = []
    for span in re.findall(r"`([^`\s]+)`", (ROOT / doc).read_text()):
        if not re.fullmatch(r"[\w./-]+\.(py|json|yaml|ipynb|csv|txt|toml)", span) or span.startswith("_ray_whisper/"):
            continue  # _ray_whisper/...: what a run keeps in its OUTPUT_DIR, not a file of the repo
        if span.startswith(rooms):
            span = f"ray_whisper/{span}"
        if "/" in span and not (ROOT / span).exists():
            missing.append(span)
    assert not missing, f"{doc} names files that do not exist: {missing}"


def test_the_options_table_names_real_flags():
    flags = option_strings(cli.build_parser(), ["transcribe"])
    table = [line for line in README.splitlines() if re.match(r"^\| `--", line)]
    assert table, "the README's options table is gone"
    for row in table:
        for flag in re.findall(r"--[a-z0-9-]+", row.split("|")[1]):
            assert flag in flags, f"README options table: ray-whisper transcribe has no {flag}"


def test_the_exit_status_table_is_the_clis():
    rows = dict(re.findall(r"^\| (\d+) \| (.+) \|$", README, re.M))
    assert set(rows) == {"0", "1", "2", "130"}, rows
    said = cli.TRANSCRIBE.split("Exit status:", 1)[1]
    for code in rows:
        assert re.search(rf"\b{code} ", said), f"exit status {code} is in the README but not in `ray-whisper transcribe --help`"


@pytest.mark.parametrize("mutation", [
    ("--word-timestamps --batch-size 8", "--word-timestamp --batch-size 8"),  # a misspelled flag
    ("jupyter execute quickstart.ipynb", "jupyter execute quickstrat.ipynb"),  # a file that is not there
    ("<!-- needs: cloud -->\n```bash\npip install -U", "```bash\npip install -U"),  # `ray up` unmarked
    ("<!-- runs-in: tests/test_jobs.py -->", "<!-- runs-in: tests/test_nothing.py -->"),  # no such test
    ("--working-dir . -- \\\n    python jobs/transcribe.py examples/manifest.csv /tmp/out",
     "--working-dir . -- \\\n    python jobs/transcribe.py examples/manifest.csv /tmp/out --beam-size 2"),  # not what the test runs
    ("ray start --head", "ray start --heads"),  # not a flag of Ray's CLI
    ("serve run ray_whisper.serve:app max_batch_size=8", "serve run ray_whisper.serve:app max_batch=8"),
    ("--skip baseline ceiling", "--skip baseline celing"),  # not a choice of the benchmark
    ("pip install torch==2.13.0 -c constraints.txt", "pip install torch==2.12.0 -c constraints.txt"),
    ("print(summary)", "print(summary"),
])
def test_the_check_fails_on_a_broken_readme(mutation):
    """The check above can fail: each of these small breakages of the README is caught."""
    old, new = mutation
    assert old in README, f"the mutation's text is no longer in the README: {old!r}"
    assert problems_of(README.replace(old, new, 1)), f"a README with {new!r} passed the check"
