"""The import directions between the package's layers, read from the source (AST, no import, no root).

Layers, from the bottom: **pure** (data, policy, rendering, parsing: no I/O), **system** (processes,
netlink, namespaces, the kernel's tables), **orchestration** (what one invocation does, in which
order), **front ends** (the command lines). A module may import its own layer and the layers below
it; pure modules import nothing above them at module level, and the module-level import graph
has no cycle. Function-level (lazy) imports, which the start-time budget relies on
(docs/speed.md), are checked for direction too, and reported separately.

Within the pure layer, the capture **policy** (which rules a configuration means) is for the
layers that decide what to do (orchestration, front ends), not for system code.

Layers are given by package (``PACKAGE_LAYERS``, with the few modules that differ in
``MODULE_LAYERS``), and each package may import only the packages docs/architecture.md's table
allows (``ALLOWED_PACKAGES``). ``KNOWN_VIOLATIONS`` and ``KNOWN_PACKAGE_CROSSINGS`` list today's
exceptions, each with why it is there. A new exception is a design decision, not a test fix.
"""

from __future__ import annotations

import ast
import functools
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[2] / "istio_iptables"

PURE, SYSTEM, ORCHESTRATION, FRONTEND = "pure", "system", "orchestration", "front end"
RANK = {PURE: 0, SYSTEM: 1, ORCHESTRATION: 2, FRONTEND: 3}

# Layers by package (docs/architecture.md): a module takes its package's layer unless listed in
# MODULE_LAYERS (module names relative to istio_iptables).
PACKAGE_LAYERS: dict[str, str] = {
    "frontends": FRONTEND,
    "engine": ORCHESTRATION,
    "system": SYSTEM,
    "policy": PURE,
    "xtables": PURE,
    "nft": PURE,
    "explain": PURE,
    "config": PURE,
    "_lib": PURE,
}
MODULE_LAYERS: dict[str, str] = {
    "__main__": FRONTEND,
    "__init__": PURE,
    "errors": PURE,
    "net": PURE,
    "_lib.log": SYSTEM,  # writes to streams and files, and falls back to logging
    "engine.validation": SYSTEM,  # --run-validation: sockets and a probe server, no orchestration
}


def layer_of(module: str) -> str | None:
    if module in MODULE_LAYERS:
        return MODULE_LAYERS[module]
    return PACKAGE_LAYERS.get(module.split(".")[0])


def package_of(module: str) -> str:
    """``engine.xtables`` -> ``engine``; the top-level modules are their own package."""
    return module.split(".")[0] if "." in module else module


# Which packages each package may import, as docs/architecture.md's table says ("below": net,
# errors, _lib). Lazy (function-level) imports count too.
BELOW = frozenset({"net", "errors", "_lib", "__init__"})
ALLOWED_PACKAGES: dict[str, frozenset[str]] = {
    "frontends": frozenset({"engine", "explain", "config", "system", "policy", "xtables", "nft"}) | BELOW,
    "engine": frozenset({"system", "policy", "xtables", "nft", "config"}) | BELOW,
    "explain": frozenset({"xtables", "nft", "policy", "config"}) | BELOW,
    "system": frozenset({"xtables", "nft", "config", "policy"}) | BELOW,
    "policy": frozenset({"xtables", "nft", "config"}) | BELOW,
    "xtables": frozenset({"config"}) | BELOW,
    "nft": frozenset({"config", "xtables"}) | BELOW,
    "config": BELOW,
    "_lib": BELOW,
    "net": BELOW,
    "errors": BELOW,
    "__init__": BELOW,
    "__main__": frozenset({"frontends"}) | BELOW,
}
# (importer, imported) -> why a module crosses its package's allowance today.
KNOWN_PACKAGE_CROSSINGS: dict[tuple[str, str], str] = {
    ("config.sidecar", "xtables.model"): "the port list values (PortEntry, PortRange) are the dialect's model types",
    ("nft.render", "policy.lists"): "nft sets share the member spelling and port-range merge of policy.lists",
}
# system may import policy for data only (lists' text, footprints), never a capture policy.
SYSTEM_POLICY_MODULES = frozenset({"policy.lists", "policy.footprint"})

# pure, but only for those who decide what to do
POLICY = frozenset({"policy.sidecar_xtables", "policy.sidecar_nft", "policy.ambient_xtables", "policy.ambient_nft"})

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
    importer, imported = layer_of(found.importer), layer_of(found.imported)
    assert importer is not None and imported is not None
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
    assert sorted(module for module in modules if layer_of(module) is None) == [], (
        "new package or top-level module: give it a layer in PACKAGE_LAYERS or MODULE_LAYERS"
    )
    assert sorted(set(MODULE_LAYERS) - modules) == [], "module gone or moved: update MODULE_LAYERS"


def test_packages_import_only_what_the_architecture_allows() -> None:
    """docs/architecture.md's table, package by package; KNOWN_PACKAGE_CROSSINGS lists today's exceptions."""
    crossings = {
        (found.importer, found.imported): found
        for found in all_imports()
        if package_of(found.imported) != package_of(found.importer)
        and package_of(found.imported) not in ALLOWED_PACKAGES[package_of(found.importer)]
    }
    assert [found for key, found in crossings.items() if key not in KNOWN_PACKAGE_CROSSINGS] == []
    assert sorted(set(KNOWN_PACKAGE_CROSSINGS) - set(crossings)) == [], "fixed: remove from KNOWN_PACKAGE_CROSSINGS"


def test_system_uses_policy_data_only() -> None:
    offenders = [
        found
        for found in all_imports()
        if package_of(found.importer) == "system"
        and package_of(found.imported) == "policy"
        and found.imported not in SYSTEM_POLICY_MODULES
    ]
    assert offenders == []


def test_pure_modules_import_nothing_above_them_at_module_level() -> None:
    offenders = [
        found
        for found in all_imports()
        if found.module_level and layer_of(found.importer) == PURE and layer_of(found.imported) != PURE
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
