"""Istio's conformance data in ../shared/conformance: the cases and their golden rules."""

from __future__ import annotations

import ipaddress
import json
import os
import re
from dataclasses import dataclass
from pathlib import Path

from tests.support.netns import NetNS, canonical_save

CONFORMANCE_DIR = Path(
    os.environ.get("ISTIO_CONFORMANCE_DIR", Path(__file__).resolve().parents[3] / "shared" / "conformance")
)
# Groups the owner-group cases name; the test namespaces get them, the machine does not.
EXTRA_GROUPS = {"java": 60001, "ftp": 60002}


@dataclass(frozen=True)
class Case:
    name: str
    argv: tuple[str, ...]
    env: dict[str, str]
    ipv6: bool
    resolv_conf: str | None
    golden_iptables: Path | None
    golden_nftables: Path | None

    def cli_args(self, resolv_conf_path: str | None = None) -> list[str]:
        """Our argv for this case: Istio's flags plus the IPv6 switch and the resolv.conf file."""
        args = [*self.argv, "--enable-ipv6" if self.ipv6 else "--disable-ipv6"]
        if self.resolv_conf is not None and resolv_conf_path is not None:
            args += ["--resolv-conf", resolv_conf_path]
        return args

    @property
    def needs_groups(self) -> bool:
        return any(group in value for value in self.env.values() for group in EXTRA_GROUPS)


def load_cases() -> list[Case]:
    entries = json.loads((CONFORMANCE_DIR / "cases.json").read_text())
    return [
        Case(
            name=entry["name"],
            argv=tuple(entry["argv"]),
            env=dict(entry["env"]),
            ipv6=entry["ipv6"],
            resolv_conf=entry["resolv_conf"],
            golden_iptables=CONFORMANCE_DIR / entry["golden_iptables"] if entry["golden_iptables"] else None,
            golden_nftables=CONFORMANCE_DIR / entry["golden_nftables"] if entry["golden_nftables"] else None,
        )
        for entry in entries
    ]


def golden_restore_documents(path: Path) -> list[str]:
    """Split an iptables golden transcript into its restore inputs: [IPv4] or [IPv4, IPv6].

    Tables come sorted within one input, so a ``* table`` header that does not sort after the
    previous one starts the next family's input. ``-N X`` lines stay (iptables-restore takes them).
    """
    documents: list[list[str]] = []
    previous_table = None
    for line in path.read_text().splitlines():
        if line in ("iptables-save", "ip6tables-save") or not line.strip():
            continue
        if line.startswith("* "):
            table = line[2:].strip()
            if previous_table is None or table <= previous_table:
                documents.append([])
            previous_table = table
        documents[-1].append(line)
    return ["\n".join(lines) + "\n" for lines in documents]


def _canonical_cidr(match: re.Match[str]) -> str:
    return str(ipaddress.ip_network(match.group(0), strict=False))


def normalise(text: str) -> str:
    """Spellings the kernel treats as equal: --to-port/--to-ports, non-canonical CIDRs."""
    text = text.replace("--to-port ", "--to-ports ")
    return re.sub(r"[0-9a-fA-F.:]*[.:][0-9a-fA-F.:]*/[0-9]+", _canonical_cidr, text)


def restore_programs(backend: str, family_index: int) -> tuple[str, str]:
    """The restore and save programs of one iptables backend for a family (0: IPv4, 1: IPv6)."""
    prefix = "iptables" if family_index == 0 else "ip6tables"
    return f"{prefix}-{backend}-restore", f"{prefix}-{backend}-save"


def load_into_kernel(namespace: NetNS, documents: list[str], backend: str) -> list[list[str]]:
    """Load each family's document with ``restore --noflush`` and return each family's canonical dump."""
    dumps = []
    for index, document in enumerate(documents):
        restore, save = restore_programs(backend, index)
        loaded = namespace.run(restore, "--noflush", input=document, check=False)
        assert loaded.returncode == 0, f"{restore} refused:\n{loaded.stderr}\n{document}"
        dumps.append(canonical_save(namespace.save(save)))
    return dumps
