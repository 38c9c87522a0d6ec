"""The package layout, enforced from the source: import direction, no circle, packaging, where SQL
lives.

Imports run downwards only, type-only imports included (an ``if TYPE_CHECKING:`` import is an
arrow of the design even if it never runs):

    top (cli, service, report, demo, __main__)
      -> evaluation, distributed -> pipeline -> attribution -> lab -> models -> media
      store, media -> foundation (errors, config, hashing, the package ``__init__``)

and no two modules import each other, directly or round a circle. Every module is parsed with
``ast``; imports in function bodies count (they run too). Nothing here imports the package, so a
broken module still gets a clear layout verdict.
"""

from __future__ import annotations

import ast
from dataclasses import dataclass
from functools import cache
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "resynth_index"
MIGRATIONS = ROOT / "migrations"  # ships as resynth_index.migrations (pyproject package-dir)
SCRIPTS = ROOT / "scripts"

FOUNDATION = "foundation"
TOP = "top"
# The layer of each first name under resynth_index (a module or a subpackage).
LAYER_OF = {
    "": FOUNDATION,  # resynth_index/__init__.py
    "errors": FOUNDATION,
    "config": FOUNDATION,
    "hashing": FOUNDATION,
    "store": "store",
    "migrations": "store",
    "media": "media",
    "models": "models",
    "lab": "lab",
    "attribution": "attribution",
    "pipeline": "pipeline",
    "evaluation": "evaluation",
    "distributed": "distributed",
    "cli": TOP,
    "report": TOP,
    "demo": TOP,
    "__main__": TOP,
    "service": TOP,
}
_BELOW_LAB = {FOUNDATION, "store", "media", "models"}
# What each layer below the top may import (the foundation: FOUNDATION_MAY_IMPORT only).
MAY_IMPORT = {
    "store": {FOUNDATION, "store"},
    "media": {FOUNDATION, "media"},
    "models": {FOUNDATION, "models", "media"},  # a captioner reads images
    "lab": {*_BELOW_LAB, "lab"},  # the facade: the store, the models, the settings
    "attribution": {*_BELOW_LAB, "lab", "attribution"},
    "pipeline": {*_BELOW_LAB, "lab", "attribution", "pipeline"},
    "evaluation": {*_BELOW_LAB, "lab", "attribution", "pipeline", "evaluation"},
    "distributed": {*_BELOW_LAB, "lab", "attribution", "pipeline", "distributed"},
}
FOUNDATION_MAY_IMPORT = {"resynth_index.errors"}


# --------------------------------------------------------------------------- parsing helpers
@dataclass(frozen=True)
class Import:
    source: str  # the importing module, dotted
    target: str  # the imported resynth_index module, dotted
    line: int

    def __str__(self) -> str:
        return f"{self.source}:{self.line} imports {self.target}"


