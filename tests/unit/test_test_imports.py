"""How the tests are laid out: they import support modules, never each other; scripts/ and bench/ import
no test module; only tests marked ``netns`` make namespaces.

A test module imported elsewhere runs its module-level setup twice and ties unrelated tests
together (renaming or moving one breaks the other); shared helpers live in support modules
(``tests/*_support.py``, ``tests/support/conformance.py``, ``tests/support/netns.py``, ...).
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

from tests.support.netns import NetNS

ROOT = Path(__file__).resolve().parents[2]


def imported_modules(path: Path) -> set[str]:
    """Every module ``path`` imports, at any depth (``from tests import test_x`` counts as ``tests.test_x``)."""
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module)
            found.update(f"{node.module}.{alias.name}" for alias in node.names)
    return found


def imported_test_modules(path: Path) -> list[str]:
    return sorted(name for name in imported_modules(path) if name.startswith("tests.test_"))


def test_no_module_of_tests_imports_a_test_module() -> None:
    offenders = {
        str(path.relative_to(ROOT)): imports
        for path in sorted((ROOT / "tests").glob("*.py"))
        if (imports := [name for name in imported_test_modules(path) if name != f"tests.{path.stem}"])
    }
    assert offenders == {}


def test_scripts_and_benchmarks_import_no_test_module() -> None:
    paths = [*sorted((ROOT / "scripts").glob("*.py")), *sorted((ROOT / "bench").glob("*.py"))]
    assert paths, "scripts/ and bench/ moved? update this test"
    offenders = {str(path.relative_to(ROOT)): imports for path in paths if (imports := imported_test_modules(path))}
    assert offenders == {}


def test_a_test_not_marked_netns_cannot_make_a_namespace() -> None:
    """tests/conftest.py refuses it, so ``pytest -m "not netns"`` never needs root (see README)."""
    with pytest.raises(pytest.fail.Exception, match="not marked netns"):
        NetNS()
