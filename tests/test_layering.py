"""Layering of featcache/, maskfer/ and cli/, read from the source with `ast` (nothing is imported).

1. The import graph has no cycle. Edges: module-level imports and imports inside functions (both run sooner
   or later), `from X import Y` resolved to the submodule X.Y where Y is one (else to X), relative imports,
   and `__import__("m")` / `importlib.import_module("m")` with a constant name. Imports under
   `if TYPE_CHECKING:` never run and are left out. An edge goes to the module named, not to every package
   above it: Python runs a package's __init__ before its submodules, but that only closes a cycle when the
   __init__ imports a name back, and such an import is an edge of its own.
2. featcache imports neither maskfer nor cli; maskfer does not import cli.
3. featcache and maskfer do not import their own project's modules inside functions: a deferred import hides
   a dependency (and, often, a cycle). Third-party imports inside functions are fine: optional or heavy
   packages (transformers, matplotlib, sklearn, ...) belong there. cli/ is exempt: its commands defer the
   libraries on purpose, so that `--help` loads neither torch nor h5py.
"""
from __future__ import annotations

import ast
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("featcache", "maskfer", "cli")

# Project imports inside functions that stay, (module, function) -> why. An entry that no longer matches an
# import fails the test, so this list cannot go stale.
ALLOWED_IN_FUNCTION = {
    # PEP 562 lazy re-export of open_store/StoreError: `import featcache.errors` (maskfer.config and both CLIs
    # need FerError at start) must not load h5py and numpy (~80 ms), while `from featcache import open_store`
    # keeps working. Guarded by test_cli_start_loads_no_heavy_library below.
    ("featcache", "__getattr__"): "lazy public API of the package",
    # the same for `from maskfer import Predictor`: `import maskfer` (both CLIs, for FerError) stays torch-free
    ("maskfer", "__getattr__"): "lazy public API of the package",
}


@dataclass(frozen=True)
class Import:
    source: str        # importing module
    target: str        # imported project module
    line: int
    function: str | None  # innermost enclosing function, None at module level (class bodies included)

    def __str__(self):
        where = f" in {self.function}()" if self.function else ""
        return f"{self.source} -> {self.target} (line {self.line}{where})"


def project_modules() -> dict[str, tuple[Path, bool]]:
    """Module name -> (file, is_package) for every .py file of the project packages."""
    mods = {}
    for pkg in PACKAGES:
        for f in sorted((ROOT / pkg).rglob("*.py")):
            parts = list(f.relative_to(ROOT).with_suffix("").parts)
            is_pkg = parts[-1] == "__init__"
            mods[".".join(parts[:-1] if is_pkg else parts)] = (f, is_pkg)
    return mods


def _is_type_checking(node: ast.AST) -> bool:
    return isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test)


def _walk(node: ast.AST, function: str | None = None):
    """(import-like node, enclosing function) for every node below ``node``."""
    for child in ast.iter_child_nodes(node):
        if _is_type_checking(child):
            for sub in child.orelse:  # only the else branch runs
                yield from _walk_one(sub, function)
            continue
        yield from _walk_one(child, function)


def _walk_one(node: ast.AST, function: str | None):
    if isinstance(node, (ast.Import, ast.ImportFrom, ast.Call)):
        yield node, function
    if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
        function = f"{function}.{node.name}" if function else node.name
    elif isinstance(node, ast.Lambda):
        function = f"{function}.<lambda>" if function else "<lambda>"
    yield from _walk(node, function)


def _dynamic_name(call: ast.Call) -> str | None:
    """'m' of __import__("m", ...) or importlib.import_module("m")."""
    f = call.func
    named = (isinstance(f, ast.Name) and f.id == "__import__") or (isinstance(f, ast.Attribute)
                                                                  and f.attr == "import_module")
    if named and call.args and isinstance(call.args[0], ast.Constant) and isinstance(call.args[0].value, str):
        return call.args[0].value
    return None


def imports_of(name: str, path: Path, is_pkg: bool, mods) -> list[Import]:
    package = name if is_pkg else name.rpartition(".")[0]
    out = []

    def add(target: str, node, function):
        if target.split(".")[0] not in PACKAGES:
            return
        while target not in mods and "." in target:  # `import featcache.store.X`: the module is featcache.store
            target = target.rpartition(".")[0]
        if target in mods:
            out.append(Import(name, target, node.lineno, function))

    for node, function in _walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            for a in node.names:
                add(a.name, node, function)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".")
                parts = parts[:len(parts) - (node.level - 1)]
                base = ".".join(parts + ([node.module] if node.module else []))
            for a in node.names:
                sub = f"{base}.{a.name}"
                add(sub if sub in mods else base, node, function)
        elif (dyn := _dynamic_name(node)) is not None:
            add(dyn, node, function)
    return list(dict.fromkeys(out))  # `from m import a, b` is one import of m


