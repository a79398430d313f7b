"""Masked marks in the kernel's spelling: what ``canonical_spec`` predicts is what iptables-save prints.

Istio's ambient rules (``../shared/conformance/istio/ambient/iptables/*.golden``) match and set
marks under a mask (``-m mark --mark 0x539/0xfff``, ``-j CONNMARK --set-xmark 0x111/0xfff``); if
the kernel spelling dropped a mask, every run would read its own rules as drift.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from istio_iptables.net import Family
from istio_iptables.xtables.model import (
    RETURN,
    ConnMark,
    ConnMarkRestore,
    ConnMarkSave,
    ConnMarkSet,
    CtZone,
    Interface,
    Jump,
    L4Protocol,
    Mark,
    Ports,
    Redirect,
    Rule,
    RuleSet,
    SetMark,
    Verdict,
)
from istio_iptables.xtables.reconcile import canonical_spec, desired_state, diff_states, normalised
from istio_iptables.xtables.render import render_restore
from istio_iptables.xtables.save import read_save
from tests.support.apply_support import BACKENDS, program
from tests.support.netns import NetNS

MESH_MARK, MASK = 0x539, 0xFFF  # ambient: packets from ztunnel
CONNECTION_MARK = 0x111  # ambient: connections that came in through ztunnel
TCP, UDP = L4Protocol("tcp"), L4Protocol("udp")
ACCEPT = Verdict("ACCEPT")


def ambient_like(family: Family) -> RuleSet:
    """The mark shapes of Istio's ambient rules, with a few full-mask ones beside them."""
    rules = RuleSet(family)
    for table in ("mangle", "nat", "raw"):
        rules.append(table, "PREROUTING", target=Jump("ISTIO_PRERT"))
        rules.append(table, "OUTPUT", target=Jump("ISTIO_OUTPUT"))
    rules.append("mangle", "ISTIO_PRERT", Mark(MESH_MARK, mask=MASK), target=ConnMarkSet(CONNECTION_MARK, MASK))
    rules.append("mangle", "ISTIO_PRERT", Mark(MESH_MARK), target=ConnMarkSet(CONNECTION_MARK))
    rules.append("mangle", "ISTIO_PRERT", TCP, Mark(0, mask=MASK), target=ConnMarkSave())
    rules.append("mangle", "ISTIO_OUTPUT", ConnMark(CONNECTION_MARK, mask=MASK), target=ConnMarkRestore())
    rules.append("mangle", "ISTIO_OUTPUT", ConnMark(CONNECTION_MARK, negate=True, mask=MASK), target=RETURN)
    rules.append("mangle", "ISTIO_OUTPUT", Interface("out", "lo"), target=SetMark(CONNECTION_MARK, MASK))
    rules.append("mangle", "ISTIO_OUTPUT", TCP, Mark(MESH_MARK), target=SetMark(MESH_MARK))
    rules.append("nat", "ISTIO_PRERT", TCP, Ports("dst", (15008,), negate=True), Mark(MESH_MARK, True, MASK),
                 target=Redirect(15006))
    rules.append("nat", "ISTIO_OUTPUT", TCP, Mark(CONNECTION_MARK, mask=MASK), target=ACCEPT)
    rules.append("nat", "ISTIO_OUTPUT", TCP, Mark(MESH_MARK, negate=True, mask=MASK), target=Redirect(15001))
    rules.append("raw", "ISTIO_OUTPUT", UDP, Mark(MESH_MARK, mask=MASK), Ports("dst", (53,)), target=CtZone(1))
    rules.append("raw", "ISTIO_PRERT", UDP, Mark(MESH_MARK, True, MASK), Ports("src", (53,)), target=CtZone(1))
    return rules


@pytest.mark.parametrize(
    ("matches", "target", "spelling"),
    [
        ((Mark(MESH_MARK, mask=MASK),), ConnMarkSet(CONNECTION_MARK, MASK),
         "-m mark --mark 0x539/0xfff -j CONNMARK --set-xmark 0x111/0xfff"),
        ((ConnMark(CONNECTION_MARK, mask=MASK),), ConnMarkRestore(),
         "-m connmark --mark 0x111/0xfff -j CONNMARK --restore-mark --nfmask 0xffffffff --ctmask 0xffffffff"),
        ((TCP, Mark(MESH_MARK, negate=True, mask=MASK)), Redirect(15001),
         "-p tcp -m mark ! --mark 0x539/0xfff -j REDIRECT --to-ports 15001"),
        ((Mark(MESH_MARK),), SetMark(0x111, MASK), "-m mark --mark 0x539 -j MARK --set-xmark 0x111/0xfff"),
        ((Mark(MESH_MARK),), SetMark(0x111), "-m mark --mark 0x539 -j MARK --set-xmark 0x111/0xffffffff"),
    ],
)
def test_masks_are_spelled_as_the_kernel_prints_them(matches, target, spelling: str) -> None:
    assert canonical_spec(Rule("mangle", "ISTIO_PRERT", matches, target), Family.V4) == spelling


def test_the_input_spelling_keeps_the_masks_too() -> None:
    text = render_restore(ambient_like(Family.V4))
    assert "-m mark --mark 0x539/0xfff -j CONNMARK --set-xmark 0x111/0xfff" in text
    assert "-m connmark --mark 0x111/0xfff -j CONNMARK --restore-mark" in text
    assert "-o lo -j MARK --set-xmark 0x111/0xfff" in text


@pytest.mark.parametrize("backend", BACKENDS)
def test_masked_marks_read_back_exactly_as_predicted(backend: str, netns: NetNS, tmp_path: Path) -> None:
    lock = {"XTABLES_LOCKFILE": str(tmp_path / "xtables.lock")}  # not the global lock other tests wait on
    for family in (Family.V4, Family.V6):
        ruleset = ambient_like(family)
        netns.run(program(backend, family, "restore"), "--noflush", input=render_restore(ruleset), env=lock)
        dump = read_save(netns.run(program(backend, family, "save"), env=lock).stdout)
        kernel, predicted = normalised(dump.tables), normalised(desired_state(ruleset))
        assert kernel == predicted, "\n".join(diff_states(kernel, predicted, family))
