"""Validation of every user-supplied value, without root."""

from __future__ import annotations

import ipaddress

import pytest

from istio_iptables.config.sidecar import (
    RawSettings,
    Setting,
    detect_ipv6,
    parse,
    parse_cidr_selection,
    parse_duration,
    parse_ids,
    parse_interfaces,
    parse_loopback_cidr,
    parse_port_selection,
    parse_ports,
    parse_resolv_conf,
    parse_route_table,
)
from istio_iptables.errors import ConfigError, ExitCode
from istio_iptables.xtables.model import PortRange
from tests.support.fakes import FakeHost


def setting(value: str, source: str = "--flag") -> Setting:
    return Setting(value, source)


def parse_with(**values: str) -> object:
    raw = RawSettings(values={name: Setting(value, f"--{name}") for name, value in values.items()})
    return parse(raw, FakeHost())


class TestPorts:
    def test_lists_drop_empty_items_and_duplicates(self) -> None:
        assert parse_ports(setting("6000,7000,,6000,")) == (6000, 7000)

    def test_wildcard_and_empty(self) -> None:
        assert parse_port_selection(setting("*")).wildcard
        assert parse_port_selection(setting("")).empty

    @pytest.mark.parametrize(
        "bad",
        [
            "0", "65536", "-1", "1e3", "http", "8\n0", "80 81", " ", "010", "0x50", "+80", "8\x0b0",
            "9000:8000", "80:65536", "65536:", "0:0", ":0", "1-5", "80::90", "80:90:100", "١٢٣",
            "9" * 5000, "1:" + "9" * 5000,
        ],
    )
    def test_rejects(self, bad: str) -> None:
        with pytest.raises(ConfigError) as error:
            parse_ports(setting(bad, "-b"))
        assert error.value.source == "-b"
        assert error.value.exit_code == ExitCode.INVALID_INPUT

    @pytest.mark.parametrize(
        ("text", "entry"),
        [
            ("8000:9000", PortRange(8000, 9000)),
            (":9000", PortRange(0, 9000)),  # iptables: from 0
            ("8000:", PortRange(8000, 65535)),  # iptables: to 65535
            (":", PortRange(0, 65535)),
            ("0:65535", PortRange(0, 65535)),
            ("8000:8000", 8000),  # a range of one port is the port
            (" 80", 80),  # Istio's restore input drops the spaces around an entry
            ("80 \t", 80),
            (" 1:2 ", PortRange(1, 2)),
            ("65535", 65535),
        ],
    )
    def test_accepts_what_iptables_dport_takes(self, text: str, entry: object) -> None:
        assert parse_ports(setting(text, "-b")) == (entry,)

    def test_lists_mix_ports_and_ranges(self) -> None:
        assert parse_ports(setting("80,8000:9000,80, 8000:9000,7000:7000")) == (80, PortRange(8000, 9000), 7000)

    def test_reversed_range_names_the_flag_and_the_fix(self) -> None:
        with pytest.raises(ConfigError, match="FIRST:LAST") as error:
            parse_with(istio_local_outbound_ports_exclude="9000:8000")
        assert error.value.source == "--istio_local_outbound_ports_exclude"
        with pytest.raises(ConfigError, match="FIRST:LAST"):
            parse_ports(setting("8000-9000", "-o"))

    def test_every_port_list_flag_takes_ranges(self) -> None:
        config = parse_with(
            istio_inbound_ports="8000:9000",
            istio_local_exclude_ports="1:2",
            istio_outbound_ports="3:4",
            istio_local_outbound_ports_exclude="5:6",
        )
        assert config.inbound_ports.ports == (PortRange(8000, 9000),)  # type: ignore[attr-defined]
        assert config.inbound_exclude_ports == (PortRange(1, 2),)  # type: ignore[attr-defined]
        assert config.outbound_ports_include == (PortRange(3, 4),)  # type: ignore[attr-defined]
        assert config.outbound_ports_exclude == (PortRange(5, 6),)  # type: ignore[attr-defined]
        assert "outbound_ports_exclude=5:6" in config.describe()  # type: ignore[attr-defined]


