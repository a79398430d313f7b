"""How each match and target of the rule model is spelled, in one table (pure).

Every model class has two spellings, side by side in :data:`SPELLINGS`:

- **written**: the iptables arguments this tool writes (restore input, Istio's golden files:
  ``--dport 80``, ``--set-mark 1337``, ``--tproxy-mark 1337/0xffffffff``);
- **saved**: what ``iptables-save`` prints once the kernel stored the rule (``-m tcp --dport 80``,
  hex marks, explicit default masks, ``--ctstate`` in libxt_conntrack's order, gids for group
  names), which :func:`~istio_iptables.xtables.reconcile.canonical_spec` compares with live rules.

Keeping both in one entry per class means a change to one spelling sits next to the other, so the
two cannot drift apart (masks included: a mask other than the full one is printed by both).
Tokens come only from typed values; the callers pass them through
:func:`~istio_iptables.xtables.render.check_token` before any text is written.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Callable, Iterable
from typing import Any

from istio_iptables.net import Family, IPNetwork
from istio_iptables.xtables.model import (
    ALL_PORTS,
    FULL_MASK,
    Address,
    ConnMark,
    ConnMarkRestore,
    ConnMarkSave,
    ConnMarkSet,
    ConnState,
    CtZone,
    Interface,
    Jump,
    L4Protocol,
    Mark,
    Match,
    Owner,
    PortEntry,
    PortRange,
    Ports,
    ProtocolModule,
    Redirect,
    SetMark,
    SetMatch,
    Snat,
    SocketExists,
    Target,
    Tproxy,
    Verdict,
    port_bounds,
)

MULTIPORT_LIMIT = 15  # the kernel's xt_multiport holds at most 15 ports per rule (a range takes 2)
GidResolver = Callable[[str], str]
# The order libxt_conntrack prints --ctstate in, whatever order the rule gave.
_CTSTATE_ORDER = ("INVALID", "NEW", "RELATED", "ESTABLISHED", "UNTRACKED", "SNAT", "DNAT")
# The options iptables-save prints before any module, in this order, whatever order the rule gave.
SAVED_HEAD_ORDER = ("-s", "-d", "-i", "-o", "-p")


class RenderError(ValueError):
    """A value reached the renderer that could change the meaning of the restore input."""


def port_text(entry: PortEntry) -> str:
    """A port or a range in iptables' spelling (``8000``, ``8000:9000``), from checked integers only."""
    first, last = port_bounds(entry)
    if type(first) is not int or type(last) is not int or not 0 <= first <= last <= 65535:
        raise RenderError(f"refusing to render port {entry!r}")
    return str(first) if first == last else f"{first}:{last}"


def multiport_slots(entries: Iterable[PortEntry]) -> int:
    """How much of multiport's 15 places ``entries`` take: the kernel stores a range as two ports."""
    return sum(2 if isinstance(entry, PortRange) else 1 for entry in entries)


def numeric_gid(name: str) -> str:
    """Group names become gids in the kernel; resolve them as iptables would (this process's NSS)."""
    if name.isdigit():
        return name
    import grp

    return str(grp.getgrnam(name).gr_gid)


def kernel_network(network: IPNetwork) -> str:
    """An address as iptables prints it: glibc's inet_ntop keeps embedded IPv4 dotted (``::127.0.0.53``)."""
    address = network.network_address
    if isinstance(address, ipaddress.IPv6Address):
        words = [int.from_bytes(address.packed[i : i + 2], "big") for i in range(0, 16, 2)]
        dotted = str(ipaddress.IPv4Address(address.packed[12:]))
        if words[:6] == [0] * 6 and words[6] != 0:
            return f"::{dotted}/{network.prefixlen}"
        if words[:5] == [0] * 5 and words[5] == 0xFFFF:
            return f"::ffff:{dotted}/{network.prefixlen}"
    return network.compressed


class SavedContext:
    """What the kernel's spelling of a part depends on beyond the part: the rule's protocol (``-m tcp``),
    its family (TPROXY's ``--on-ip``) and how group names become gids."""

    __slots__ = ("family", "protocol", "resolve_gid")

    def __init__(self, family: Family, protocol: str = "tcp", resolve_gid: GidResolver = numeric_gid) -> None:
        self.family = family
        self.protocol = protocol
        self.resolve_gid = resolve_gid


Written = Callable[[Any], list[str]]
Saved = Callable[[Any, SavedContext], list[str]]


