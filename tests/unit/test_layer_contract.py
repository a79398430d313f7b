"""The import directions between the package's layers, read from the source (AST, no import, no root).

Layers, from the bottom: **pure** (data, policy, rendering, parsing: no I/O), **system** (processes,
netlink, namespaces, the kernel's tables), **orchestration** (what one invocation does, in which
order), **front ends** (the command lines). A module may import its own layer and the layers below
it; pure modules import nothing above them at module level, and the module-level import graph
has no cycle. Function-level (lazy) imports, which the start-time budget relies on
(docs/speed.md), are checked for direction too, and reported separately.

Within the pure layer, the capture **policy** (which rules a configuration means) is for the
layers that decide what to do (orchestration, front ends), not for system code.

``KNOWN_VIOLATIONS`` lists today's exceptions, each with why it is there; the layout moves
(issue 13) shrink it to nothing. A new exception is a design decision, not a test fix.
"""

from __future__ import annotations

import ast
import functools
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[2] / "istio_iptables"

PURE, SYSTEM, ORCHESTRATION, FRONTEND = "pure", "system", "orchestration", "front end"
RANK = {PURE: 0, SYSTEM: 1, ORCHESTRATION: 2, FRONTEND: 3}

# Every module of the package, by layer (module names relative to istio_iptables).
LAYERS: dict[str, str] = {
    # front ends
    "frontends.cli.main": FRONTEND,
    "frontends.cli.explain": FRONTEND,
    "__main__": FRONTEND,
    "frontends.__init__": FRONTEND,
    "frontends.pod": FRONTEND,
    "frontends.cni.__init__": FRONTEND,
    "frontends.cni.__main__": FRONTEND,
    "frontends.cni.actions": FRONTEND,
    "frontends.cni.install": FRONTEND,
    "frontends.cni.plugin": FRONTEND,
    "frontends.cni.spec": FRONTEND,
    # orchestration
    "engine.actions": ORCHESTRATION,
    "engine.xtables": ORCHESTRATION,
    "engine.nft": ORCHESTRATION,
    "engine.forms": ORCHESTRATION,
    "engine.seam": ORCHESTRATION,
    # pure
    "__init__": PURE,
    "nft.__init__": PURE,
    "errors": PURE,
    "_lib.records": PURE,
    "xtables.model": PURE,
    "config.sidecar": PURE,
    "policy.sidecar_xtables": PURE,
    "policy.lists": PURE,
    "xtables.render": PURE,
    "xtables.save": PURE,
    "explain.walk": PURE,
    "explain.from_nft": PURE,
    "xtables.reconcile": PURE,
    "nft.model": PURE,
    "nft.names": PURE,
    "policy.sidecar_nft": PURE,
    "policy.footprint": PURE,
    "nft.render": PURE,
    # system
    "system.spawn": SYSTEM,
    "system.host": SYSTEM,
    "_lib.log": SYSTEM,
    "system.ipset": SYSTEM,
    "engine.validation": SYSTEM,
    "system.xtables_backend": SYSTEM,
    "system.xtables_restore": SYSTEM,
    "system.xtables_libiptc": SYSTEM,
    "system.netns": SYSTEM,
    "system.routes": SYSTEM,
    "system.nslock": SYSTEM,
    "system.nft": SYSTEM,
    "system.__init__": SYSTEM,
    "system.kube": SYSTEM,
    "system.node_agent": SYSTEM,
    "system.real": SYSTEM,
    "_lib.__init__": PURE,  # added by the relayout: check
    "config.__init__": PURE,  # added by the relayout: check
    "engine.__init__": ORCHESTRATION,  # added by the relayout: check
    "explain.__init__": PURE,  # added by the relayout: check
    "frontends.cli.__init__": FRONTEND,  # added by the relayout: check
    "frontends.cli.flags": FRONTEND,  # added by the relayout: check
    "net": PURE,  # added by the relayout: check
    "policy.__init__": PURE,  # added by the relayout: check
    "xtables.__init__": PURE,  # added by the relayout: check
}
POLICY = frozenset({"policy.sidecar_xtables", "policy.sidecar_nft"})  # pure, but only for those who decide what to do

# (importer, imported, module level?) -> why it is allowed for now.
KNOWN_VIOLATIONS: dict[tuple[str, str, bool], str] = {}


class Import:
    def __init__(self, importer: str, imported: str, module_level: bool, line: int) -> None:
        self.importer, self.imported, self.module_level, self.line = importer, imported, module_level, line

    @property
    def key(self) -> tuple[str, str, bool]:
        return (self.importer, self.imported, self.module_level)

    def __repr__(self) -> str:
        where = "module level" if self.module_level else "in a function"
        return f"{self.importer} -> {self.imported} ({where}, line {self.line})"


def module_name(path: Path) -> str:
    return ".".join(path.relative_to(PACKAGE).with_suffix("").parts)


def package_modules() -> set[str]:
    return {module_name(path) for path in PACKAGE.rglob("*.py")}


