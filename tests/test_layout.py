"""The package's layout: dependencies point one way, with no cycles, and each rule has one home.

The import graph counts every `import`, at module level and inside functions: an import hidden in a
function to dodge a cycle is still a cycle. The layers, bottom to top:

    errors, util, config, distributed    (no llm2vec_mini imports but these)
    ops, model, tokenizer, pooling, lora, mntp, simcse, data, evaluate, precision    the ideas: never a
                                          file format
    convert/                              file formats: know the model, never the layers above
    train, encoder, recipes, probe, hub, demo, cli, kit, ...    what runs the ideas on real files
"""

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "llm2vec_mini"
CORE = {"errors", "util", "config", "distributed", "ops", "model", "tokenizer", "pooling", "lora", "mntp",
        "simcse", "data", "evaluate", "precision"}


def modules() -> dict:
    """{dotted name inside the package ('model', 'convert.hf', ...): source path}."""
    out = {}
    for path in PACKAGE.rglob("*.py"):
        parts = path.relative_to(PACKAGE).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        out[name] = path
    return out


def imports(name: str, path: Path, known: set) -> set:
    """The package modules `name` imports anywhere in its file (relative or absolute imports)."""
    package = name.split(".") if path.name == "__init__.py" else name.split(".")[:-1]
    found = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package[: len(package) - (node.level - 1)]
                stem = ".".join(base + ([node.module] if node.module else []))
            else:
                stem = node.module or ""
            targets = [stem] + [f"{stem}.{a.name}" if stem else a.name for a in node.names]
        else:
            continue
        for target in targets:
            target = target.removeprefix("llm2vec_mini.").removeprefix("llm2vec_mini")
            if target in known and target != name:
                found.add(target)
    return found


def graph() -> dict:
    mods = modules()
    return {name: imports(name, path, set(mods)) for name, path in mods.items()}


def cycles(edges: dict) -> list:
    """Every strongly connected component with more than one module (Tarjan's algorithm)."""
    index, low, stack, on, out, counter = {}, {}, [], set(), [], [0]

    def visit(v):
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in edges[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                out.append(sorted(component))

    for v in sorted(edges):
        if v not in index:
            visit(v)
    return out


def test_the_graph_walker_finds_a_cycle_hidden_in_a_function(tmp_path):
    """The check itself: a cycle through an import inside a function is found."""
    (tmp_path / "a.py").write_text("from . import b\n")
    (tmp_path / "b.py").write_text("def f():\n    from .a import x\n")
    mods = {"a": tmp_path / "a.py", "b": tmp_path / "b.py"}
    edges = {name: imports(name, path, set(mods)) for name, path in mods.items()}
    assert cycles(edges) == [["a", "b"]]


def test_no_import_cycles():
    edges = graph()
    assert len(edges) > 20 and "convert.hf" in edges
    assert cycles({k: v - {""} for k, v in edges.items() if k}) == []


@pytest.mark.parametrize("name", sorted(CORE))
def test_the_ideas_know_no_file_format_and_nothing_above_them(name):
    above = {m for m in graph()[name] if m not in CORE}
    assert not above, f"{name}.py imports {sorted(above)}"


def test_the_trainer_is_generic_and_file_formats_sit_below_the_runners():
    edges = graph()
    assert not {"mntp", "simcse"} & edges["train"]
    for name, targets in edges.items():
        if name.startswith("convert"):
            assert not targets - CORE - {m for m in edges if m.startswith("convert")}, name


def test_the_decoder_file_holds_no_speed_tricks():
    tree = ast.parse((PACKAGE / "model.py").read_text(encoding="utf-8"))
    defined = {node.name for node in tree.body if isinstance(node, (ast.FunctionDef, ast.ClassDef))}
    assert not defined & {"fuse_projections", "project", "stacked_weight"}
    source = (PACKAGE / "model.py").read_text(encoding="utf-8")
    assert "data_ptr" not in source and "as_strided" not in source


@pytest.mark.parametrize("pattern, home", [
    # one JSON file reader (and the safetensors header, in the package and in the kit's known-wrong copy
    # of a student's reader; and the grader's worker events, lines from a pipe)
    ("json.load", {"util.py", "convert/safetensors.py", "kit/wrong/e11_bf16_as_f16.py", "kit/grade.py"}),
    ('getattr(model, "model", model)', {"util.py"}),  # the decoder inside a model
    ("PathLike = ", {"util.py"}),
])
def test_each_rule_has_one_home(pattern, home):
    where = {str(p.relative_to(PACKAGE)) for p in PACKAGE.rglob("*.py")
             if pattern in p.read_text(encoding="utf-8")}
    assert where <= home, f"{pattern!r} appears in {sorted(where - home)}"


def test_mteb_is_optional_and_only_its_own_module_imports_it():
    """mteb is an extra: only llm2vec_mini/mteb.py imports it, only cli.py imports that module (inside
    `eval-mteb`), and importing every other module and building the CLI loads no mteb."""
    import os
    import subprocess
    import sys

    for path in PACKAGE.rglob("*.py"):
        if path == PACKAGE / "mteb.py":
            continue
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            names = ([a.name for a in node.names] if isinstance(node, ast.Import) else
                     [node.module or ""] if isinstance(node, ast.ImportFrom) and node.level == 0 else [])
            assert not [n for n in names if n.split(".")[0] == "mteb"], path
    assert {name for name, targets in graph().items() if "mteb" in targets} == {"cli"}
    code = ("import importlib, pkgutil, sys, llm2vec_mini\n"
            "for m in pkgutil.walk_packages(llm2vec_mini.__path__, 'llm2vec_mini.'):\n"
            "    if m.name not in ('llm2vec_mini.mteb', 'llm2vec_mini.__main__'):\n"
            "        importlib.import_module(m.name)\n"
            "llm2vec_mini.cli.build_parser()\n"
            "print(sorted(m for m in sys.modules if m.split('.')[0] in ('mteb', 'datasets')))\n")
    root = str(PACKAGE.parent)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in (root, os.environ.get("PYTHONPATH")) if p)}
    done = subprocess.run([sys.executable, "-c", code], cwd=root, env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip() == "[]"