def all_imports() -> list[Import]:
    mods = project_modules()
    return [imp for name, (path, is_pkg) in mods.items() for imp in imports_of(name, path, is_pkg, mods)]


def find_cycles(imports: list[Import]) -> list[list[Import]]:
    """One concrete cycle per strongly connected component of the graph (Tarjan, then a shortest loop)."""
    graph: dict[str, dict[str, Import]] = {}
    for imp in imports:
        graph.setdefault(imp.source, {}).setdefault(imp.target, imp)
    index, low, stack, on_stack, comps = {}, {}, [], set(), []

    def strong(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in graph.get(v, {}):
            if w not in index:
                strong(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = set()
            while True:
                w = stack.pop()
                on_stack.discard(w)
                comp.add(w)
                if w == v:
                    break
            if len(comp) > 1 or v in graph.get(v, {}):
                comps.append(comp)

    for v in sorted(graph):
        if v not in index:
            strong(v)
    cycles = []
    for comp in comps:
        start = min(comp)
        paths, seen, found = [[start]], {start}, None
        while paths and found is None:  # breadth first: the shortest way back to start
            nxt = []
            for p in paths:
                for w in sorted(graph.get(p[-1], {})):
                    if w == start:
                        found = p + [start]
                        break
                    if w in comp and w not in seen:
                        seen.add(w)
                        nxt.append(p + [w])
                if found:
                    break
            paths = nxt
        cycles.append([graph[a][b] for a, b in zip(found, found[1:])])
    return cycles


def _show(cycle: list[Import]) -> str:
    return "\n    ".join(["cycle:"] + [str(i) for i in cycle])


# ---------------------------------------------------------------- the checks
def test_the_graph_is_read():
    """The reader sees what the checks rely on; else an empty graph would pass every test."""
    imps = {(i.source, i.target, i.function) for i in all_imports()}
    assert ("featcache.encoders.registry", "featcache.encoders.plugin", None) in imps  # from pkg import submodule
    assert ("cli.featcache_cli", "featcache.errors", "_errors") in imps                # inside a function
    assert ("featcache", "featcache.store", "__getattr__") in imps
    assert ("maskfer.data", "maskfer.config", None) in imps
    assert len(imps) > 100


def test_cycle_finder_finds_a_cycle():
    a = Import("a", "b", 1, None)
    b = Import("b", "c", 2, "f")
    c = Import("c", "a", 3, None)
    assert find_cycles([a, b, c, Import("c", "d", 4, None)]) == [[a, b, c]]
    assert find_cycles([a, Import("b", "b", 5, None)]) == [[Import("b", "b", 5, None)]]
    assert find_cycles([a, b]) == []


def test_no_import_cycles():
    cycles = find_cycles(all_imports())
    assert not cycles, "import cycles (module-level and in-function imports):\n  " + "\n  ".join(map(_show, cycles))


@pytest.mark.parametrize("package, forbidden", [("featcache", ("maskfer", "cli")), ("maskfer", ("cli",))])
def test_lower_layers_do_not_import_higher_ones(package, forbidden):
    bad = [str(i) for i in all_imports()
           if i.source.split(".")[0] == package and i.target.split(".")[0] in forbidden]
    assert not bad, f"{package} must not import {' or '.join(forbidden)}:\n  " + "\n  ".join(bad)


def _in_function(package: str) -> list[Import]:
    return [i for i in all_imports() if i.function is not None and i.source.split(".")[0] == package
            and (i.source, i.function.split(".")[0]) not in ALLOWED_IN_FUNCTION]


@pytest.mark.parametrize("package", ["featcache", "maskfer"])  # cli defers them: `--help` must not load torch
def test_no_project_import_inside_functions(package):
    bad = _in_function(package)
    assert not bad, ("import these at module level (or, where that would make a cycle, move the shared piece "
                     "into a module both can import):\n  " + "\n  ".join(map(str, bad)))


def test_allowed_in_function_list_is_current():
    used = {(i.source, i.function.split(".")[0]) for i in all_imports() if i.function is not None}
    stale = sorted(set(ALLOWED_IN_FUNCTION) - used)
    assert not stale, f"ALLOWED_IN_FUNCTION entries that match no import any more; remove them: {stale}"


def test_cli_start_loads_no_heavy_library():
    """`featcache --help` / `maskfer --help` import FerError (featcache/__init__) but no torch, h5py or numpy."""
    code = ("import sys, cli.featcache_cli as f, cli.maskfer_cli as m; f._errors(); m._errors(); "
            "print(sorted({'torch', 'h5py', 'numpy', 'transformers'} & set(sys.modules)))")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]", out.stdout + out.stderr