class TestCidrs:
    def test_splits_families_and_canonicalises(self) -> None:
        selection = parse_cidr_selection(setting("10.1.2.3/8,2001:db8::/32"))
        assert selection.of_family(4) == (ipaddress.ip_network("10.0.0.0/8"),)
        assert selection.of_family(6) == (ipaddress.ip_network("2001:db8::/32"),)

    @pytest.mark.parametrize("bad", ["10.0.0.1", "10.0.0.0/33", " 10.0.0.0/8", "fe80::1%eth0/64", "x/8", "10/8"])
    def test_rejects(self, bad: str) -> None:
        with pytest.raises(ConfigError):
            parse_cidr_selection(setting(bad))

    def test_exclude_wildcard_is_istios_error_naming_our_flag(self) -> None:
        with pytest.raises(ConfigError, match="'\\*' is not accepted") as raised:
            parse_with(istio_service_exclude_cidr="*")
        assert "OUTBOUND_IP_RANGES_EXCLUDE" not in str(raised.value)


class TestInterfaces:
    def test_accepts_kernel_names(self) -> None:
        assert parse_interfaces(setting("eth0,not-istio-nic,veth.1@x,ppp+")) == (
            "eth0",
            "not-istio-nic",
            "veth.1@x",
            "ppp+",
        )

    @pytest.mark.parametrize(
        "bad", ["a" * 16, "eth/0", "eth 0", "eth0\n", "-j", "!eth0", ".", "..", "eth:0", "e'th", 'e"th', "ä"]
    )
    def test_rejects(self, bad: str) -> None:
        with pytest.raises(ConfigError):
            parse_interfaces(setting(bad))


class TestIdsMarksTables:
    def test_ids(self) -> None:
        assert parse_ids(setting("3,4,03")) == ("3", "4")
        with pytest.raises(ConfigError):
            parse_ids(setting("root"))
        with pytest.raises(ConfigError):
            parse_ids(setting("4294967295"))

    @pytest.mark.parametrize("bad", ["0", "253", "254", "255", "4294967296", "main", ""])
    def test_route_table(self, bad: str) -> None:
        with pytest.raises(ConfigError):
            parse_route_table(setting(bad))

    def test_mark_must_be_nonzero_number(self) -> None:
        with pytest.raises(ConfigError, match="-t"):
            parse(RawSettings(values={"istio_inbound_tproxy_mark": Setting("0x539", "-t")}), FakeHost())


class TestDefaults:
    def test_istio_defaults(self) -> None:
        config = parse(RawSettings(), FakeHost())
        assert (config.proxy_port, config.inbound_capture_port, config.inbound_tunnel_port) == (
            15001,
            15006,
            15008,
        )
        assert config.proxy_uids == ("1337",) and config.proxy_gids == ("1337",)
        assert config.mode == "REDIRECT" and config.inbound_ports.empty
        assert (config.tproxy_mark, config.route_table) == (1337, 133)

    def test_default_uid_comes_from_envoy_user(self) -> None:
        host = FakeHost(users={"envoy": 101})
        raw = RawSettings(values={"envoy_user": Setting("envoy", "ENVOY_USER")})
        assert parse(raw, host).proxy_uids == ("101",)

    def test_unknown_envoy_user_falls_back_to_1337(self) -> None:
        assert parse(RawSettings(), FakeHost(users={})).proxy_uids == ("1337",)

    @pytest.mark.parametrize("mode", ["tproxy", "NONE", "REDIRECT;"])
    def test_unknown_mode_is_refused_unlike_istio(self, mode: str) -> None:
        with pytest.raises(ConfigError, match="REDIRECT or TPROXY"):
            parse_with(istio_inbound_interception_mode=mode)


