"""No import cycles among rope_jax modules, counting imports inside functions too (a lazy
import that closes a cycle still ties two floors together, as finetune <-> pretrained did)."""

import ast
import os

import pytest

ROOT = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "rope_jax")


def _modules() -> dict[str, str]:
    modules = {}
    for dirpath, _, files in os.walk(ROOT):
        for name in files:
            if name.endswith(".py"):
                path = os.path.join(dirpath, name)
                relative = os.path.relpath(path, os.path.dirname(ROOT))[:-3]
                module = relative.replace(os.sep, ".").removesuffix(".__init__")
                modules[module] = path
    return modules


def import_graph() -> dict[str, set[str]]:
    """``module -> rope_jax modules it imports`` (module level and inside functions)."""
    modules = _modules()
    edges: dict[str, set[str]] = {m: set() for m in modules}
    for module, path in modules.items():
        with open(path, encoding="utf-8") as f:
            tree = ast.parse(f.read())
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                edges[module].update(a.name for a in node.names if a.name in modules)
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                for alias in node.names:
                    full = f"{node.module}.{alias.name}"
                    if full in modules:
                        edges[module].add(full)
                    elif node.module in modules:
                        edges[module].add(node.module)
        edges[module].discard(module)
    return edges


def cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found = []

    def visit(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(edges[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in sorted(edges):
        if v not in index:
            visit(v)
    return found


def test_the_checker_finds_a_cycle():
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert cycles({"a": {"b"}, "b": set()}) == []


def test_no_import_cycles():
    edges = import_graph()
    assert "rope_jax.families" in edges and "rope_jax.evaluation.finetune" in edges
    assert cycles(edges) == [], "import cycles (each list imports itself through the others)"


@pytest.mark.parametrize(
    "low,high",
    [
        ("rope_jax.families", "rope_jax.training.trainer"),
        ("rope_jax.training.loop", "rope_jax.evaluation.finetune"),
        ("rope_jax.models", "rope_jax.families"),
    ],
)
def test_floors_point_down(low, high):
    """A few floor rules of STYLE.md: the lower module never reaches the higher one."""
    edges = import_graph()
    seen, todo = set(), [low]
    while todo:
        module = todo.pop()
        for target in edges.get(module, ()):
            if target not in seen:
                seen.add(target)
                todo.append(target)
    assert high not in seen


def test_library_runs_train_from_their_config_alone():
    """No library module or entry point hands ``train_and_evaluate`` its own model or inputs
    (``model=``, ``model_cfg=``, ``inputs=`` are for tests): a run's ``config.json`` then
    always names what it trained, so any run (an ablation cell too) can be re-run from it."""
    paths = list(_modules().values())
    paths += [os.path.join(os.path.dirname(ROOT), name) for name in ("train.py", "eval.py")]
    found = []
    for path in paths:
        with open(path, encoding="utf-8") as f:
            tree = ast.parse(f.read())
        for node in ast.walk(tree):
            if (
                isinstance(node, ast.Call)
                and getattr(node.func, "attr", getattr(node.func, "id", "")) == "train_and_evaluate"
            ):
                given = {k.arg for k in node.keywords} & {"model", "model_cfg", "inputs"}
                if given:
                    found.append(f"{os.path.relpath(path, os.path.dirname(ROOT))}: {sorted(given)}")
    assert found == []
