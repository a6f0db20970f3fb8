"""The command line: modules without an import circle, flags declared once (:mod:`quickdraft.cli_args`),
``--draft-budget`` with one meaning, and ``--weights`` from every command to the loader, the bench JSON and
``quickdraft profile``.

Terms: the *import graph* has an edge from module A to module B of the package when A's source imports B at
run time (at module level or inside a function; imports under ``if TYPE_CHECKING:`` never run and are left
out; importing ``quickdraft.x.y`` also imports the package ``quickdraft.x``). An *import circle* is a cycle in
that graph.
"""

from __future__ import annotations

import argparse
import ast
import json
import subprocess
import sys
from pathlib import Path

import pytest

from quickdraft.bench.cli import add_bench_arguments, bench_main, bench_methods
from quickdraft.cli import build_parser, main
from quickdraft.errors import ModelLoadError
from quickdraft.models.quantized import DEFAULT_WEIGHTS, WEIGHT_MODES

PACKAGE = Path(__file__).resolve().parents[1] / "src" / "quickdraft"
COMMAND_MODULES = ("quickdraft.cli", "quickdraft.bench.cli", "quickdraft.server.cli")
#: Each command with the fewest arguments it parses with.
COMMANDS = {"generate": ["--prompt", "hi"], "demo": [], "bench": [], "profile": [], "serve": []}


# ---------------------------------------------------------------- no import circle


def module_files() -> dict[str, Path]:
    """Every module of the package by dotted name (a package by its ``__init__.py``)."""
    modules = {}
    for path in PACKAGE.rglob("*.py"):
        parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        modules[".".join(parts)] = path
    return modules


def runtime_imports(tree: ast.AST) -> list[ast.Import | ast.ImportFrom]:
    """The import statements of ``tree`` that run: all but those under ``if TYPE_CHECKING:``."""
    found = []

    def visit(node: ast.AST) -> None:
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            for child in node.orelse:
                visit(child)
            return
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            found.append(node)
        for child in ast.iter_child_nodes(node):
            visit(child)

    visit(tree)
    return found


def imported_names(node: ast.Import | ast.ImportFrom, module: str, is_package: bool) -> list[str]:
    """Dotted names that ``node`` (in ``module``) may import: each module and each ``module.name``."""
    if isinstance(node, ast.Import):
        return [alias.name for alias in node.names]
    base = node.module or ""
    if node.level:
        anchor = module.split(".") if is_package else module.split(".")[:-1]
        anchor = anchor[: len(anchor) - (node.level - 1)]
        base = ".".join(anchor + ([node.module] if node.module else []))
    return [base] + [f"{base}.{alias.name}" for alias in node.names]


def import_graph() -> dict[str, set[str]]:
    """The package's import graph (see the module docstring)."""
    files = module_files()
    graph: dict[str, set[str]] = {}
    for module, path in files.items():
        is_package = path.name == "__init__.py"
        targets = set()
        for node in runtime_imports(ast.parse(path.read_text(), str(path))):
            for name in imported_names(node, module, is_package):
                targets.update(_with_packages(name, module, files))
        graph[module] = targets - {module}
    return graph