class TestOwnerGroups:
    def test_names_must_resolve(self) -> None:
        with pytest.raises(ConfigError, match="no such group"):
            parse(
                RawSettings(values={"owner_groups_include": Setting("nosuchgroup", "ISTIO_OUTBOUND_OWNER_GROUPS")}),
                FakeHost(),
            )

    def test_at_most_64(self) -> None:
        many = ",".join(str(gid) for gid in range(65))
        with pytest.raises(ConfigError, match="at most 64"):
            parse(RawSettings(values={"owner_groups_include": Setting(many, "X")}), FakeHost())

    def test_wildcard_and_empty_mean_everyone(self) -> None:
        for value in ("*", ""):
            raw = RawSettings(values={"owner_groups_include": Setting(value, "X")})
            assert parse(raw, FakeHost()).owner_groups_include is None


def test_loopback_cidr() -> None:
    assert str(parse_loopback_cidr(setting("127.0.0.1/8"))) == "127.0.0.0/8"
    for bad in ("10.0.0.0/8", "127.0.0.1/7", "::1/128", "127.0.0.1"):
        with pytest.raises(ConfigError):
            parse_loopback_cidr(setting(bad))


def test_durations() -> None:
    assert parse_duration(setting("5s")) == 5
    assert parse_duration(setting("1m30s")) == 90
    assert parse_duration(setting("500ms")) == 0.5
    assert parse_duration(setting("2")) == 2
    with pytest.raises(ConfigError):
        parse_duration(setting("5 sec"))


def test_resolv_conf() -> None:
    v4, v6 = parse_resolv_conf(
        "# comment\nnameserver 127.0.0.53\nnameserver ::127.0.0.53\nnameserver fe80::1%eth0\n"
        "nameserver bogus\nsearch example.com\nnameserver 10.0.0.10 # trailing\nnameserver ::ffff:1.2.3.4\n"
    )
    assert [str(a) for a in v4] == ["127.0.0.53", "10.0.0.10", "1.2.3.4"]
    assert [str(a) for a in v6] == ["::7f00:35"]


def test_unreadable_resolv_conf_names_the_flag() -> None:
    raw = RawSettings(flags={"redirect_dns": Setting("true", "--redirect-dns")}, resolv_conf="/nope")
    with pytest.raises(ConfigError, match="--resolv-conf"):
        parse(raw, FakeHost())


@pytest.mark.parametrize(
    ("addresses", "dual_stack", "expected"),
    [
        (["10.0.0.1", "fd00::1"], False, False),
        (["fd00::1", "10.0.0.1"], False, True),
        (["10.0.0.1", "fd00::1"], True, True),
        (["127.0.0.1", "::1", "fe80::1", "fd00::1"], False, True),
        (["10.0.0.1"], True, False),
        ([], False, False),
        (["::ffff:10.0.0.1", "fd00::1"], False, False),
    ],
)
def test_ipv6_detection(addresses: list[str], dual_stack: bool, expected: bool) -> None:
    assert detect_ipv6([ipaddress.ip_address(a) for a in addresses], dual_stack) is expected


def test_auto_detection_is_used_without_a_switch() -> None:
    assert parse(RawSettings(), FakeHost(interface_addresses=["fd00::5"])).enable_ipv6
    assert not parse(RawSettings(enable_ipv6=False), FakeHost(interface_addresses=["fd00::5"])).enable_ipv6


def test_describe_lists_every_setting_readably() -> None:
    raw = RawSettings(
        values={
            "istio_inbound_ports": Setting("*", "-b"),
            "istio_service_exclude_cidr": Setting("10.0.0.0/8,::/0", "-x"),
        }
    )
    lines = parse(raw, FakeHost()).describe().splitlines()
    assert "inbound_ports=*" in lines and "outbound_exclude=10.0.0.0/8,::/0" in lines
    assert "redirect_dns=false" in lines and "owner_groups_include=*" in lines
