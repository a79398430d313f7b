"""The pure state layer: save parsing, the kernel-spelling renderer, ownership and order-aware diffs."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from istio_iptables.net import Family
from istio_iptables.policy.sidecar_xtables import build_plan
from istio_iptables.xtables.reconcile import (
    desired_state,
    diff_states,
    normalised,
    owned_state,
    rollback_script,
    transition_script,
)
from istio_iptables.xtables.render import render_restore
from istio_iptables.xtables.save import read_save
from tests.support.apply_support import BACKENDS, FOREIGN_V4, case_args, config_of, program, resolve_test_gid
from tests.support.conformance import EXTRA_GROUPS, load_cases

CASES = load_cases()


def plan_of(case, tmp_path: Path):
    return build_plan(config_of(case_args(case, tmp_path), case.env))


def test_read_save_keeps_order_and_chains() -> None:
    dump = read_save(FOREIGN_V4)
    assert list(dump.tables) == ["filter", "nat", "mangle", "raw"]
    assert dump.tables["nat"]["FOREIGN_NAT"] == ["-j RETURN"]
    assert dump.tables["filter"]["OUTPUT"] == ["-j FOREIGN_FW"]
    assert dump.policies["filter"]["FOREIGN_FW"] == "-"


def test_foreign_rules_are_not_ours() -> None:
    assert owned_state(read_save(FOREIGN_V4)) == {}


def as_dump(state: dict[str, dict[str, list[str]]]):
    text = ""
    for table, chains in state.items():
        text += f"*{table}\n" + "".join(f"-A {chain} {spec}\n" for chain, specs in chains.items() for spec in specs)
        text += "COMMIT\n"
    return read_save(text)


@pytest.mark.parametrize("case", CASES, ids=lambda case: case.name)
def test_every_rule_a_configuration_writes_is_ours_for_that_configuration(case, tmp_path: Path) -> None:
    for ruleset in plan_of(case, tmp_path).rulesets:
        desired = desired_state(ruleset, resolve_test_gid)
        assert normalised(owned_state(as_dump(desired), desired, ruleset.family)) == normalised(desired), case.name


@pytest.mark.parametrize("case", CASES, ids=lambda case: case.name)
def test_without_the_flags_our_chains_still_tie_tproxy_and_virt_rules(case, tmp_path: Path) -> None:
    """A plain --cleanup-only (no flags) claims every rule a configuration writes except interface
    RETURNs (-c, and -k without an include range) that nothing of ours ties to the interface."""
    config = config_of(case_args(case, tmp_path), case.env)
    for ruleset in build_plan(config).rulesets:
        desired = desired_state(ruleset, resolve_test_gid)
        owned = owned_state(as_dump(desired), None, ruleset.family)
        prerouting = desired.get("nat", {}).get("PREROUTING", [])
        for table, chains in desired.items():
            for chain, specs in chains.items():
                for spec in specs:
                    interface = re.fullmatch(r"-[io] (\S+) -j RETURN", spec)
                    tied = interface is None or (
                        interface.group(1) in config.virt_interfaces
                        and any(re.match(rf"-i {interface.group(1)} .*-j ISTIO_REDIRECT", rule) for rule in prerouting)
                    )
                    assert (spec in owned.get(table, {}).get(chain, [])) == tied, (case.name, spec)


LOOK_ALIKES = """*nat
-A PREROUTING -i eth7 -j RETURN
-A PREROUTING -p tcp -j ISTIO_INBOUND
-A OUTPUT -o eth7 -j RETURN
-A OUTPUT -j ISTIO_OUTPUT
-A ISTIO_OUTPUT -m owner --uid-owner 1337 -j RETURN
COMMIT
*mangle
:ISTIO_TPROXY - [0:0]
-A PREROUTING -p tcp -m mark --mark 0x7 -j CONNMARK --save-mark --nfmask 0xffffffff --ctmask 0xffffffff
-A PREROUTING -p tcp -m mark --mark 0x539 -j CONNMARK --save-mark --nfmask 0xffffffff --ctmask 0xffffffff
-A OUTPUT -o lo -p tcp -m mark --mark 0x539 -j RETURN
-A OUTPUT ! -d 127.0.0.1/32 -o lo -p tcp -m owner --uid-owner 999 -j MARK --set-xmark 0x53a/0xffffffff
-A OUTPUT ! -d 127.0.0.1/32 -o lo -p tcp -m owner --uid-owner 1337 -j MARK --set-xmark 0x53a/0xffffffff
-A ISTIO_TPROXY ! -d 127.0.0.1/32 -p tcp -j TPROXY --on-port 15006 --on-ip 0.0.0.0 --tproxy-mark 0x539/0xffffffff
COMMIT
"""


def test_look_alikes_are_not_ours_unless_the_flags_or_our_chains_say_so() -> None:
    owned = owned_state(read_save(LOOK_ALIKES))
    assert owned["nat"]["PREROUTING"] == ["-p tcp -j ISTIO_INBOUND"]
    assert owned["nat"]["OUTPUT"] == ["-j ISTIO_OUTPUT"]
    assert owned["mangle"]["PREROUTING"] == [
        "-p tcp -m mark --mark 0x539 -j CONNMARK --save-mark --nfmask 0xffffffff --ctmask 0xffffffff"
    ]
    assert owned["mangle"]["OUTPUT"] == [
        "-o lo -p tcp -m mark --mark 0x539 -j RETURN",
        "! -d 127.0.0.1/32 -o lo -p tcp -m owner --uid-owner 1337 -j MARK --set-xmark 0x53a/0xffffffff",
    ]
    with_flags = owned_state(read_save(LOOK_ALIKES), {"nat": {"PREROUTING": ["-i eth7 -j RETURN"]}})
    assert with_flags["nat"]["PREROUTING"] == ["-i eth7 -j RETURN", "-p tcp -j ISTIO_INBOUND"]
    assert with_flags["nat"]["OUTPUT"] == ["-j ISTIO_OUTPUT"]


def test_a_twin_is_claimed_only_as_often_as_we_write_it() -> None:
    dump = read_save("*nat\n-A PREROUTING -i eth0 -j RETURN\n-A PREROUTING -i eth0 -j RETURN\n"
                      "-A PREROUTING -p tcp -j ISTIO_INBOUND\nCOMMIT\n")
    owned = owned_state(dump, {"nat": {"PREROUTING": ["-i eth0 -j RETURN", "-p tcp -j ISTIO_INBOUND"]}})
    assert owned["nat"]["PREROUTING"] == ["-i eth0 -j RETURN", "-p tcp -j ISTIO_INBOUND"]


def test_rollback_touches_only_what_changed() -> None:
    before = read_save("*nat\n:FOREIGN - [0:0]\n-A PREROUTING -p udp -j RETURN\n-A OUTPUT -d 10.0.0.1/32 -j RETURN\n"
                        "-A OUTPUT -j ISTIO_OUTPUT\n-A OUTPUT -p udp -j RETURN\n-A ISTIO_OUTPUT -j RETURN\nCOMMIT\n"
                        "*raw\n-A OUTPUT -j ACCEPT\nCOMMIT\n")
    now = read_save("*nat\n:FOREIGN - [0:0]\n-A PREROUTING -p udp -j RETURN\n-A PREROUTING -p tcp -j ISTIO_INBOUND\n"
                     "-A OUTPUT -d 10.0.0.1/32 -j RETURN\n-A OUTPUT -p udp -j RETURN\n-A OUTPUT -j ISTIO_OUTPUT\n"
                     "-A ISTIO_INBOUND -j RETURN\n-A ISTIO_OUTPUT -j ACCEPT\nCOMMIT\n"
                     "*raw\n-A OUTPUT -j ACCEPT\nCOMMIT\n")
    script = rollback_script(before, now, ["nat", "raw"], {}, Family.V4).splitlines()
    assert script == [
        "*nat",
        ":ISTIO_OUTPUT - [0:0]",
        ":ISTIO_INBOUND - [0:0]",
        "-D OUTPUT -j ISTIO_OUTPUT",
        "-D PREROUTING -p tcp -j ISTIO_INBOUND",
        "-X ISTIO_INBOUND",
        "-A ISTIO_OUTPUT -j RETURN",
        "-I OUTPUT 2 -j ISTIO_OUTPUT",
        "COMMIT",
    ]
    assert rollback_script(before, before, ["nat", "raw"], {}, Family.V4) == ""


def test_diff_is_order_aware() -> None:
    live = {"nat": {"ISTIO_OUTPUT": ["-d 1.1.1.1/32 -j RETURN", "-j ISTIO_REDIRECT"], "ISTIO_REDIRECT": []}}
    swapped = {"nat": {"ISTIO_OUTPUT": ["-j ISTIO_REDIRECT", "-d 1.1.1.1/32 -j RETURN"], "ISTIO_REDIRECT": []}}
    assert diff_states(live, live, Family.V4) == []
    diff = diff_states(live, swapped, Family.V4)
    assert any(line.startswith("-A ") or line.startswith("--A") for line in diff), diff
    assert any(line.startswith("+-A") for line in diff), diff


def test_empty_builtin_chains_do_not_count() -> None:
    assert normalised({"nat": {"OUTPUT": []}}) == {}


def test_cleanup_script_removes_jumps_before_chains() -> None:
    live = {"nat": {"ISTIO_OUTPUT": ["-j RETURN"], "OUTPUT": ["-j ISTIO_OUTPUT"]}}
    script = transition_script(live, None).splitlines()
    assert script == [
        "*nat",
        ":ISTIO_OUTPUT - [0:0]",
        "-D OUTPUT -j ISTIO_OUTPUT",
        "-X ISTIO_OUTPUT",
        "COMMIT",
    ]


def test_nothing_to_do_renders_nothing() -> None:
    assert transition_script({}, None) == ""


@pytest.mark.parametrize("backend", BACKENDS)
def test_kernel_spelling_matches_the_kernel_for_every_case(backend: str, netns_factory, tmp_path: Path) -> None:
    """Load each case's restore input and check iptables-save prints exactly what desired_state predicts."""
    for case in CASES:
        namespace = netns_factory()
        if case.needs_groups:
            namespace.add_groups(EXTRA_GROUPS)
        for ruleset in plan_of(case, tmp_path).rulesets:
            text = render_restore(ruleset)
            namespace.run(program(backend, ruleset.family, "restore"), "--noflush", input=text)
            dump = read_save(namespace.run(program(backend, ruleset.family, "save")).stdout)
            kernel = normalised(dump.tables)
            predicted = normalised(desired_state(ruleset, resolve_test_gid))
            assert kernel == predicted, "\n".join(
                [f"{case.name} {ruleset.family}", *diff_states(kernel, predicted, ruleset.family)]
            )
            wanted = desired_state(ruleset, resolve_test_gid)
            assert owned_state(dump, wanted, ruleset.family) == kernel, f"{case.name} {ruleset.family}: ownership"
        namespace.delete()
