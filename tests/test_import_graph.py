"""The import graph of the tree has no cycles, counting the imports inside functions too, and no module reaches
into another top-level package's private names (issue 19).

A cycle hidden in a function works until someone hoists the import; this walks every `import` statement
of every module (module level, functions, methods) with `ast`, so it runs in well under a second.
"""
import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("compression", "datasets", "elastic", "clusters")


def _modules() -> dict[str, Path]:
    mods = {}
    for pkg in PACKAGES:
        for f in (ROOT / pkg).rglob("*.py"):
            parts = list(f.relative_to(ROOT).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts.pop()
            mods[".".join(parts)] = f
    return mods


def _from_module(node: ast.ImportFrom, here: str) -> str:
    """The absolute module a `from ... import` names, relative imports resolved against package `here`."""
    base = node.module or ""
    if not node.level:
        return base
    pkg = here
    for _ in range(node.level - 1):
        pkg = pkg.rpartition(".")[0]
    return f"{pkg}.{base}" if base else pkg


def import_graph() -> dict[str, set[str]]:
    """Module -> the first-party modules it imports anywhere in its body. `from pkg import name` points at
    `pkg.name` when that is a module, else at `pkg` (its `__init__`)."""
    mods = _modules()

    def owner(name: str) -> str | None:
        while name and name not in mods:
            name = name.rpartition(".")[0]
        return name or None

    graph = {}
    for mod, path in mods.items():
        targets = set()
        here = mod if path.name == "__init__.py" else mod.rpartition(".")[0]
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                targets.update(owner(a.name) for a in node.names)
            elif isinstance(node, ast.ImportFrom):
                base = _from_module(node, here)
                for a in node.names:
                    full = f"{base}.{a.name}"
                    targets.add(full if full in mods else owner(base))
        graph[mod] = targets - {None, mod}
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan, iterative)."""
    index, low, on_stack, stack, found, counter = {}, {}, set(), [], [], 0
    for root in graph:
        if root in index:
            continue
        work = [(root, iter(sorted(graph[root])))]
        index[root] = low[root] = counter
        counter += 1
        stack.append(root)
        on_stack.add(root)
        while work:
            v, children = work[-1]
            w = next(children, None)
            if w is not None:
                if w not in index:
                    index[w] = low[w] = counter
                    counter += 1
                    stack.append(w)
                    on_stack.add(w)
                    work.append((w, iter(sorted(graph[w]))))
                elif w in on_stack:
                    low[v] = min(low[v], index[w])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[v])
            if low[v] == index[v]:
                comp = []
                while True:
                    w = stack.pop()
                    on_stack.discard(w)
                    comp.append(w)
                    if w == v:
                        break
                if len(comp) > 1:
                    found.append(sorted(comp))
    return found


def test_cycle_finder_sees_a_cycle_through_a_function_level_import():
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}
    assert cycles(graph) == [["a", "b", "c"]]
    assert cycles({"a": {"b"}, "b": set()}) == []


def test_the_walk_counts_imports_inside_functions():
    graph = import_graph()
    assert "elastic.driver" in graph["elastic.bench.runs"]     # imported inside bench_converge
    assert "compression.kernels" in graph["compression.demo"]  # `import compression.kernels as kernels`


def test_no_import_cycles_in_the_tree():
    found = cycles(import_graph())
    assert not found, "import cycles (module-level or inside functions): " + "; ".join(" <-> ".join(c) for c in found)


def test_the_trainer_never_imports_its_benchmarks():
    """Benchmarks and link emulation live beside the trainer (elastic/bench/); only the CLI, which dispatches
    the bench-* commands, imports them."""
    graph = import_graph()
    reach = {m: sorted(d for d in deps if d.startswith("elastic.bench")) for m, deps in graph.items()
             if not m.startswith("elastic.bench") and m != "elastic.cli" and not m.startswith("tests")}
    assert not {m: d for m, d in reach.items() if d}, reach


def _private(name: str) -> bool:
    """Whether a dotted name has a private part (`_x`; dunders such as `__init__` are not private)."""
    return any(p.startswith("_") and not (p.startswith("__") and p.endswith("__")) for p in name.split("."))


def private_reach_ins(mod: str, source: str, here: str) -> list[str]:
    """Private names of another top-level package that module `mod` (package `here`, for relative imports)
    imports (`from compression.codec import _fresh`, `import datasets._x`) or reads off something it imported
    (`codec._fresh`, `compression.codec._fresh`, `Class._field`)."""
    top = mod.split(".")[0]
    found, bound = [], {}  # bound: local name -> the first-party dotted name it stands for
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            for a in node.names:
                if a.name.split(".")[0] in PACKAGES:
                    bound[a.asname or a.name.split(".")[0]] = a.name if a.asname else a.name.split(".")[0]
                    if a.name.split(".")[0] != top and _private(a.name):
                        found.append(f"{mod}: import {a.name}")
        elif isinstance(node, ast.ImportFrom):
            base = _from_module(node, here)
            if base.split(".")[0] not in PACKAGES:
                continue
            for a in node.names:
                bound[a.asname or a.name] = f"{base}.{a.name}"
                if base.split(".")[0] != top and _private(f"{base}.{a.name}"):
                    found.append(f"{mod}: from {base} import {a.name}")
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Attribute) and _private(node.attr):
            chain, v = [node.attr], node.value
            while isinstance(v, ast.Attribute):
                chain.append(v.attr)
                v = v.value
            if isinstance(v, ast.Name) and v.id in bound and bound[v.id].split(".")[0] != top:
                found.append(f"{mod}: {'.'.join([bound[v.id]] + chain[::-1])}")
    return found


def test_the_private_name_check_sees_imports_and_attribute_reads():
    src = ("import compression.codec\nimport compression.dense as dense\nfrom compression.codec import _fresh\n"
           "from datasets import DataPlan\nfrom elastic import _mine\n"
           "def f(plan):\n    compression.codec._pack(); dense._adamw(); DataPlan._take; plan._own; dense.__name__\n")
    assert sorted(private_reach_ins("elastic.x", src, "elastic")) == sorted([
        "elastic.x: from compression.codec import _fresh", "elastic.x: compression.codec._pack",
        "elastic.x: compression.dense._adamw", "elastic.x: datasets.DataPlan._take"])


def test_no_module_reaches_into_another_packages_private_names():
    found = []
    for mod, path in _modules().items():
        here = mod if path.name == "__init__.py" else mod.rpartition(".")[0]
        found += private_reach_ins(mod, path.read_text(), here)
    assert not found, "private names used across packages (make them public, or move the code): " + "; ".join(found)