def _module_name(path: Path) -> str:
    if path.is_relative_to(MIGRATIONS):
        parts = ("resynth_index", "migrations", *path.relative_to(MIGRATIONS).with_suffix("").parts)
    else:
        parts = ("resynth_index", *path.relative_to(PACKAGE).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def _source_files() -> list[Path]:
    return sorted([*PACKAGE.rglob("*.py"), *MIGRATIONS.rglob("*.py")])


@cache
def _tree(path: Path) -> ast.Module:
    return ast.parse(path.read_text(encoding="utf-8"), filename=str(path))


def _module_exists(dotted: str) -> bool:
    parts = dotted.split(".")[1:]
    if parts[:1] == ["migrations"]:
        base = MIGRATIONS.joinpath(*parts[1:])
    else:
        base = PACKAGE.joinpath(*parts)
    return base.with_suffix(".py").is_file() or (base / "__init__.py").is_file()


def _imports(tree: ast.AST, source: str, is_package: bool = False) -> list[Import]:
    """The resynth_index modules ``source`` imports, at run time or for type checking alike
    (relative imports resolved), in source order."""
    found: list[Import] = []
    for node in sorted(ast.walk(tree), key=lambda n: (getattr(n, "lineno", 0), 0)):
        targets: list[str] = []
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:  # relative: resolve against the importing module's package
                package = source.split(".") if is_package else source.split(".")[:-1]
                package = package[: len(package) - (node.level - 1)]
                base = ".".join([*package, *([node.module] if node.module else [])])
            else:
                base = node.module or ""
            for alias in node.names:
                candidate = f"{base}.{alias.name}"
                targets.append(candidate if _module_exists(candidate) else base)
        elif (
            isinstance(node, ast.Call)
            and isinstance(node.func, ast.Attribute | ast.Name)
            and getattr(node.func, "attr", getattr(node.func, "id", None)) == "import_module"
            and node.args
            and isinstance(node.args[0], ast.Constant)
            and isinstance(node.args[0].value, str)
        ):
            targets = [node.args[0].value]
        for target in targets:
            if target == "resynth_index" or target.startswith("resynth_index."):
                found.append(Import(source, target, node.lineno))
    return found


def _listing(rule: str, offences) -> str:
    return "\n  ".join([f"{rule}; {len(offences)} offence(s):", *map(str, offences)])


def _layer(dotted: str) -> str | None:
    parts = dotted.split(".")
    return LAYER_OF.get(parts[1] if len(parts) > 1 else "")


@cache
def _all_imports() -> tuple[Import, ...]:
    return tuple(
        found
        for path in _source_files()
        for found in _imports(_tree(path), _module_name(path), path.name == "__init__.py")
    )


# --------------------------------------------------------------------------- the scanner itself
def test_the_import_scanner_sees_every_kind_of_import():
    """Guard against a vacuous pass: module-level, function-level, type-only, relative and
    ``import_module`` imports are found and resolved."""
    sample = ast.parse(
        "from typing import TYPE_CHECKING\n"
        "import resynth_index.store.models as m\n"
        "if TYPE_CHECKING:\n"
        "    from resynth_index.lab import Lab\n"
        "else:\n"
        "    from resynth_index import errors, __version__\n"
        "def f():\n"
        "    from ..media import images\n"
        "    from . import query\n"
        "    importlib.import_module('resynth_index.demo')\n"
    )
    found = _imports(sample, "resynth_index.pipeline.ingest")
    assert [(i.target, i.line) for i in found] == [
        ("resynth_index.store.models", 2),
        ("resynth_index.lab", 4),
        ("resynth_index.errors", 6),
        ("resynth_index", 6),
        ("resynth_index.media.images", 8),
        ("resynth_index.pipeline.query", 9),
        ("resynth_index.demo", 10),
    ]
    assert _layer("resynth_index") == FOUNDATION and _layer("resynth_index.demo") == TOP
    everything = _all_imports()
    assert len(everything) > 50
    assert any(_layer(i.source) == TOP and i.target == "resynth_index.lab" for i in everything)


def test_every_module_belongs_to_a_layer():
    unknown = sorted({_module_name(p) for p in _source_files() if _layer(_module_name(p)) is None})
    assert not unknown, _listing("add to LAYER_OF here and to docs/architecture.md", unknown)


# --------------------------------------------------------------------------- import direction
def test_foundation_modules_import_only_errors():
    wrong = [
        str(i)
        for i in _all_imports()
        if _layer(i.source) == FOUNDATION
        and i.target not in FOUNDATION_MAY_IMPORT
        and i.target != i.source
    ]
    assert not wrong, _listing(
        "errors, config, hashing, __init__ import no rsx module but errors", wrong
    )


@pytest.mark.parametrize("layer", sorted(MAY_IMPORT))
def test_imports_run_downwards_only(layer):
    allowed = MAY_IMPORT[layer]
    wrong = [
        f"{i} ({_layer(i.target)})"
        for i in _all_imports()
        if _layer(i.source) == layer and _layer(i.target) not in allowed
    ]
    assert not wrong, _listing(f"{layer} may import only {sorted(allowed)}", wrong)


def _module_graph() -> dict[str, set[str]]:
    """Each module -> the modules it imports (a package's import of ``resynth_index.x`` counts
    as importing ``x``'s ``__init__``)."""
    modules = {_module_name(p) for p in _source_files()}
    graph: dict[str, set[str]] = {m: set() for m in modules}
    for found in _all_imports():
        if found.target in modules and found.target != found.source:
            graph[found.source].add(found.target)
    return graph


def _circles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected groups of more than one module (Tarjan), each sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    groups: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for nxt in sorted(graph.get(node, ())):
            if nxt not in index:
                visit(nxt)
                low[node] = min(low[node], low[nxt])
            elif nxt in on_stack:
                low[node] = min(low[node], index[nxt])
        if low[node] == index[node]:
            group = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                group.append(member)
                if member == node:
                    break
            if len(group) > 1:
                groups.append(sorted(group))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return groups


def test_the_circle_finder_finds_circles():
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}, "e": set()}
    assert _circles(graph) == [["a", "b", "c"]]