def _resolve(name: str, modules: set[str]) -> str | None:
    """``istio_iptables.xtables.reconcile`` -> ``apply.state``; a package -> its ``__init__``; others -> None."""
    if name != "istio_iptables" and not name.startswith("istio_iptables."):
        return None
    relative = name.removeprefix("istio_iptables").lstrip(".")
    if relative in modules:
        return relative
    package = f"{relative}.__init__" if relative else "__init__"
    return package if package in modules else None


def imports_of(path: Path, modules: set[str]) -> list[Import]:
    """Every import of another module of the package in ``path``, marked module level or lazy."""
    importer = module_name(path)
    found: list[Import] = []

    def visit(node: ast.AST, lazy: bool) -> None:
        for child in ast.iter_child_nodes(node):
            inner = lazy or isinstance(child, ast.FunctionDef | ast.AsyncFunctionDef | ast.Lambda)
            names: list[str] = []
            if isinstance(child, ast.Import):
                names = [alias.name for alias in child.names]
            elif isinstance(child, ast.ImportFrom) and child.module and child.level == 0:
                # `from istio_iptables.nft import system` imports the module nft.system.
                names = [
                    f"{child.module}.{alias.name}"
                    if _resolve(f"{child.module}.{alias.name}", modules) is not None
                    else child.module
                    for alias in child.names
                ]
            for name in names:
                imported = _resolve(name, modules)
                if imported is not None and imported != importer:
                    found.append(Import(importer, imported, not lazy, child.lineno))
            visit(child, inner)

    visit(ast.parse(path.read_text(), str(path)), False)
    return found


@functools.cache
def all_imports() -> tuple[Import, ...]:
    modules = package_modules()
    return tuple(found for path in sorted(PACKAGE.rglob("*.py")) for found in imports_of(path, modules))


def breaks_the_contract(found: Import) -> bool:
    importer, imported = LAYERS[found.importer], LAYERS[found.imported]
    if RANK[imported] > RANK[importer]:
        return True
    return found.imported in POLICY and importer not in (ORCHESTRATION, FRONTEND, PURE)


def cycles(edges: set[tuple[str, str]]) -> list[list[str]]:
    """The strongly connected components with more than one module (Tarjan's algorithm)."""
    graph: dict[str, set[str]] = {}
    for source, target in edges:
        graph.setdefault(source, set()).add(target)
        graph.setdefault(target, set())
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    components: list[list[str]] = []

    def connect(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for successor in sorted(graph[node]):
            if successor not in index:
                connect(successor)
                low[node] = min(low[node], low[successor])
            elif successor in on_stack:
                low[node] = min(low[node], index[successor])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                components.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            connect(node)
    return components


def test_every_module_has_a_layer() -> None:
    modules = package_modules()
    assert sorted(modules - set(LAYERS)) == [], "new module: give it a layer in LAYERS"
    assert sorted(set(LAYERS) - modules) == [], "module gone or moved: update LAYERS"


def test_pure_modules_import_nothing_above_them_at_module_level() -> None:
    offenders = [
        found
        for found in all_imports()
        if found.module_level and LAYERS[found.importer] == PURE and LAYERS[found.imported] != PURE
    ]
    assert offenders == []


def test_imports_point_down_the_layers() -> None:
    """Module-level and lazy imports alike; today's exceptions are listed in KNOWN_VIOLATIONS."""
    found = all_imports()
    violations = {item.key: item for item in found if breaks_the_contract(item)}
    unexpected = [item for key, item in violations.items() if key not in KNOWN_VIOLATIONS]
    assert unexpected == [], "an import against the layers: import the other way, or move the code"
    lazy = [item for item in violations.values() if not item.module_level]
    assert all(KNOWN_VIOLATIONS.get(item.key) for item in lazy)


def test_no_import_cycle_at_module_level() -> None:
    edges = {(item.importer, item.imported) for item in all_imports() if item.module_level}
    assert cycles(edges) == []


def test_import_cycles_through_lazy_imports_are_only_the_known_ones() -> None:
    edges = {(item.importer, item.imported) for item in all_imports()}
    known = {frozenset(key[:2]) for key in KNOWN_VIOLATIONS}
    unexpected = [
        component
        for component in cycles(edges)
        if not any(pair <= set(component) for pair in known)  # each cycle must run through a listed pair
    ]
    assert unexpected == []


def test_the_allow_list_holds_only_what_still_happens() -> None:
    """Fixing a violation must shrink KNOWN_VIOLATIONS: a stale entry would let it come back unnoticed."""
    found = {item.key for item in all_imports()}
    layer_breaks = {item.key for item in all_imports() if breaks_the_contract(item)}
    module_level_edges = {(item.importer, item.imported) for item in all_imports() if item.module_level}
    cyclic_pairs = {
        (a, b) for component in cycles({(i.importer, i.imported) for i in all_imports()}) for a in component
        for b in component
    }
    stale = [
        key
        for key in KNOWN_VIOLATIONS
        if key not in found or (key not in layer_breaks and (key[0], key[1]) not in cyclic_pairs)
    ]
    assert stale == [], "remove these entries from KNOWN_VIOLATIONS"
    assert module_level_edges  # the reader found the imports at all
