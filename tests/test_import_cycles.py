"""No import cycles between the modules of the project's own packages (server, handlers,
realtime), checked on grimp's import graph, the one `lint-imports` checks its contracts on.

The contracts in setup.cfg (layers, acyclic siblings) already forbid most cycles; this finds
every one, module by module, including a package's `__init__` and its own submodules. Imports
made only for type checking count, as in the contracts.
"""

from __future__ import annotations

from collections.abc import Iterator
from itertools import pairwise

import grimp

PACKAGES = ("server", "handlers", "realtime")


def import_cycles(graph: grimp.ImportGraph) -> list[list[str]]:
    """One cycle (`a, b, ..., a`) through each group of modules that import each other in a
    circle (each strongly connected component of the graph, found with Tarjan's algorithm)."""
    edges = {
        module: sorted(graph.find_modules_directly_imported_by(module)) for module in graph.modules
    }
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    components: list[set[str]] = []

    def visit(start: str) -> None:
        # Iterative, so a long chain of imports cannot hit the recursion limit.
        work: list[tuple[str, Iterator[str]]] = [(start, iter(edges[start]))]
        index[start] = low[start] = len(index)
        stack.append(start)
        on_stack.add(start)
        while work:
            module, targets = work[-1]
            for target in targets:
                if target not in index:
                    index[target] = low[target] = len(index)
                    stack.append(target)
                    on_stack.add(target)
                    work.append((target, iter(edges[target])))
                    break
                if target in on_stack:
                    low[module] = min(low[module], index[target])
            else:
                work.pop()
                if work:
                    parent = work[-1][0]
                    low[parent] = min(low[parent], low[module])
                if low[module] == index[module]:
                    component = set()
                    while True:
                        member = stack.pop()
                        on_stack.discard(member)
                        component.add(member)
                        if member == module:
                            break
                    if len(component) > 1 or module in edges[module]:
                        components.append(component)

    for module in sorted(edges):
        if module not in index:
            visit(module)
    return sorted(_cycle_through(component, edges) for component in components)


def _cycle_through(component: set[str], edges: dict[str, list[str]]) -> list[str]:
    """A shortest cycle from the component's first module back to itself, inside it."""
    start = min(component)
    previous: dict[str, str] = {}
    frontier = [start]
    while frontier:
        following = []
        for module in frontier:
            for target in edges[module]:
                if target == start:
                    path = [module]
                    while path[-1] != start:
                        path.append(previous[path[-1]])
                    return [start, *reversed(path[:-1]), start]
                if target in component and target not in previous:
                    previous[target] = module
                    following.append(target)
        frontier = following
    raise AssertionError(f"no cycle in {sorted(component)}")


def describe(graph: grimp.ImportGraph, cycle: list[str]) -> str:
    """The cycle with the line of each import in it."""
    steps = []
    for importer, imported in pairwise(cycle):
        details = graph.get_import_details(importer=importer, imported=imported)
        where = (
            f" (line {details[0]['line_number']}: {details[0]['line_contents']})" if details else ""
        )
        steps.append(f"  {importer} -> {imported}{where}")
    return "\n".join(steps)


def test_the_packages_have_no_import_cycles() -> None:
    graph = grimp.build_graph(*PACKAGES, exclude_type_checking_imports=False, cache_dir=None)
    assert len(graph.modules) > 50  # the packages were found
    cycles = import_cycles(graph)
    assert not cycles, "import cycles:\n" + "\n\n".join(describe(graph, c) for c in cycles)


def test_the_check_finds_cycles_through_siblings_packages_and_the_package_itself() -> None:
    graph = grimp.ImportGraph()
    for importer, imported in [
        ("app.a", "app.b"),
        ("app.b", "app.c"),
        ("app.c", "app.a"),  # a -> b -> c -> a
        ("app.c", "app.d"),  # d is outside the circle
        ("app", "app.e"),  # the package's __init__ and its submodule
        ("app.e", "app"),
        ("app.f", "app.f"),  # a module importing itself
        ("app.d", "lib.x"),
    ]:
        graph.add_import(importer=importer, imported=imported)
    assert import_cycles(graph) == [
        ["app", "app.e", "app"],
        ["app.a", "app.b", "app.c", "app.a"],
        ["app.f", "app.f"],
    ]