class Spelling:
    """One model class in both spellings; ``head`` marks the options iptables-save prints first."""

    __slots__ = ("head", "saved", "written")

    def __init__(self, written: Written, saved: Saved, *, head: bool = False) -> None:
        self.written = written
        self.saved = saved
        self.head = head


def _negated(negate: bool, *tokens: str) -> list[str]:
    return ["!", *tokens] if negate else list(tokens)


def _written_mark(value: int, mask: int) -> str:
    """Marks as Istio writes them: decimal under the full mask, ``0x539/0xfff`` under another one."""
    return str(value) if mask == FULL_MASK else f"{value:#x}/{mask:#x}"


def _saved_mark(value: int, mask: int) -> str:
    """libxt_mark and libxt_connmark print the mask only when it is not the full one."""
    return f"{value:#x}" if mask == FULL_MASK else f"{value:#x}/{mask:#x}"


def _address_option(match: Address) -> str:
    return "-s" if match.direction == "src" else "-d"


def _interface_option(match: Interface) -> str:
    return "-i" if match.direction == "in" else "-o"


def _written_ports(match: Ports) -> list[str]:
    if len(match.ports) == 1:
        option = "--sport" if match.direction == "src" else "--dport"
        return _negated(match.negate, option, port_text(match.ports[0]))
    if multiport_slots(match.ports) > MULTIPORT_LIMIT:
        raise RenderError(f"multiport takes at most {MULTIPORT_LIMIT} ports (a range counts 2), got {match.ports}")
    option = "--sports" if match.direction == "src" else "--dports"
    return ["-m", "multiport", *_negated(match.negate, option, ",".join(map(port_text, match.ports)))]


def _saved_ports(match: Ports, context: SavedContext) -> list[str]:
    if len(match.ports) == 1:
        if match.ports[0] == ALL_PORTS and not match.negate:
            return ["-m", context.protocol]  # the kernel keeps no port test that every port passes
        option = "--sport" if match.direction == "src" else "--dport"
        return ["-m", context.protocol, *_negated(match.negate, option, port_text(match.ports[0]))]
    option = "--sports" if match.direction == "src" else "--dports"
    return ["-m", "multiport", *_negated(match.negate, option, ",".join(map(port_text, match.ports)))]


def _saved_owner(match: Owner, context: SavedContext) -> list[str]:
    owner = context.resolve_gid(match.id) if match.kind == "gid" else match.id
    return ["-m", "owner", *_negated(match.negate, f"--{match.kind}-owner", owner)]


def _saved_tproxy(target: Tproxy, context: SavedContext) -> list[str]:
    on_ip = "0.0.0.0" if context.family is Family.V4 else "::"
    mark = f"{target.mark:#x}/{target.mask:#x}"
    return ["-j", "TPROXY", "--on-port", str(target.port), "--on-ip", on_ip, "--tproxy-mark", mark]


def _written_set_mark(target: SetMark) -> list[str]:
    if target.mask != FULL_MASK:
        return ["-j", "MARK", "--set-xmark", _written_mark(target.value, target.mask)]
    return ["-j", "MARK", "--set-mark", str(target.value)]


def _saved_connmark_copy(option: str) -> Saved:
    """libxt_CONNMARK prints the default masks of ``--save-mark``/``--restore-mark``."""
    full = f"{FULL_MASK:#x}"
    return lambda _target, _context: ["-j", "CONNMARK", option, "--nfmask", full, "--ctmask", full]


def _written_connmark_restore(target: ConnMarkRestore) -> list[str]:
    """Istio's sidecar rules write the bare ``--restore-mark``; ambient's give both masks."""
    tokens = ["-j", "CONNMARK", "--restore-mark"]
    for option, mask in (("--nfmask", target.nfmask), ("--ctmask", target.ctmask)):
        tokens += [option, f"{mask:#x}"] if mask is not None else []
    return tokens


def _saved_connmark_restore(target: ConnMarkRestore, _context: SavedContext) -> list[str]:
    """libxt_CONNMARK prints both masks, the full one where the rule gave none."""
    nfmask = FULL_MASK if target.nfmask is None else target.nfmask
    ctmask = FULL_MASK if target.ctmask is None else target.ctmask
    return ["-j", "CONNMARK", "--restore-mark", "--nfmask", f"{nfmask:#x}", "--ctmask", f"{ctmask:#x}"]


