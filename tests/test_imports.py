"""The package's shape: no import cycle, the training and deployment wings never import each
other, the core never imports a wing, a job above both wings (`JOBS`: it may import either)
is imported by neither wing nor the core, and nothing imports the CLI. Function-level imports count
too, so a cycle cannot hide inside a function."""

import ast
import os

import pytest

ROOT = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "convmixer_tf")
CORE = {"model", "presets", "imagenet", "errors", "fast_layers", "checkpoints", "artifacts",
        "knobs", "preprocessing", "compat", "timing"}
JOBS = {"evaluate"}  # convmixer_tf/evaluate.py: deploy artifacts on training data sources


def module_names():
    names = {}
    for folder, _, files in os.walk(ROOT):
        for file in files:
            if file.endswith(".py"):
                rel = os.path.relpath(os.path.join(folder, file), ROOT)[:-3].replace(os.sep, ".")
                name = "convmixer_tf" + ("" if rel == "__init__" else "." + rel)
                names[name.removesuffix(".__init__")] = os.path.join(folder, file)
    return names


def imports_of(path, known):
    """The convmixer_tf modules a file imports (at any depth, `from X import Y` resolved to the
    module X.Y when Y is one)."""
    found = set()
    for node in ast.walk(ast.parse(open(path, encoding="utf-8").read())):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names if a.name.startswith("convmixer_tf")}
        elif isinstance(node, ast.ImportFrom) and (node.module or "").startswith("convmixer_tf"):
            for alias in node.names:
                sub = f"{node.module}.{alias.name}"
                found.add(sub if sub in known else node.module)
    return found - {"convmixer_tf"}


@pytest.fixture(scope="module")
def graph():
    known = module_names()
    return {name: imports_of(path, known) for name, path in known.items()}


def wing(name):
    parts = name.split(".")
    return parts[1] if len(parts) > 1 else ""


def test_no_import_cycle(graph):
    state = {}

    def visit(node, stack):
        state[node] = "open"
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == "open":
                cycle = stack[stack.index(nxt):] + [nxt]
                pytest.fail("import cycle: " + " -> ".join(cycle))
            if nxt not in state:
                visit(nxt, stack + [nxt])
        state[node] = "done"

    for node in sorted(graph):
        if node not in state:
            visit(node, [node])


def test_wings_and_core_import_only_downward(graph):
    problems = []
    for name, targets in graph.items():
        for target in targets:
            if wing(target) == "cli" and name != "convmixer_tf.cli":
                problems.append(f"{name} imports the CLI")
            if wing(name) == "training" and wing(target) == "deploy":
                problems.append(f"{name} (training) imports {target} (deploy)")
            if wing(name) == "deploy" and wing(target) == "training":
                problems.append(f"{name} (deploy) imports {target} (training)")
            if wing(name) in CORE and wing(target) in ("training", "deploy", "cli"):
                problems.append(f"{name} (core) imports {target}")
            if wing(target) in JOBS and wing(name) in CORE | {"training", "deploy"}:
                problems.append(f"{name} imports the job module {target}")
    assert not problems, problems
    assert graph["convmixer_tf.cli"], "the graph is empty: the parser found no imports"


def test_the_reference_model_is_not_shipped():
    assert not os.path.exists(os.path.join(ROOT, "reference_torch.py"))
    for path in module_names().values():
        tree = ast.parse(open(path, encoding="utf-8").read())
        top = [n for n in tree.body if isinstance(n, (ast.Import, ast.ImportFrom))]
        assert not any("torch" in ast.unparse(n).split() for n in top), path