def test_no_import_circle():
    circles = _circles(_module_graph())
    assert not circles, _listing("modules that import each other (round a circle)", circles)


# --------------------------------------------------------------------------- packaging
def _pyproject_packages() -> set[str]:
    try:
        import tomllib
    except ModuleNotFoundError:  # Python 3.10
        tomllib = pytest.importorskip("tomli")
    data = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))
    return set(data["tool"]["setuptools"]["packages"])


def test_every_package_folder_is_listed_in_pyproject():
    folders = {_module_name(init) for init in PACKAGE.rglob("__init__.py")}
    folders |= {_module_name(init) for init in MIGRATIONS.rglob("__init__.py")}
    assert {"resynth_index", "resynth_index.store"} <= folders
    # a folder of modules without __init__.py would be a namespace package: left out of the wheel
    bare = sorted(
        str(folder.relative_to(ROOT))
        for folder in {path.parent for path in PACKAGE.rglob("*.py")}
        if not (folder / "__init__.py").is_file()
    )
    assert not bare, _listing("give these folders an __init__.py", bare)
    missing = sorted(folders - _pyproject_packages())
    assert not missing, _listing("add to [tool.setuptools] packages in pyproject.toml", missing)


# --------------------------------------------------------------------------- SQL lives in store/
SQL_BUILDERS = {"select", "insert", "update", "delete", "text"}


def _sql_calls(tree: ast.AST) -> list[tuple[int, str]]:
    """Calls that build or run SQL: bare ``select(``/``insert(`` and sqlalchemy's SQL builders
    under any local name, sqlalchemy ``text(``, any ``.execute(``, and ``<engine>.connect(``.
    ``items.insert(0, x)`` on a list is not SQL and is not reported."""
    from_sqlalchemy: dict[str, str] = {}  # local name -> sqlalchemy name
    sqlalchemy_modules: set[str] = set()  # local names bound to sqlalchemy (sub)modules
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and (node.module or "").split(".")[0] == "sqlalchemy":
            for alias in node.names:
                from_sqlalchemy[alias.asname or alias.name] = alias.name
        elif isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.split(".")[0] == "sqlalchemy":
                    sqlalchemy_modules.add(alias.asname or alias.name.split(".")[0])
    found = []
    for node in ast.walk(tree):
        if not isinstance(node, ast.Call):
            continue
        func = node.func
        what = None
        if isinstance(func, ast.Name):
            if func.id in {"select", "insert"} or from_sqlalchemy.get(func.id) in SQL_BUILDERS:
                what = f"{func.id}("
        elif isinstance(func, ast.Attribute):
            owner = ast.unparse(func.value)
            if func.attr in {"execute", "exec_driver_sql"}:
                what = f"{owner}.{func.attr}("
            elif func.attr == "connect" and "engine" in owner.lower():
                what = f"{owner}.connect("
            elif func.attr in SQL_BUILDERS and owner.split(".")[0] in sqlalchemy_modules:
                what = f"{owner}.{func.attr}("
        if what:
            found.append((node.lineno, what))
    return sorted(found)


