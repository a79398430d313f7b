"""Names of the dialect models and readers mean one thing each (issue 13): no class or constant is
defined under one name with two meanings in xtables/, nft/ and explain/ (AST, no import)."""

from __future__ import annotations

import ast
from collections import defaultdict
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[2] / "istio_iptables"
MODULES = [
    "xtables/model.py",
    "xtables/spelling.py",
    "xtables/save.py",
    "xtables/render.py",
    "xtables/reconcile.py",
    "nft/model.py",
    "nft/listing.py",
    "nft/render.py",
    "explain/walk.py",
    "explain/from_nft.py",
]
# Chain names are the same chains in both dialects (one meaning): shared on purpose.
SAME_MEANING = {"ISTIO_INBOUND", "ISTIO_IN_REDIRECT", "ISTIO_OUTPUT", "ISTIO_REDIRECT", "ISTIO_DIVERT",
                "ISTIO_TPROXY", "ISTIO_OUTPUT_DNS", "ISTIO_DROP"}  # fmt: skip


def public_definitions(path: Path) -> set[str]:
    names: set[str] = set()
    for node in ast.parse(path.read_text()).body:
        if isinstance(node, ast.FunctionDef | ast.ClassDef):
            names.add(node.name)
        elif isinstance(node, ast.Assign):
            names |= {target.id for target in node.targets if isinstance(target, ast.Name)}
        elif isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name):
            names.add(node.target.id)
    return {name for name in names if not name.startswith("_")}


def test_no_public_name_is_defined_twice_in_the_dialects_and_explain() -> None:
    where: dict[str, list[str]] = defaultdict(list)
    for module in MODULES:
        for name in public_definitions(PACKAGE / module):
            where[name].append(module)
    twice = {name: modules for name, modules in where.items() if len(modules) > 1 and name not in SAME_MEANING}
    assert twice == {}


def typing_names_in_use() -> set[str]:
    """Every name the package imports from typing (``Protocol``, ``Literal``, ...)."""
    names: set[str] = set()
    for path in PACKAGE.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module == "typing":
                names |= {alias.name for alias in node.names}
    return names


def test_no_model_class_shadows_a_typing_name_the_package_uses() -> None:
    in_use = typing_names_in_use()
    assert "Protocol" in in_use  # the engine's and the configuration's interfaces
    shadowing = {
        (module, name) for module in MODULES for name in public_definitions(PACKAGE / module) if name in in_use
    }
    assert shadowing == set()
