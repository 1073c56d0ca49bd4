"""The package layout is a picture of the architecture: no import cycle, no upward import, small modules.

Every ``import``/``from ... import`` in ``robkd/`` counts, function-level ("late") imports included: a
late import that dodges a cycle is still a cycle.
"""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1] / "robkd"

#: lowest first; a module may import its own layer and the layers below it
LAYERS: list[set[str]] = [
    {"robkd.errors", "robkd.types", "robkd.utils", "robkd.data"},
    {"robkd.attacks", "robkd.models", "robkd.report"},
    {"robkd.analysis", "robkd.distributed"},
    {"robkd.bounds"},
    {"robkd.auditing"},
    {"robkd.distill", "robkd.zoo"},
    {"robkd.cli"},
    {"robkd", "robkd.__main__"},  # the public API and the entry point
]
MAX_LINES = 500


def _modules() -> dict[str, Path]:
    mods = {}
    for p in ROOT.rglob("*.py"):
        name = ".".join(p.relative_to(ROOT.parent).with_suffix("").parts)
        if name.endswith(".__init__"):
            name = name[: -len(".__init__")]
        mods[name] = p
    return mods


def _edges(mods: dict[str, Path]) -> dict[str, set[str]]:
    edges: dict[str, set[str]] = {m: set() for m in mods}
    for m, p in mods.items():
        pkg = m if p.name == "__init__.py" else m.rsplit(".", 1)[0]
        for node in ast.walk(ast.parse(p.read_text(encoding="utf-8"))):
            targets: list[str] = []
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    parts = pkg.split(".")[: len(pkg.split(".")) - node.level + 1]
                    base = ".".join(parts + ([base] if base else []))
                targets = [f"{base}.{a.name}" for a in node.names] + [base]
            for t in targets:
                while t and t not in mods:
                    t = t.rsplit(".", 1)[0] if "." in t else ""
                if t and t != m and not m.startswith(t + "."):
                    edges[m].add(t)
    return edges


def _layer(module: str) -> int:
    best, depth = None, -1
    for i, layer in enumerate(LAYERS):
        for prefix in layer:
            if (module == prefix or module.startswith(prefix + ".")) and prefix.count(".") > depth:
                best, depth = i, prefix.count(".")
    if best is None:
        raise AssertionError(f"{module} belongs to no layer: add its package to LAYERS")
    return best


def _cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (iterative Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on: set[str] = set()
    out: list[list[str]] = []
    counter = 0
    for root in edges:
        if root in index:
            continue
        work = [(root, iter(sorted(edges[root])))]
        index[root] = low[root] = counter
        counter += 1
        stack.append(root)
        on.add(root)
        while work:
            v, it = work[-1]
            nxt = next(it, None)
            if nxt is not None:
                if nxt not in index:
                    index[nxt] = low[nxt] = counter
                    counter += 1
                    stack.append(nxt)
                    on.add(nxt)
                    work.append((nxt, iter(sorted(edges[nxt]))))
                elif nxt in on:
                    low[v] = min(low[v], index[nxt])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[v])
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
    return out


def test_the_walker_finds_a_cycle_and_an_upward_import():
    """The checks below can fail: a hand-made graph with a cycle and an upward edge is caught."""
    edges = {"robkd.a": {"robkd.b"}, "robkd.b": {"robkd.c"}, "robkd.c": {"robkd.a"}, "robkd.d": set()}
    assert _cycles(edges) == [["robkd.a", "robkd.b", "robkd.c"]]
    assert _layer("robkd.utils.io") == 0 and _layer("robkd.cli.env") > _layer("robkd.auditing.api")


def test_no_import_cycles():
    assert _cycles(_edges(_modules())) == []


def test_no_upward_imports():
    edges = _edges(_modules())
    upward = sorted(f"{m} -> {t}" for m, ts in edges.items() for t in ts if _layer(t) > _layer(m))
    assert upward == []


def test_no_module_over_500_lines():
    big = {str(p.relative_to(ROOT.parent)): n for p in ROOT.rglob("*.py")
           if (n := len(p.read_text(encoding="utf-8").splitlines())) > MAX_LINES}
    assert big == {}
