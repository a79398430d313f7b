"""The pure state layer: save parsing, the kernel-spelling renderer, ownership and order-aware diffs."""

from __future__ import annotations

from pathlib import Path

import pytest

from istio_iptables.apply.state import (
    builtin_shape_is_ours,
    desired_state,
    diff_states,
    jumps_to_own_chain,
    normalised,
    owned_state,
    parse_save,
    transition_script,
)
from istio_iptables.capture import build_plan
from istio_iptables.model import BUILTIN_CHAINS, Family
from istio_iptables.render import render_restore
from tests.apply_support import BACKENDS, FOREIGN_V4, case_args, config_of, program, resolve_test_gid
from tests.conformance import EXTRA_GROUPS, load_cases

CASES = load_cases()


def plan_of(case, tmp_path: Path):
    return build_plan(config_of(case_args(case, tmp_path), case.env))


def test_parse_save_keeps_order_and_chains() -> None:
    dump = parse_save(FOREIGN_V4)
    assert list(dump.tables) == ["filter", "nat", "mangle", "raw"]
    assert dump.tables["nat"]["FOREIGN_NAT"] == ["-j RETURN"]
    assert dump.tables["filter"]["OUTPUT"] == ["-j FOREIGN_FW"]
    assert dump.policies["filter"]["FOREIGN_FW"] == "-"


def test_foreign_rules_are_not_ours() -> None:
    assert owned_state(parse_save(FOREIGN_V4)) == {}


@pytest.mark.parametrize("case", CASES, ids=lambda case: case.name)
def test_every_builtin_chain_rule_we_write_is_recognised_as_ours(case, tmp_path: Path) -> None:
    for ruleset in plan_of(case, tmp_path).rulesets:
        for table, chains in desired_state(ruleset, resolve_test_gid).items():
            for chain, specs in chains.items():
                if chain in BUILTIN_CHAINS:
                    for spec in specs:
                        assert jumps_to_own_chain(spec) or builtin_shape_is_ours(table, chain, spec), spec


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
            dump = parse_save(namespace.run(program(backend, ruleset.family, "save")).stdout)
            kernel = normalised(dump.tables)
            predicted = normalised(desired_state(ruleset, resolve_test_gid))
            assert kernel == predicted, "\n".join(
                [f"{case.name} {ruleset.family}", *diff_states(kernel, predicted, ruleset.family)]
            )
            assert owned_state(dump) == kernel, f"{case.name} {ruleset.family}: ownership"
        namespace.delete()