def _with_packages(name: str, importer: str, files: dict[str, Path]) -> set[str]:
    """``name`` (if a module of the package) and the packages above it that importing it runs, except the
    root package and ``importer``'s own packages (already being imported when ``importer`` runs)."""
    parts = name.split(".")
    own = {".".join(importer.split(".")[:i]) for i in range(1, importer.count(".") + 1)}
    found = {".".join(parts[:i]) for i in range(2, len(parts) + 1)}
    return {m for m in found if m in files and m not in own}


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One cycle of ``graph`` as a path ``[a, b, ..., a]``, or None."""
    state: dict[str, str] = {}
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = "open"
        path.append(node)
        for target in sorted(graph.get(node, ())):
            if state.get(target) == "open":
                return path[path.index(target):] + [target]
            if target not in state and (cycle := visit(target)):
                return cycle
        state[node] = "done"
        path.pop()
        return None

    for start in sorted(graph):
        if start not in state and (cycle := visit(start)):
            return cycle
    return None


def reachable(graph: dict[str, set[str]], start: str) -> set[str]:
    seen, todo = set(), [start]
    while todo:
        for target in graph.get(todo.pop(), ()):
            if target not in seen:
                seen.add(target)
                todo.append(target)
    return seen


@pytest.mark.parametrize("module", COMMAND_MODULES)
def test_each_command_module_imports_first_in_a_fresh_interpreter(module):
    done = subprocess.run([sys.executable, "-c", f"import {module}"], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr


def test_no_module_of_the_package_imports_one_that_imports_it_back():
    graph = import_graph()
    assert {"quickdraft.cli", "quickdraft.cli_args", "quickdraft.engine"} <= graph.keys()
    assert "quickdraft.cli_args" in graph["quickdraft.server.cli"]  # the graph sees function-level imports too
    assert find_cycle(graph) is None, " -> ".join(find_cycle(graph))


def test_the_cycle_finder_sees_a_circle():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set(), "c": {"a", "b"}}) is None
    tree = ast.parse("from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    import x\nelse:\n    import y\n")
    assert [ast.unparse(node) for node in runtime_imports(tree)] == ["from typing import TYPE_CHECKING", "import y"]


def test_cli_args_imports_no_command_module():
    assert not reachable(import_graph(), "quickdraft.cli_args") & set(COMMAND_MODULES)


def test_model_and_drafter_flags_are_declared_only_in_cli_args():
    shared = {"--model", "--dtype", "--device", "--weights", "--draft-budget", "--datastore", "--drafter"}
    for module in COMMAND_MODULES:
        path = module_files()[module]
        declared = {node.args[0].value for node in ast.walk(ast.parse(path.read_text()))
                    if isinstance(node, ast.Call) and getattr(node.func, "attr", None) == "add_argument"
                    and node.args and isinstance(node.args[0], ast.Constant)}
        assert not declared & shared, f"{module} declares {sorted(declared & shared)}"


# ---------------------------------------------------------------- flags


def test_every_model_command_takes_weights_with_the_library_default():
    parser = build_parser()
    for command, minimal in COMMANDS.items():
        # bench and profile resolve an omitted --weights per run (see bench_methods)
        expected = None if command in ("bench", "profile") else DEFAULT_WEIGHTS
        assert parser.parse_args([command, *minimal]).weights == expected
        for mode in WEIGHT_MODES:
            assert parser.parse_args([command, *minimal, "--weights", mode]).weights == mode
        with pytest.raises(SystemExit):
            parser.parse_args([command, *minimal, "--weights", "int3"])


def test_draft_budget_is_a_fixed_budget_in_generate_and_serve():
    parser = build_parser()
    assert parser.parse_args(["generate", "--prompt", "hi", "--draft-budget", "3"]).draft_budget == 3
    served = parser.parse_args(["serve", "--draft-budget", "3"])
    assert served.draft_budget == 3 and served.max_draft is None
    assert parser.parse_args(["serve", "--max-draft", "5"]).max_draft == 5
    assert parser.parse_args(["demo", "--draft-budget", "2"]).draft_budget == 2


def _scheduler(argv: list[str]):
    from quickdraft.server.cli import _start_scheduler

    from conftest import tiny_engine

    return _start_scheduler(tiny_engine(), {}, build_parser().parse_args(["serve", "--drafter", "ngram", *argv]))


def test_serve_draft_budget_fixes_the_budget_and_max_draft_caps_the_adaptive_one(monkeypatch):
    from quickdraft import batching
    from quickdraft.budget import CostCurve
    from quickdraft.draft_budget import FixedBudget, LoadAdaptiveBudget

    fixed = _scheduler(["--draft-budget", "3"])
    try:
        assert isinstance(fixed.policy, FixedBudget) and fixed.policy.max_budget == 3 and fixed.max_draft == 3
    finally:
        fixed.close()
    monkeypatch.setattr(batching, "measure_batch_curve", lambda target, rows: CostCurve.flat())
    capped = _scheduler(["--max-draft", "5"])
    try:
        assert isinstance(capped.policy, LoadAdaptiveBudget) and capped.policy.max_budget == 5
    finally:
        capped.close()


def test_serve_refuses_draft_budget_with_max_draft(capsys):
    assert main(["serve", "--draft-budget", "2", "--max-draft", "4", "--port", "0"]) == 2
    assert "pass one of them" in capsys.readouterr().err
    assert main(["serve", "--max-draft", "65", "--port", "0"]) == 2
    assert "--max-draft must be between 0 and 64" in capsys.readouterr().err


def test_weights_reach_the_loader_from_every_command(tmp_path, monkeypatch, capsys):
    from quickdraft.engine import Engine

    asked = []

    def from_pretrained(*args, **kwargs):
        asked.append(kwargs["weights"])
        raise ModelLoadError("stopped before loading")

    monkeypatch.setattr(Engine, "from_pretrained", from_pretrained)
    dataset = tmp_path / "q.jsonl"
    dataset.write_text('{"question_id": 1, "category": "qa", "turns": ["Hi"]}\n')
    argvs = [["generate", "--prompt", "hi", "--weights", "int8"], ["demo", "--weights", "int4"],
             ["bench", "--weights", "int8", "--dataset", str(dataset)], ["profile", "--weights", "int4"],
             ["serve", "--weights", "auto", "--port", "0"]]
    for argv in argvs:
        assert main(argv) == 2
    assert asked == ["int8", "int4", "int8", "int4", "auto"]
    assert capsys.readouterr().err.count("stopped before loading") == len(argvs)


@pytest.mark.parametrize("weights", ["int8", "int4", "auto"])
def test_bench_refuses_transformers_methods_with_weights_that_free_them(weights, capsys):
    argv = ["--weights", weights, "--methods", "ar,hf,hf-pld,ngram", "--model", "/no/such/model"]
    parser = argparse.ArgumentParser()
    add_bench_arguments(parser)
    assert bench_main(parser.parse_args(argv)) == 2
    err = capsys.readouterr().err
    assert "hf, hf-pld cannot run" in err and "--methods ar,ngram" in err and "--weights dense" in err
    assert "does not exist" not in err and "Traceback" not in err  # refused before the model loads
    assert bench_methods(None, weights) == (["ar", "ngram"], weights)  # the default leaves them out


def test_bench_keeps_the_transformers_methods_with_dense_weights():
    assert bench_methods(None, "dense") == (["ar", "hf", "hf-pld", "ngram"], "dense")
    assert bench_methods("ar,hf-assisted", "dense") == (["ar", "hf-assisted"], "dense")


def test_bench_without_weights_loads_dense_only_for_transformers_methods():
    assert bench_methods(None, None) == (["ar", "hf", "hf-pld", "ngram"], "dense")
    assert bench_methods("ar,hf-pld,suffix", None) == (["ar", "hf-pld", "suffix"], "dense")
    assert bench_methods("ar,suffix,auto", None) == (["ar", "suffix", "auto"], DEFAULT_WEIGHTS)


def test_profile_refuses_the_transformers_forward_with_weights_that_free_it(capsys):
    assert main(["profile", "--weights", "int4", "--backend", "hf", "--model", "/no/such/model"]) == 2
    err = capsys.readouterr().err
    assert "--backend engine" in err and "does not exist" not in err


def test_bench_json_and_profile_report_the_weights_mode_and_resident_memory(tmp_path, monkeypatch, capsys):
    from test_cache import write_tiny_gguf

    monkeypatch.setenv("QUICKDRAFT_CACHE", str(tmp_path / "cache"))
    model = str(write_tiny_gguf(tmp_path / "tiny.gguf"))
    dataset = tmp_path / "q.jsonl"
    dataset.write_text('{"question_id": 1, "category": "qa", "turns": ["ABC ABD"]}\n')
    common = ["--model", model, "--weights", "int8", "--device", "cpu"]
    assert main(["bench", *common, "--dataset", str(dataset), "--max-new-tokens", "4",
                 "--json", str(tmp_path / "out.json")]) == 0
    report = json.loads((tmp_path / "out.json").read_text())
    assert report["weights"] == "int8" and report["resident_bytes"] > 10_000_000
    capsys.readouterr()
    assert main(["profile", *common, "--ks", "1,2", "--repeats", "1", "--context", "8"]) == 0
    out = " ".join(capsys.readouterr().out.split())
    assert "weights int8, resident " in out and " MB" in out
