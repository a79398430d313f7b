"""The real :class:`~istio_iptables.config.Host`: users, groups, addresses and files of this machine."""

from __future__ import annotations

import grp
import ipaddress
import json
import pwd
import shutil
import subprocess

from istio_iptables.errors import EnvironmentProblem


class RealHost:
    def user_uid(self, name: str) -> int | None:
        try:
            return pwd.getpwnam(name).pw_uid
        except KeyError:
            return None

    def group_exists(self, name: str) -> bool:
        try:
            grp.getgrnam(name)
        except KeyError:
            return False
        return True

    def addresses(self) -> list[ipaddress.IPv4Address | ipaddress.IPv6Address]:
        """Addresses by interface index, IPv4 before IPv6 within an interface, as Go lists them."""
        ip = shutil.which("ip")
        if ip is None:
            raise EnvironmentProblem(
                "cannot detect IPv6: the 'ip' command (iproute2) is missing; "
                "install it or pass --enable-ipv6/--disable-ipv6"
            )
        listing = subprocess.run([ip, "-j", "addr", "show"], capture_output=True, text=True, check=False)
        if listing.returncode != 0:
            raise EnvironmentProblem(f"cannot list addresses with 'ip -j addr show': {listing.stderr.strip()}")
        found: list[ipaddress.IPv4Address | ipaddress.IPv6Address] = []
        for link in sorted(json.loads(listing.stdout or "[]"), key=lambda link: link.get("ifindex", 0)):
            infos = link.get("addr_info", [])
            for family in ("inet", "inet6"):
                found.extend(
                    ipaddress.ip_address(info["local"].split("%")[0])
                    for info in infos
                    if info.get("family") == family and "local" in info
                )
        return found

    def read_text(self, path: str) -> str:
        with open(path, encoding="utf-8", errors="replace") as handle:
            return handle.read()
