"""The package's shape, checked on its source with ``ast`` (nothing is imported):

- no import cycle among corral's modules;
- boto3 clients are made, and AWS error codes read, only in :mod:`corral.aws_api`;
- :mod:`corral.aws_api` sits below ``state/``, ``storage/``, ``recipes/`` and ``backends/``;
- a run's AWS facts are read through ``RunFacts``, a stage's route through ``corral.routes.route``.

The import graph has an edge A → B for every ``import B`` / ``from B import x`` (and ``from P import
m`` when ``P.m`` is a module) anywhere in A — at module level, in ``try``/``if`` blocks, in class
bodies *and inside functions* — except under ``if TYPE_CHECKING:``, which never runs. Imports
inside functions count on purpose: Python tolerates a cycle whose back edge is deferred into a
function, but the modules still depend on each other (neither can be understood, tested or
moved alone), and a deferred import is how such cycles hide — the one the issue names (ecr →
provision → … → ecr) had only deferred back edges. Deferred imports stay welcome for what they
are for: keeping ``import corral`` light (boto3, NeuroConv), as long as they point downwards.
Importing ``P.m`` also runs the package ``P``: an edge to ``P`` is added, except from modules
inside ``P`` itself (Python has begun ``P`` before any of them) unless they import names of ``P``.
"""

from __future__ import annotations

import ast
import graphlib
import re
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[2] / "src"
PACKAGE = SRC / "corral"


def _module_name(path: Path) -> str:
    rel = path.relative_to(SRC).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _modules() -> dict[str, Path]:
    return {_module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def _imports(tree: ast.AST) -> list[ast.Import | ast.ImportFrom]:
    """Every import statement of the module, but those under ``if TYPE_CHECKING:``."""
    skipped = {id(n) for node in ast.walk(tree) if isinstance(node, ast.If) and _is_type_checking(node.test)
               for stmt in node.body for n in ast.walk(stmt)}
    return [n for n in ast.walk(tree) if isinstance(n, (ast.Import, ast.ImportFrom)) and id(n) not in skipped]


def _resolve(module: str, path: Path, node: ast.ImportFrom) -> str:
    if not node.level:
        return node.module or ""
    package = module.split(".") if path.name == "__init__.py" else module.split(".")[:-1]
    base = package[: len(package) - (node.level - 1)]
    return ".".join(base + ([node.module] if node.module else []))


def import_graph() -> dict[str, set[str]]:
    """module → the corral modules it imports at import time (a module imports its packages too)."""
    modules = _modules()
    graph: dict[str, set[str]] = {m: set() for m in modules}
    for name, path in modules.items():
        tree = ast.parse(path.read_text(encoding="utf-8"), str(path))
        targets: set[str] = set()
        for node in _imports(tree):
            if isinstance(node, ast.Import):
                targets |= {a.name for a in node.names}
                continue
            base = _resolve(name, path, node)
            targets.add(base)
            submodules = {f"{base}.{a.name}" for a in node.names if f"{base}.{a.name}" in modules}
            targets |= submodules
            if len(submodules) < len(node.names) and base in modules and base != name:
                graph[name].add(base)  # names defined in the package's __init__ itself
        for t in targets:
            # importing a.b.c runs a/__init__ and a/b/__init__ first
            parts = t.split(".")
            for i in range(1, len(parts) + 1):
                dep = ".".join(parts[:i])
                if dep in modules and dep != name and not name.startswith(dep + "."):
                    graph[name].add(dep)
    return graph


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Every strongly connected component with more than one module (Tarjan), as a sorted list."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on: set[str] = set()
    out: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in sorted(graph[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


def _one_cycle(graph: dict[str, set[str]], comp: list[str]) -> list[str]:
    """One concrete path a → … → a inside a strongly connected component (for the message)."""
    members = set(comp)
    start = comp[0]
    paths = {start: [start]}
    todo = [start]
    while todo:
        v = todo.pop(0)
        for w in sorted(graph[v] & members):
            if w == start:
                return paths[v] + [start]
            if w not in paths:
                paths[w] = paths[v] + [w]
                todo.append(w)
    return comp  # pragma: no cover


def test_the_graph_sees_real_imports() -> None:
    """The checker itself: edges it must find (and one it must not) in corral's source."""
    g = import_graph()
    assert "corral.errors" in g["corral.aws_api"]
    assert "corral.backends.aws_batch.payloads" in g["corral.backends.aws_batch.submit"]  # `from P import m`
    assert "corral.backends" in g["corral.doctor"]  # importing corral.backends.x runs corral.backends first
    assert "corral.plan" in g["corral.backends.aws_batch.payloads"]  # at module level and inside functions
    assert "corral.backends.aws_batch.teardown" in g["corral.backends.aws_batch.provision"]  # only in a function
    assert "corral.spec" not in g["corral.routes"]  # imported only under TYPE_CHECKING
    assert "corral.backends.aws_batch" not in g["corral.backends.aws_batch.submit"]  # its own package


def test_the_cycle_finder_finds_a_cycle() -> None:
    g = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}
    assert _cycles(g) == [["a", "b", "c"]]
    assert _one_cycle(g, ["a", "b", "c"]) == ["a", "b", "c", "a"]
    graphlib.TopologicalSorter({"x": {"y"}}).static_order()  # (the acyclic case: nothing found)
    assert _cycles({"x": {"y"}, "y": set()}) == []


def test_no_import_cycle_in_corral() -> None:
    g = import_graph()
    found = [" → ".join(_one_cycle(g, comp)) for comp in _cycles(g)]
    assert not found, "import cycles (break them: move the shared piece down to a module both can import):\n" + \
        "\n".join(found)


AWS_LAYER = "corral.aws_api"
ABOVE_AWS_API = ("corral.state", "corral.storage", "corral.recipes", "corral.backends")


def test_aws_api_is_below_state_storage_recipes_and_backends() -> None:
    """aws_api imports none of the packages that use it (at import time or inside functions)."""
    path = PACKAGE / "aws_api.py"
    tree = ast.parse(path.read_text(encoding="utf-8"))
    imported = {a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names} | {
        n.module or "" for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)}
    corral_imports = {m for m in imported if m.startswith("corral")}
    assert corral_imports <= {"corral.errors"}, corral_imports
    for m in ("corral.state.dynamodb", "corral.storage.s3", "corral.storage.secrets", "corral.recipes.bids"):
        text = (SRC / (m.replace(".", "/") + ".py")).read_text(encoding="utf-8")
        assert "corral.aws_api" in text, m
        assert "corral.backends.aws_batch" not in text, f"{m} reaches into the AWS backend for clients or errors"


def _calls(tree: ast.AST) -> list[tuple[int, str]]:
    """(line, what) of each place that makes a boto3 client/session or reads an AWS error code."""
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute):
            f = node.func
            owner = ast.unparse(f.value)
            if f.attr in ("client", "resource") and owner.split(".")[0] in ("boto3", "session", "self.session"):
                out.append((node.lineno, ast.unparse(node)[:60]))
            if f.attr in ("Session", "get_credentials") and owner.startswith("boto3"):
                out.append((node.lineno, ast.unparse(node)[:60]))
            if f.attr == "get" and node.args and isinstance(node.args[0], ast.Constant) and node.args[0].value == "Error":
                out.append((node.lineno, ast.unparse(node)[:60]))
        if isinstance(node, ast.Subscript) and isinstance(node.slice, ast.Constant) and node.slice.value == "Error":
            out.append((node.lineno, ast.unparse(node)[:60]))
    return out


