"""The spelling table: every match and target of the rule model has both spellings (no root).

The kernel's spelling against iptables-save itself is pinned in tests/kernel/test_kernel_spelling.py.
"""

from __future__ import annotations

import ipaddress
import typing

import pytest

from istio_iptables.net import Family
from istio_iptables.xtables import model
from istio_iptables.xtables.model import (
    Address,
    ConnMark,
    ConnMarkSet,
    Interface,
    L4Protocol,
    Mark,
    Owner,
    PortRange,
    Ports,
    SetMark,
    Tproxy,
    Unsupported,
)
from istio_iptables.xtables.spelling import SPELLINGS, SavedContext, saved_tokens, spelling_of, written_tokens


def _model_classes(alias: object) -> set[type]:
    return {member for member in typing.get_args(alias) if member is not Unsupported}


def test_every_match_and_target_of_the_model_has_both_spellings() -> None:
    parts = _model_classes(model.Match) | _model_classes(model.Target)
    assert parts == set(SPELLINGS), "a model class without a spelling (or a spelling without a class)"
    for spelling in SPELLINGS.values():
        assert callable(spelling.written) and callable(spelling.saved)


def test_unknown_parts_are_refused_not_guessed() -> None:
    with pytest.raises(TypeError):
        spelling_of(Unsupported("-m foo"))


V4 = SavedContext(Family.V4)


@pytest.mark.parametrize(
    ("part", "written", "saved"),
    [
        (Mark(0x539), "-m mark --mark 1337", "-m mark --mark 0x539"),
        (Mark(0x539, mask=0xFFF), "-m mark --mark 0x539/0xfff", "-m mark --mark 0x539/0xfff"),
        (ConnMark(0x111, True, 0xFFF), "-m connmark ! --mark 0x111/0xfff", "-m connmark ! --mark 0x111/0xfff"),
        (SetMark(0x539), "-j MARK --set-mark 1337", "-j MARK --set-xmark 0x539/0xffffffff"),
        (SetMark(0x111, 0xFFF), "-j MARK --set-xmark 0x111/0xfff", "-j MARK --set-xmark 0x111/0xfff"),
        (ConnMarkSet(0x111, 0xFFF), "-j CONNMARK --set-xmark 0x111/0xfff", "-j CONNMARK --set-xmark 0x111/0xfff"),
        (Tproxy(15006, 0x539), "-j TPROXY --tproxy-mark 1337/0xffffffff --on-port 15006",
         "-j TPROXY --on-port 15006 --on-ip 0.0.0.0 --tproxy-mark 0x539/0xffffffff"),
        (Ports("dst", (80,)), "--dport 80", "-m tcp --dport 80"),
        (Ports("dst", (80, PortRange(8000, 9000))), "-m multiport --dports 80,8000:9000",
         "-m multiport --dports 80,8000:9000"),
        (Owner("uid", "1337", True), "-m owner ! --uid-owner 1337", "-m owner ! --uid-owner 1337"),
        (Address("dst", ipaddress.ip_network("127.0.0.6/32")), "-d 127.0.0.6/32", "-d 127.0.0.6/32"),
        (Interface("out", "lo", True), "! -o lo", "! -o lo"),
        (L4Protocol("udp"), "-p udp", "-p udp"),
    ],
)
def test_both_spellings_side_by_side(part, written: str, saved: str) -> None:
    assert " ".join(written_tokens(part)) == written
    assert " ".join(saved_tokens(part, V4)) == saved


def test_masks_survive_in_both_spellings() -> None:
    """A mask other than the full one is never dropped (the defect issue 13 named)."""
    for part in (Mark(1, mask=0xFF), ConnMark(1, mask=0xFF), SetMark(1, 0xFF), ConnMarkSet(1, 0xFF)):
        assert "0x1/0xff" in written_tokens(part)
        assert "0x1/0xff" in saved_tokens(part, V4)


# What the kernel's spelling of each model class reads back as (xtables/save.py), so the spelling
# table and the reader cannot disagree (ambient's shapes included).
ROUND_TRIP = [
    L4Protocol("tcp"),
    Address("src", ipaddress.ip_network("10.0.0.0/8"), True),
    Interface("in", "eth+"),
    Ports("dst", (15008,), True),
    Ports("src", (53, PortRange(8000, 9000))),
    Owner("gid", "1337"),
    Mark(0x539),
    Mark(0x539, True, 0xFFF),
    ConnMark(0x111, mask=0xFFF),
    model.ConnState(("NEW", "ESTABLISHED")),
    model.SetMatch("istio-v4-out-excl", "dst", True),
    model.Jump("ISTIO_OUTPUT"),
    model.Verdict("RETURN"),
    model.Redirect(15001),
    Tproxy(15006, 0x539),
    SetMark(0x111, 0xFFF),
    model.ConnMarkSave(),
    model.ConnMarkRestore(),
    model.CtZone(1),
    ConnMarkSet(0x111, 0xFFF),
    model.ConnMarkRestore(0xFFF, 0xFFF),
    model.SocketExists(),
    model.Snat(ipaddress.ip_address("169.254.7.127")),
]
# A bare ``-m tcp`` (ambient's ``-p tcp -m tcp``) matches nothing more than ``-p tcp``: the reader
# drops it, and drift compares the kernel's text, where it stays.
NOT_READ_BACK = {model.ProtocolModule}


def test_the_round_trip_list_covers_the_table() -> None:
    assert {type(part) for part in ROUND_TRIP} | NOT_READ_BACK == set(SPELLINGS)


@pytest.mark.parametrize("part", ROUND_TRIP, ids=repr)
def test_the_kernel_spelling_reads_back_as_the_same_part(part) -> None:
    from istio_iptables.xtables.save import parse_rule_spec

    is_target = type(part) in set(typing.get_args(model.Target))
    tokens = saved_tokens(part, V4)
    matches, target = parse_rule_spec(tokens if is_target else [*tokens, "-j", "ACCEPT"])
    assert (target if is_target else matches) == (part if is_target else (part,))
