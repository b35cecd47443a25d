"""The package's import graph: one direction of dependencies (docs/architecture.md)."""

from __future__ import annotations

import ast
import pathlib
import tomllib

import pytest

_PACKAGE = pathlib.Path(__file__).resolve().parents[1] / "m2u_jax"


def _module_name(path: pathlib.Path, package: pathlib.Path) -> str:
    parts = path.relative_to(package.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def import_graph(package: pathlib.Path) -> dict[str, set[str]]:
    """{module: the package modules it imports}, at any depth of the file (function-level
    imports count: a cycle dodged by a late import is still a cycle)."""
    modules = {_module_name(path, package): path for path in sorted(package.rglob("*.py"))}
    graph: dict[str, set[str]] = {name: set() for name in modules}
    for name, path in modules.items():
        is_package = path.name == "__init__.py"
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            targets = []
            if isinstance(node, ast.Import):
                targets = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:  # relative import
                    anchor = name.split(".")[: len(name.split(".")) - node.level + is_package]
                    base = ".".join(anchor + ([base] if base else []))
                # `from a import b` imports the module a.b when there is one, else a's name b.
                targets = [
                    f"{base}.{alias.name}" if f"{base}.{alias.name}" in modules else base
                    for alias in node.names
                ]
            for target in targets:
                while target and target not in modules:
                    target = target.rpartition(".")[0]
                if target and target != name and not name.startswith(target + "."):
                    graph[name].add(target)
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str]:
    """One cycle of `graph` as [a, b, ..., a], or [] when it has none (depth-first search)."""
    state: dict[str, int] = {}  # 1 on the current path, 2 finished
    path: list[str] = []

    def visit(node: str) -> list[str]:
        state[node] = 1
        path.append(node)
        for successor in sorted(graph[node]):
            if state.get(successor) == 1:
                return path[path.index(successor) :] + [successor]
            if successor not in state and (cycle := visit(successor)):
                return cycle
        path.pop()
        state[node] = 2
        return []

    for node in sorted(graph):
        if node not in state and (cycle := visit(node)):
            return cycle
    return []


def test_find_cycle_on_hand_made_graphs():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": set()}) == []
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": set(), "b": {"c"}, "c": {"b"}}) == ["b", "c", "b"]


def test_import_graph_reads_absolute_relative_and_late_imports(tmp_path):
    package = tmp_path / "m2u_jax"
    (package / "data").mkdir(parents=True)
    (package / "__init__.py").write_text("")
    (package / "data" / "__init__.py").write_text("")
    (package / "a.py").write_text("from m2u_jax.data import b\n")
    (package / "data" / "b.py").write_text("def f():\n    from . import c\n")
    (package / "data" / "c.py").write_text("import m2u_jax.a\nimport numpy\n")
    graph = import_graph(package)
    assert graph["m2u_jax.a"] == {"m2u_jax.data.b"}
    assert graph["m2u_jax.data.b"] == {"m2u_jax.data.c"}
    assert graph["m2u_jax.data.c"] == {"m2u_jax.a"}
    assert find_cycle(graph) == ["m2u_jax.a", "m2u_jax.data.b", "m2u_jax.data.c", "m2u_jax.a"]


def test_the_package_has_no_import_cycle():
    graph = import_graph(_PACKAGE)
    assert len(graph) > 20 and "m2u_jax.trainer" in graph
    assert find_cycle(graph) == [], "import cycle"


@pytest.mark.parametrize("module", ["m2u_jax.trainer", "m2u_jax.run_checkpoint"])
def test_training_and_restoring_do_not_import_evaluation(module):
    # Evaluators receive predict functions; the entry point (train.py) runs evaluation.
    graph = import_graph(_PACKAGE)
    seen, todo = set(), [module]
    while todo:
        for successor in graph[todo.pop()] - seen:
            seen.add(successor)
            todo.append(successor)
    assert "m2u_jax.evaluate" not in seen


def _imported_top_level_names(path: pathlib.Path) -> set[str]:
    names = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names.update(alias.name.partition(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and not node.level and node.module:
            names.add(node.module.partition(".")[0])
    return names


def test_the_package_imports_neither_configs_nor_tools():
    # configs/ and tools/ are the checkout's files, not shipped: an installed command
    # (m2u-benchmark, ...) must not need them.
    offenders = {
        str(path.relative_to(_PACKAGE.parent)): sorted(names)
        for path in sorted(_PACKAGE.rglob("*.py"))
        if (names := _imported_top_level_names(path) & {"configs", "tools"})
    }
    assert offenders == {}


def test_every_console_script_is_a_cli_module_run_function():
    # m2u-train, m2u-eval, m2u-predict, m2u-export, m2u-data, m2u-benchmark: one per cli/ module.
    scripts = tomllib.loads((_PACKAGE.parent / "pyproject.toml").read_text())["project"]["scripts"]
    modules = {}
    for command, target in scripts.items():
        module, _, function = target.partition(":")
        assert module.startswith("m2u_jax.cli.") and function == "run", (command, target)
        path = _PACKAGE / "cli" / f"{module.rpartition('.')[2]}.py"
        tree = ast.parse(path.read_text(), str(path))
        assert any(isinstance(node, ast.FunctionDef) and node.name == "run" for node in tree.body)
        modules[path.stem] = command
    cli_modules = {path.stem for path in (_PACKAGE / "cli").glob("*.py")} - {"__init__"}
    assert set(modules) == cli_modules and modules["benchmark"] == "m2u-benchmark"