@pytest.mark.parametrize("name", [m for m in _modules() if m != AWS_LAYER])
def test_only_aws_api_makes_clients_and_reads_error_codes(name: str) -> None:
    path = _modules()[name]
    found = _calls(ast.parse(path.read_text(encoding="utf-8")))
    assert not found, f"{path.relative_to(SRC)}: use corral.aws_api (AwsClients, default_client, error_code): {found}"


def test_the_client_finder_sees_what_it_looks_for() -> None:
    tree = ast.parse("import boto3\nc = boto3.client('s3')\ns = boto3.Session()\n"
                     "code = exc.response.get('Error', {}).get('Code')\nx = exc.response['Error']\n")
    assert sorted(line for line, _ in _calls(tree)) == [2, 3, 4, 5]
    assert _calls(ast.parse(PACKAGE.joinpath("aws_api.py").read_text(encoding="utf-8")))  # it is there


def _is_facts_key(node: ast.AST) -> bool:
    return (isinstance(node, ast.Constant) and node.value == "aws_batch") or (
        isinstance(node, ast.Name) and node.id == "OPTIONS_KEY")


def _raw_facts(tree: ast.AST) -> list[int]:
    """Lines that read or write ``<x>.options["aws_batch"]`` (or ``OPTIONS_KEY``) as a raw dict."""
    def is_options(n: ast.AST) -> bool:
        return isinstance(n, ast.Attribute) and n.attr == "options"

    out = []
    for n in ast.walk(tree):
        if isinstance(n, ast.Subscript) and is_options(n.value) and _is_facts_key(n.slice) or (isinstance(n, ast.Call) and isinstance(n.func, ast.Attribute) and is_options(n.func.value)
              and n.args and _is_facts_key(n.args[0])) or isinstance(n, ast.Compare) and _is_facts_key(n.left) and any(is_options(c) for c in n.comparators):
            out.append(n.lineno)
    return out


_ROUTE_PIECES = re.compile(r"\b(?:on_fargate|allowed_for)\(")


@pytest.mark.parametrize("name", [m for m in _modules() if m != "corral.backends.aws_batch.run_facts"])
def test_a_runs_aws_facts_are_read_only_through_run_facts(name: str) -> None:
    found = _raw_facts(ast.parse(_modules()[name].read_text(encoding="utf-8")))
    assert not found, (f"{name}, lines {found}: read and write run.options['aws_batch'] through RunFacts "
                       "(RunFacts.of(run).get('x') / .replace(x=...).save_to(run) for a fact without a field)")


@pytest.mark.parametrize("name", [m for m in _modules() if m not in ("corral.routes", "corral.instances")])
def test_a_stages_route_is_asked_of_routes(name: str) -> None:
    """Platform and instance entries are decided in corral.routes.route, once."""
    text = _modules()[name].read_text(encoding="utf-8")
    found = [m.group(0) for m in _ROUTE_PIECES.finditer(text)]
    assert not found, f"{name} recomputes a stage's route ({found}): use corral.routes.route(resources, allowed)"


def test_the_text_checks_see_what_they_look_for() -> None:
    found = _raw_facts(ast.parse('x = run.options.get(OPTIONS_KEY, {})\ny = run.options["aws_batch"]["round"]\n'
                                 'opts = run.options.setdefault(OPTIONS_KEY, {})\nif OPTIONS_KEY in run.options: pass\n'
                                 '"""run.options["aws_batch"] in a docstring"""\n'))
    assert sorted(found) == [1, 2, 3, 4]
    assert _ROUTE_PIECES.search("if on_fargate(stage.resources, allowed):")