def test_sql_scanner_recognises_each_form():
    sample = ast.parse(
        "import sqlalchemy as sa\n"
        "from sqlalchemy import text as sql_text\n"
        "from sqlalchemy.dialects.sqlite import insert\n"
        "items = []\n"
        "items.insert(0, 1)\n"  # a list, not SQL
        "select(1)\n"
        "insert(2)\n"
        "sql_text('x')\n"
        "sa.select(3)\n"
        "session.execute(q)\n"
        "lab.engine.connect()\n"
        "socket.connect(addr)\n"  # not an engine
    )
    assert [what for _, what in _sql_calls(sample)] == [
        "select(",
        "insert(",
        "sql_text(",
        "sa.select(",
        "session.execute(",
        "lab.engine.connect(",
    ]


def test_sql_only_in_store():
    outside = [path for path in PACKAGE.rglob("*.py") if not path.is_relative_to(PACKAGE / "store")]
    found = [
        f"{path.relative_to(ROOT)}:{line} {what}"
        for path in sorted(outside)
        for line, what in _sql_calls(_tree(path))
    ]
    assert not found, _listing("SQL belongs in resynth_index/store/ (the repository)", found)


# --------------------------------------------------------------------------- no monkey-patching
_DICT_METHODS = {"update", "setdefault", "pop", "popitem", "clear", "__setitem__"}


def _dict_writes(tree: ast.AST) -> list[tuple[int, str]]:
    """``lab.__dict__`` in any form, and any write through ``X.__dict__``: ``X.__dict__[k] = v``,
    ``del X.__dict__[k]``, ``X.__dict__.update(...)`` and the like. Reading one is allowed."""
    found: dict[int, str] = {}  # line -> what (one entry a line; a write wins)
    for node in ast.walk(tree):
        if isinstance(node, ast.Attribute) and node.attr == "__dict__":
            owner = ast.unparse(node.value)
            if owner == "lab" or owner.endswith(".lab"):
                found.setdefault(node.lineno, f"{owner}.__dict__")
        targets: list[ast.expr] = []
        if isinstance(node, ast.Assign):
            targets = node.targets
        elif isinstance(node, ast.AugAssign | ast.AnnAssign):
            targets = [node.target]
        elif isinstance(node, ast.Delete):
            targets = node.targets
        for target in targets:
            if (
                isinstance(target, ast.Subscript)
                and isinstance(target.value, ast.Attribute)
                and target.value.attr == "__dict__"
            ):
                found[node.lineno] = f"{ast.unparse(target.value)}[...] written"
        if (
            isinstance(node, ast.Call)
            and isinstance(node.func, ast.Attribute)
            and node.func.attr in _DICT_METHODS
            and isinstance(node.func.value, ast.Attribute)
            and node.func.value.attr == "__dict__"
        ):
            found[node.lineno] = f"{ast.unparse(node.func)}("
    return sorted(found.items())


def test_dict_write_scanner_recognises_each_form():
    sample = ast.parse(
        "lab.__dict__['embedder'] = model\n"
        "self.lab.__dict__.get('x')\n"
        "thing.__dict__['y'] = 1\n"
        "del thing.__dict__['y']\n"
        "thing.__dict__.update(z=2)\n"
        "print(thing.__dict__['w'], vars(thing))\n"  # reading is fine
    )
    assert _dict_writes(sample) == [
        (1, "lab.__dict__[...] written"),
        (2, "self.lab.__dict__"),
        (3, "thing.__dict__[...] written"),
        (4, "thing.__dict__[...] written"),
        (5, "thing.__dict__.update("),
    ]


def test_no_dict_writes_outside_the_lab():
    files = [p for p in PACKAGE.rglob("*.py") if p != PACKAGE / "lab.py"]
    files += list(SCRIPTS.rglob("*.py"))
    found = [
        f"{path.relative_to(ROOT)}:{line} {what}"
        for path in sorted(files)
        for line, what in _dict_writes(_tree(path))
    ]
    assert not found, _listing("set a Lab's parts through lab.py's API, not __dict__", found)
