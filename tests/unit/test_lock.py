"""requirements.lock, which the image installs with --require-hashes, stays in step with pyproject.toml."""

from __future__ import annotations

import re
import tomllib
from pathlib import Path

from packaging.requirements import Requirement
from packaging.version import Version

REPO = Path(__file__).resolve().parent.parent.parent


def pins(lock: str) -> dict[str, tuple[Version, list[str]]]:
    """name -> (version, hashes) of a pip requirements file in the form scripts/lock_requirements.py writes."""
    found: dict[str, tuple[Version, list[str]]] = {}
    for entry in re.split(r"\n(?=\S)", re.sub(r"(?m)^#.*\n", "", lock).strip()):
        name, version = re.match(r"([\w.-]+)==(\S+)", entry).groups()
        found[name.lower()] = (Version(version), re.findall(r"--hash=sha256:([0-9a-f]{64})", entry))
    return found


def test_every_dependency_is_pinned_with_a_hash() -> None:
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    locked = pins((REPO / "requirements.lock").read_text())
    for dependency in map(Requirement, project["dependencies"]):
        name = dependency.name.lower()
        assert name in locked, f"{name} is not in requirements.lock: run scripts/lock_requirements.py"
        version, hashes = locked[name]
        assert version in dependency.specifier, f"requirements.lock pins {name}=={version}, outside {dependency}"
        assert hashes, f"{name} has no hash in requirements.lock"


def test_build_tools_satisfy_the_build_system() -> None:
    build = tomllib.loads((REPO / "pyproject.toml").read_text())["build-system"]
    locked = pins((REPO / "requirements-build.lock").read_text())
    for requirement in map(Requirement, build["requires"]):
        version, hashes = locked[requirement.name.lower()]
        assert version in requirement.specifier and hashes
