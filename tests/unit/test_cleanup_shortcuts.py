"""The cleanup's shortcuts (a CNI DEL, ``--cleanup-only``): each program skipped only when its answer is known.

- ``iptables-nft-save`` is not started for a family the kernel holds no nf_tables table of (it would
  print nothing); any doubt (the kernel's list cannot be had) starts it as before.
- our nft tables are looked for in the kernel's table list; ``nft list tables`` only without it.
- the built-in chains and tables iptables-nft created for our rules go in one ``nft -f`` transaction;
  one by one if the kernel refuses it; a table holding anything else (a set, a map, a chain that
  stayed) stays.
- the kernel's table list itself: nfnetlink messages read in-process (tests/kernel/test_cni_del.py
  compares it with ``nft list tables``).
"""

from __future__ import annotations

import json
import struct
from collections.abc import Sequence
from typing import Any

import pytest

from istio_iptables.net import Family
from istio_iptables.policy.footprint import SIDECAR
from istio_iptables.system import netlink, nf_tables, xtables_backend, xtables_restore
from istio_iptables.system.real import RealSystem
from istio_iptables.system.spawn import Finished

NAT_SAVE = (
    "*nat\n:PREROUTING ACCEPT [0:0]\n:OUTPUT ACCEPT [0:0]\n:ISTIO_OUTPUT - [0:0]\n-A OUTPUT -j ISTIO_OUTPUT\nCOMMIT\n"
)


def finished(args: Sequence[str], stdout: str = "", returncode: int = 0) -> Finished:
    return Finished(tuple(args), returncode, stdout, "")


