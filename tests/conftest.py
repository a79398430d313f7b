"""Shared fixtures. Kernel tests need root and network namespaces: under CI=true they never skip."""

from __future__ import annotations

import os
import shutil
from collections.abc import Callable, Iterator

import pytest

from tests.support.netns import NetNS
from tests.support.sets_support import Pair

IN_CI = os.environ.get("CI", "").lower() == "true"


def kernel_available() -> str | None:
    """None when namespace tests can run here, else why not."""
    if os.geteuid() != 0:
        return "needs root"
    for tool in ("ip", "iptables-legacy-restore", "iptables-nft-restore", "nft"):
        if shutil.which(tool) is None:
            return f"needs {tool}"
    return None


def require_kernel() -> None:
    reason = kernel_available()
    if reason:
        if IN_CI:
            pytest.fail(f"namespace test cannot run under CI=true: {reason}")
        pytest.skip(reason)


@pytest.fixture(autouse=True)
def fresh_logger() -> Iterator[None]:
    """Put the module-global logger back as the test found it (unconfigured: records go to ``logging``).

    An in-process CLI run configures it onto the CliRunner's stream, which is gone after the run.
    """
    from istio_iptables._lib.log import log

    before = dict(vars(log))
    yield
    vars(log).clear()
    vars(log).update(before)


@pytest.fixture
def netns() -> Iterator[NetNS]:
    require_kernel()
    with NetNS() as namespace:
        yield namespace


@pytest.fixture
def netns_factory() -> Iterator:
    """Make as many namespaces as a test needs; all are deleted afterwards."""
    require_kernel()
    made: list[NetNS] = []

    def make(prefix: str = "iit") -> NetNS:
        namespace = NetNS(prefix)
        made.append(namespace)
        return namespace

    yield make
    for namespace in made:
        namespace.delete()


@pytest.fixture
def pair(netns_factory: Callable[[str], NetNS]) -> Iterator[Pair]:
    """A client namespace (rules, stand-in proxy) and a server one (tests/support/sets_support.py)."""
    made = Pair(netns_factory)
    yield made
    made.close()


# Fixtures that need root (namespaces, podman): a test using any of them, directly or through another
# fixture, is marked ``netns``, so ``pytest -m "not netns"`` selects the rootless unit subset.
ROOT_FIXTURES = frozenset({"netns", "netns_factory", "image"})


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        if ROOT_FIXTURES & set(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.netns)


@pytest.fixture(autouse=True)
def namespaces_only_when_marked(request: pytest.FixtureRequest) -> Iterator[None]:
    """A test that makes a namespace without the ``netns`` marker fails, so ``-m "not netns"`` stays rootless.

    (Mark it with ``pytestmark = pytest.mark.netns`` or use the ``netns``/``netns_factory`` fixtures.)
    Patched by hand rather than with ``monkeypatch``: an autouse fixture set up first is torn down
    last, and a test's own ``monkeypatch`` (PATH, say) must be undone before its namespaces are deleted.
    """
    if request.node.get_closest_marker("netns") is not None:
        yield
        return

    def refuse(self: NetNS, *args: object, **kwargs: object) -> None:
        pytest.fail(f"{request.node.nodeid} makes a network namespace but is not marked netns")

    original = NetNS.__init__
    NetNS.__init__ = refuse  # type: ignore[method-assign]
    try:
        yield
    finally:
        NetNS.__init__ = original  # type: ignore[method-assign]


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo) -> Iterator:
    outcome = yield
    report = outcome.get_result()
    # Under CI a skipped namespace test would hide a broken test bed: count it as a failure.
    # (An expected failure is reported as skipped too, but it ran: it stays as it is.)
    expected_failure = hasattr(report, "wasxfail")
    if IN_CI and report.skipped and not expected_failure and item.get_closest_marker("netns") is not None:
        report.outcome = "failed"
        report.longrepr = f"namespace test skipped under CI=true: {report.longrepr}"
