"""No import circles between the package's modules.

The graph is grimp's (import-linter's graph builder): every import statement counts, including
imports inside functions and under ``typing.TYPE_CHECKING``, because each of those is a dependency a
reader has to follow and a circle among them means two modules cannot be understood apart.
A package's ``__init__`` importing its own submodules is not a circle unless a submodule imports the
``__init__`` back, and then it is one.
"""
from __future__ import annotations

import pytest

grimp = pytest.importorskip("grimp", reason="grimp comes with import-linter: pip install -e .[dev]")


def import_cycles(graph, package: str) -> list[tuple[str, ...]]:
    """One shortest circle through each direct import ``a -> b`` that ``b`` leads back to ``a`` from,
    each circle listed once (rotated to start at its smallest module name)."""
    found: set[tuple[str, ...]] = set()
    for a in sorted(m for m in graph.modules if m == package or m.startswith(package + ".")):
        for b in sorted(graph.find_modules_directly_imported_by(a)):
            if b == a or not (b == package or b.startswith(package + ".")):
                continue
            back = graph.find_shortest_chain(importer=b, imported=a)
            if back:
                cycle = (a, *back[:-1])  # a -> b -> ... -> (back to) a
                i = cycle.index(min(cycle))
                found.add(cycle[i:] + cycle[:i])
    return sorted(found)


def test_finder_reports_a_circle_and_only_the_circle():
    """The finder itself, on a graph built by hand: a -> b -> c -> a is one circle; d -> a is not in it."""
    g = grimp.ImportGraph()
    for m in ("pkg", "pkg.a", "pkg.b", "pkg.c", "pkg.d"):
        g.add_module(m)
    for importer, imported in (("pkg.a", "pkg.b"), ("pkg.b", "pkg.c"), ("pkg.c", "pkg.a"), ("pkg.d", "pkg.a")):
        g.add_import(importer=importer, imported=imported)
    assert import_cycles(g, "pkg") == [("pkg.a", "pkg.b", "pkg.c")]


def test_package_has_no_import_cycles():
    graph = grimp.build_graph("diffgap", cache_dir=None)
    assert "diffgap.runtime.session" in graph.modules and "diffgap.encoders.clap" in graph.modules  # the whole tree was read
    cycles = import_cycles(graph, "diffgap")
    assert not cycles, "import circles (move the shared piece into a module both import):\n" + "\n".join(
        " -> ".join((*c, c[0])) for c in cycles)
