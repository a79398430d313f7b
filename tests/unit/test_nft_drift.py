"""Native nftables re-runs against a fake system: our live tables (a real ``nft -j`` listing) compared
with the configuration's. The same rules are not written again, other rules are drift (exit 3) unless
--reconcile or --force-apply, and the CNI CHECK reports the same differences."""

from __future__ import annotations

import copy
import io
import json
from pathlib import Path
from typing import Any

import pytest

from istio_iptables.engine.actions import Action, execute
from istio_iptables.engine.nft import NftForm, desired_lines, live_lines, table_differences
from istio_iptables.errors import DriftError
from istio_iptables.policy.footprint import SIDECAR
from istio_iptables.policy.sidecar_nft import build_nft_ruleset
from istio_iptables.policy.sidecar_xtables import build_plan
from istio_iptables.system.nft import NamespaceState, parse_nft_listing
from tests.support.fake_system import FakeSystem, config

# nft -j list ruleset after: --native-nftables -p 15001 -z 15006 -u 1337 -i '*' -b '*' -m TPROXY
# -x <100 /24 networks> --enable-ipv6 (nft 1.0.x); what `config(tproxy=True, sets=True)` asks for.
LISTING = json.loads((Path(__file__).parents[1] / "data" / "native-tproxy-sets.json").read_text())["nftables"]


def native(**flags: Any) -> Any:
    return config(tproxy=True, sets=True, native_nftables="true", **flags)


def holding(objects: list[dict]) -> FakeSystem:
    """A fake system whose namespace holds these ``nft -j`` objects."""
    system = FakeSystem()

    def read_nft_state(footprint: Any, *, with_legacy: bool) -> NamespaceState:
        system.events.append("read nft")
        state = NamespaceState(footprint=footprint)
        parse_nft_listing(copy.deepcopy(objects), state)
        return state

    system.read_nft_state = read_nft_state  # type: ignore[method-assign]
    return system


def run(cfg: Any, system: FakeSystem) -> None:
    execute(Action.APPLY, lambda: cfg, io.StringIO(), system=system, namespace="pod")


def edited(change: Any) -> list[dict]:
    objects = copy.deepcopy(LISTING)
    change(objects)
    return objects


def rules_of(objects: list[dict], chain: str) -> list[dict]:
    return [entry["rule"] for entry in objects if "rule" in entry and entry["rule"]["chain"] == chain]


def test_the_listing_reads_back_as_the_configuration() -> None:
    live = live_lines(LISTING)
    assert live == desired_lines(build_nft_ruleset(native()))
    declared = "set istio-v4-out-excl-24 { type ipv4_addr ; elements = { 10.0.0.0,"
    assert any(line.startswith(declared) for line in live["istio-proxy-nat"])
    assert "chain output { type route hook output priority -150 ; policy accept ; }" in live["istio-proxy-mangle"]


def test_the_same_configuration_writes_nothing_and_ensures_the_routes() -> None:
    system = holding(LISTING)
    run(native(), system)
    assert system.events == ["enter pod", "check privileges", "lock", "read nft", "check lo", "routes", "unlock"]


def test_counters_are_not_compared() -> None:
    def count(objects: list[dict]) -> None:
        for rule in rules_of(objects, "prerouting"):
            for expression in rule["expr"]:
                if "counter" in expression:
                    expression["counter"] = {"packets": 42, "bytes": 4200}

    system = holding(edited(count))
    run(native(), system)
    assert "nft -f" not in system.events


def test_another_configuration_is_drift_and_nothing_is_written() -> None:
    system = holding(LISTING)
    with pytest.raises(DriftError, match="another configuration") as raised:
        run(config(tproxy=False, native_nftables="true"), system)
    message = str(raised.value)
    assert "table inet istio-proxy-mangle: not part of this configuration" in message
    assert "--reconcile" in message
    assert "nft -f" not in system.events and "routes" not in system.events


@pytest.mark.parametrize("flag", ["reconcile", "force_apply"])
def test_reconcile_and_force_apply_replace(flag: str) -> None:
    other = holding(LISTING)
    run(config(tproxy=False, native_nftables="true", **{flag: "true"}), other)
    assert "nft -f" in other.events
    same = holding(LISTING)
    run(native(**{flag: "true"}), same)
    assert ("nft -f" in same.events) == (flag == "force_apply")  # --reconcile of the same rules: nothing to do


def test_a_set_member_changed_is_drift() -> None:
    def change(objects: list[dict]) -> None:
        named = next(entry["set"] for entry in objects if "set" in entry)
        named["elem"][0] = "192.168.0.0"

    with pytest.raises(DriftError, match="istio-v4-out-excl-24") as raised:
        run(native(), holding(edited(change)))
    assert "192.168.0.0" in str(raised.value)


@pytest.mark.parametrize(
    ("what", "change"),
    [
        ("a rule removed", lambda objects: objects.remove(next(e for e in objects if "rule" in e))),
        ("rules reordered", lambda objects: _swap_first_rules(objects, "istio-output")),
        ("a priority", lambda objects: first_base_chain(objects).update(prio=-99)),
        ("a policy", lambda objects: first_base_chain(objects).update(policy="drop")),
        ("an unknown part", lambda objects: rules_of(objects, "istio-output")[0]["expr"].insert(0, {"xt": {"n": "x"}})),
    ],
)
def test_any_difference_is_drift(what: str, change: Any) -> None:
    objects = edited(change)
    with pytest.raises(DriftError):
        run(native(), holding(objects))
    assert NftForm(native(), holding(objects), SIDECAR).drift(build_plan(native())) != [], what


def first_base_chain(objects: list[dict]) -> dict:
    return next(entry["chain"] for entry in objects if "chain" in entry and "hook" in entry["chain"])


def _swap_first_rules(objects: list[dict], chain: str) -> None:
    positions = [index for index, entry in enumerate(objects) if "rule" in entry and entry["rule"]["chain"] == chain]
    first, second = positions[:2]
    objects[first], objects[second] = objects[second], objects[first]


def test_the_cni_check_reports_the_same_differences() -> None:
    assert NftForm(native(), holding(LISTING), SIDECAR).drift(build_plan(native())) == []
    other = config(tproxy=False, native_nftables="true")
    differences = NftForm(other, holding(LISTING), SIDECAR).drift(build_plan(other))
    expected = table_differences(live_lines(LISTING), desired_lines(build_nft_ruleset(other)))
    assert differences == expected and differences