SPELLINGS: dict[type, Spelling] = {
    # --- matches ---
    L4Protocol: Spelling(
        lambda m: _negated(m.negate, "-p", m.name),
        lambda m, _c: _negated(m.negate, "-p", m.name),
        head=True,
    ),
    Address: Spelling(
        lambda m: _negated(m.negate, _address_option(m), str(m.network)),
        lambda m, _c: _negated(m.negate, _address_option(m), kernel_network(m.network)),
        head=True,
    ),
    Interface: Spelling(
        lambda m: _negated(m.negate, _interface_option(m), m.name),
        lambda m, _c: _negated(m.negate, _interface_option(m), m.name),
        head=True,
    ),
    Ports: Spelling(_written_ports, _saved_ports),
    Owner: Spelling(lambda m: ["-m", "owner", *_negated(m.negate, f"--{m.kind}-owner", m.id)], _saved_owner),
    Mark: Spelling(
        lambda m: ["-m", "mark", *_negated(m.negate, "--mark", _written_mark(m.value, m.mask))],
        lambda m, _c: ["-m", "mark", *_negated(m.negate, "--mark", _saved_mark(m.value, m.mask))],
    ),
    ConnMark: Spelling(
        lambda m: ["-m", "connmark", *_negated(m.negate, "--mark", _written_mark(m.value, m.mask))],
        lambda m, _c: ["-m", "connmark", *_negated(m.negate, "--mark", _saved_mark(m.value, m.mask))],
    ),
    ConnState: Spelling(
        lambda m: ["-m", "conntrack", "--ctstate", ",".join(m.states)],
        lambda m, _c: ["-m", "conntrack", "--ctstate", ",".join(s for s in _CTSTATE_ORDER if s in m.states)],
    ),
    SetMatch: Spelling(
        lambda m: ["-m", "set", *_negated(m.negate, "--match-set", m.name, m.direction)],
        lambda m, _c: ["-m", "set", *_negated(m.negate, "--match-set", m.name, m.direction)],
    ),
    ProtocolModule: Spelling(lambda m: ["-m", m.name], lambda m, _c: ["-m", m.name]),
    SocketExists: Spelling(
        lambda _m: ["-m", "owner", "--socket-exists"], lambda _m, _c: ["-m", "owner", "--socket-exists"]
    ),
    # --- targets ---
    Jump: Spelling(lambda t: ["-j", t.chain], lambda t, _c: ["-j", t.chain]),
    Verdict: Spelling(lambda t: ["-j", t.name], lambda t, _c: ["-j", t.name]),
    Redirect: Spelling(
        lambda t: ["-j", "REDIRECT", "--to-ports", str(t.port)],
        lambda t, _c: ["-j", "REDIRECT", "--to-ports", str(t.port)],
    ),
    Tproxy: Spelling(
        lambda t: ["-j", "TPROXY", "--tproxy-mark", f"{t.mark}/{t.mask:#x}", "--on-port", str(t.port)],
        _saved_tproxy,
    ),
    SetMark: Spelling(
        _written_set_mark,
        lambda t, _c: ["-j", "MARK", "--set-xmark", f"{t.value:#x}/{t.mask:#x}"],
    ),
    ConnMarkSet: Spelling(
        lambda t: ["-j", "CONNMARK", "--set-xmark", f"{t.value:#x}/{t.mask:#x}"],
        lambda t, _c: ["-j", "CONNMARK", "--set-xmark", f"{t.value:#x}/{t.mask:#x}"],
    ),
    ConnMarkSave: Spelling(lambda _t: ["-j", "CONNMARK", "--save-mark"], _saved_connmark_copy("--save-mark")),
    ConnMarkRestore: Spelling(_written_connmark_restore, _saved_connmark_restore),
    Snat: Spelling(
        lambda t: ["-j", "SNAT", "--to-source", str(t.address)],
        lambda t, _c: ["-j", "SNAT", "--to-source", str(t.address)],
    ),
    CtZone: Spelling(lambda t: ["-j", "CT", "--zone", str(t.zone)], lambda t, _c: ["-j", "CT", "--zone", str(t.zone)]),
}


def spelling_of(part: Match | Target) -> Spelling:
    spelling = SPELLINGS.get(type(part))
    if spelling is None:
        raise TypeError(f"unknown match or target {part!r}")
    return spelling


def written_tokens(part: Match | Target) -> list[str]:
    """``part`` as this tool writes it (restore input, dry run, explain's rule texts)."""
    return spelling_of(part).written(part)


def saved_tokens(part: Match | Target, context: SavedContext) -> list[str]:
    """``part`` as ``iptables-save`` prints it once the kernel stored it."""
    return spelling_of(part).saved(part, context)