@pytest.fixture
def saves(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """The saves run_saves starts (each prints NAT_SAVE); no legacy table anywhere."""
    started: list[str] = []

    def run_all(commands: Sequence[Sequence[str]], **_: Any) -> list[Finished]:
        started.extend(command[0].rsplit("/", 1)[-1] for command in commands)
        return [finished(command, NAT_SAVE) for command in commands]

    monkeypatch.setattr(xtables_backend, "run_all", run_all)
    monkeypatch.setattr(xtables_backend, "find_program", lambda name: f"/usr/sbin/{name}")
    monkeypatch.setattr(xtables_backend, "legacy_tables_exist", lambda family: False)
    return started


def test_no_nft_save_for_a_family_without_nf_tables_tables(monkeypatch: pytest.MonkeyPatch, saves: list[str]) -> None:
    monkeypatch.setattr(nf_tables, "table_names", lambda: {("ip", "nat"), ("inet", "foreign")})
    detection = xtables_backend.detect("", (Family.V4, Family.V6))
    assert saves == ["iptables-nft-save"]  # ip6 has no table: ip6tables-nft-save would print nothing
    assert detection.backend.name == "nft"
    assert detection.saves == {Family.V4: NAT_SAVE, Family.V6: ""}


def test_a_fresh_namespace_starts_no_save_at_all(monkeypatch: pytest.MonkeyPatch, saves: list[str]) -> None:
    monkeypatch.setattr(nf_tables, "table_names", set)
    detection = xtables_backend.detect("", (Family.V4, Family.V6))
    assert saves == []
    assert detection.backend.name == "nft" and detection.saves == {Family.V4: "", Family.V6: ""}


def test_without_the_kernels_list_every_save_runs(monkeypatch: pytest.MonkeyPatch, saves: list[str]) -> None:
    monkeypatch.setattr(nf_tables, "table_names", lambda: None)
    xtables_backend.detect("", (Family.V4, Family.V6))
    assert sorted(saves) == ["ip6tables-nft-save", "iptables-nft-save"]


def test_a_forced_legacy_run_never_asks_nf_tables(monkeypatch: pytest.MonkeyPatch, saves: list[str]) -> None:
    def refuse() -> None:
        raise AssertionError("nf_tables asked for a legacy run")

    monkeypatch.setattr(nf_tables, "table_names", refuse)
    xtables_backend.detect("legacy", (Family.V4, Family.V6))


@pytest.mark.parametrize(
    ("tables", "expected"),
    [
        (set(), False),
        ({("ip", "nat"), ("inet", "foreign"), ("ip", "istio-proxy-nat")}, False),  # ours are inet tables
        ({("ip", "nat"), ("inet", "istio-proxy-mangle")}, True),
    ],
)
def test_our_nft_tables_are_looked_for_in_the_kernels_list(
    monkeypatch: pytest.MonkeyPatch, tables: set[tuple[str, str]], expected: bool
) -> None:
    from istio_iptables.system import spawn

    monkeypatch.setattr(nf_tables, "table_names", lambda: tables)
    monkeypatch.setattr(spawn, "run_program", lambda *args, **kwargs: pytest.fail("nft started"))
    assert RealSystem().nft_tables_may_exist(SIDECAR) is expected


def test_nft_list_tables_answers_without_the_kernels_list(monkeypatch: pytest.MonkeyPatch) -> None:
    from istio_iptables.system import spawn

    monkeypatch.setattr(nf_tables, "table_names", lambda: None)
    monkeypatch.setattr(spawn, "which", lambda name: "/usr/sbin/nft")
    monkeypatch.setattr(spawn, "run_program", lambda args, **_: finished(args, "table inet istio-proxy-nat\n"))
    assert RealSystem().nft_tables_may_exist(SIDECAR) is True


# --- the built-in chains and tables iptables-nft created -------------------------------------------


def listing(*objects: dict[str, Any]) -> str:
    return json.dumps({"nftables": [{"metainfo": {"json_schema_version": 1}}, *objects]})


def table(name: str) -> dict[str, Any]:
    return {"table": {"family": "ip", "name": name, "handle": 1}}


def base_chain(table: str, name: str, policy: str = "accept") -> dict[str, Any]:
    return {"chain": {"family": "ip", "table": table, "name": name, "handle": 2, "type": "nat",
                      "hook": name.lower(), "prio": -100, "policy": policy}}


class Nft:
    """``nft`` as run_program sees it: the listing it prints, the scripts it is given, what it refuses."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch, printed: str, refuse_batches: bool = False) -> None:
        self.printed = printed
        self.refuse_batches = refuse_batches
        self.batches: list[str] = []
        self.commands: list[str] = []
        monkeypatch.setattr(xtables_restore, "which", lambda name: "/usr/sbin/nft")
        monkeypatch.setattr(xtables_restore, "run_program", self.run)

    def run(self, args: Sequence[str], *, input: str | None = None, **_: Any) -> Finished:
        if list(args[1:4]) == ["-j", "list", "ruleset"]:
            return finished(args, self.printed)
        if list(args[1:]) == ["-f", "-"]:
            self.batches.append(input or "")
            return finished(args, returncode=1 if self.refuse_batches else 0)
        self.commands.append(args[1])
        return finished(args, returncode=1 if "OUTPUT" in args[1] else 0)


EMPTIED = [("nat", "PREROUTING"), ("nat", "OUTPUT")]


def test_emptied_chains_and_their_table_go_in_one_transaction(monkeypatch: pytest.MonkeyPatch) -> None:
    nft = Nft(monkeypatch, listing(table("nat"), base_chain("nat", "PREROUTING"), base_chain("nat", "OUTPUT")))
    assert xtables_restore._delete_if_empty(Family.V4, EMPTIED, ["nat"], None) is True
    assert nft.batches == ["delete chain ip nat PREROUTING\ndelete chain ip nat OUTPUT\ndelete table ip nat\n"]
    assert nft.commands == []


def test_a_refused_transaction_is_retried_command_by_command(monkeypatch: pytest.MonkeyPatch) -> None:
    nft = Nft(monkeypatch, listing(table("nat"), base_chain("nat", "PREROUTING"), base_chain("nat", "OUTPUT")),
              refuse_batches=True)
    assert xtables_restore._delete_if_empty(Family.V4, EMPTIED, ["nat"], None) is True
    # one command refused (OUTPUT): the others are tried alone; the table still holding OUTPUT stays
    assert nft.commands == ["delete chain ip nat PREROUTING", "delete chain ip nat OUTPUT"]


def test_a_table_holding_a_set_stays(monkeypatch: pytest.MonkeyPatch) -> None:
    foreign_set = {"set": {"family": "ip", "table": "nat", "name": "blocked", "handle": 3, "type": "ipv4_addr"}}
    nft = Nft(monkeypatch, listing(table("nat"), base_chain("nat", "PREROUTING"), base_chain("nat", "OUTPUT"),
                                   foreign_set))
    assert xtables_restore._delete_if_empty(Family.V4, EMPTIED, ["nat"], None) is True
    assert nft.batches == ["delete chain ip nat PREROUTING\ndelete chain ip nat OUTPUT\n"]


def test_a_chain_with_a_rule_or_a_drop_policy_stays_and_so_does_its_table(monkeypatch: pytest.MonkeyPatch) -> None:
    rule = {"rule": {"family": "ip", "table": "nat", "chain": "PREROUTING", "handle": 9, "expr": [{"accept": None}]}}
    nft = Nft(monkeypatch, listing(table("nat"), base_chain("nat", "PREROUTING"), rule,
                                   base_chain("nat", "OUTPUT", policy="drop")))
    assert xtables_restore._delete_if_empty(Family.V4, EMPTIED, ["nat"], None) is False
    assert nft.batches == [] and nft.commands == []


def test_an_unreadable_listing_deletes_nothing(monkeypatch: pytest.MonkeyPatch) -> None:
    nft = Nft(monkeypatch, "not json")
    assert xtables_restore._delete_if_empty(Family.V4, EMPTIED, ["nat"], None) is False
    assert nft.batches == [] and nft.commands == []


# --- the kernel's table list, read in-process ---------------------------------------------------------


def netlink_message(kind: int, body: bytes, sequence: int = 1) -> bytes:
    message = struct.pack("=LHHLL", 16 + len(body), kind, 0, sequence, 0) + body
    return message + b"\0" * (-len(message) % 4)


def table_message(family: int, name: str, sequence: int = 1) -> bytes:
    encoded = name.encode() + b"\0"
    attribute = struct.pack("=HH", 4 + len(encoded), 1) + encoded + b"\0" * (-len(encoded) % 4)
    return netlink_message((10 << 8) | 0, struct.pack("=BBH", family, 0, 0) + attribute, sequence)


class FakeSocket:
    def __init__(self, answers: list[bytes]) -> None:
        self.answers = answers
        self.closed = False

    def settimeout(self, seconds: float) -> None: ...

    def bind(self, address: tuple[int, int]) -> None: ...

    def send(self, data: bytes) -> int:
        return len(data)

    def recv(self, size: int) -> bytes:
        return self.answers.pop(0) if self.answers else b""  # b"": the socket closed

    def close(self) -> None:
        self.closed = True


def with_answers(monkeypatch: pytest.MonkeyPatch, *answers: bytes) -> FakeSocket:
    sock = FakeSocket(list(answers))
    monkeypatch.setattr(netlink.socket, "socket", lambda *args: sock)
    return sock


def test_tables_of_every_family_over_several_reads(monkeypatch: pytest.MonkeyPatch) -> None:
    sock = with_answers(monkeypatch, table_message(2, "nat") + table_message(1, "istio-proxy-nat"),
                        table_message(99, "other", sequence=7)  # an answer to another request: not ours to read
                        + table_message(10, "filter") + netlink_message(3, b"\0" * 4))
    assert nf_tables.table_names() == {("ip", "nat"), ("inet", "istio-proxy-nat"), ("ip6", "filter")}
    assert sock.closed


@pytest.mark.parametrize(
    "answer",
    [
        netlink_message(2, struct.pack("=i", -1) + b"\0" * 16),  # NLMSG_ERROR: EPERM
        table_message(99, "odd") + netlink_message(3, b"\0" * 4),  # a family we do not know
        table_message(2, "nat"),  # no end of the dump before the socket closes
        table_message(2, "nat")[:-8],  # truncated
        b"",  # closed
    ],
)
def test_any_doubt_is_no_answer(monkeypatch: pytest.MonkeyPatch, answer: bytes) -> None:
    sock = with_answers(monkeypatch, answer)
    assert nf_tables.table_names() is None
    assert sock.closed
