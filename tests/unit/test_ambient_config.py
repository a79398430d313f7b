"""The ambient configuration slice and its command line (no root): flags, Istio's variables,
validation (exit 2, naming the flag or variable), and runs that are not built yet."""

from __future__ import annotations

import ipaddress
import os
import subprocess
import sys

import pytest

from istio_iptables.config.ambient import (
    AMBIENT_SETTINGS,
    DEFAULT_PROBE_SNAT_V4,
    AmbientConfig,
    AmbientRawSettings,
    parse_ambient,
)
from istio_iptables.config.sidecar import Setting
from istio_iptables.errors import ConfigError

CLI = [sys.executable, "-m", "istio_iptables", "ambient"]


def parse(**values: str) -> AmbientConfig:
    settings = {name: Setting(value, f"--{name}") for name, value in values.items()}
    return parse_ambient(AmbientRawSettings(values=settings))


def run(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    clean = {key: value for key, value in os.environ.items() if not key.startswith(("AMBIENT_", "HOST_PROBE"))}
    return subprocess.run([*CLI, *args], capture_output=True, text=True, env={**clean, **(env or {})}, check=False)


def test_defaults_are_istios() -> None:
    config = parse()
    assert config.scope == "pod" and not config.redirect_dns and not config.enable_ipv6
    assert config.host_probe_snat_ipv4 == DEFAULT_PROBE_SNAT_V4
    assert str(config.host_probe_snat_ipv6) == "fd16:9254:7127:1337:ffff:ffff:ffff:ffff"


@pytest.mark.parametrize(("global_dns", "pod_dns", "captured"), [
    ("true", "unset", True), ("false", "unset", False), ("false", "enabled", True), ("true", "disabled", False),
])
def test_the_pod_annotation_wins_over_the_global_dns_setting(global_dns: str, pod_dns: str, captured: bool) -> None:
    assert parse(redirect_dns=global_dns, pod_dns=pod_dns).dns_capture is captured


@pytest.mark.parametrize(("name", "value"), [
    ("host_probe_snat_ipv4", "fd00::1"), ("host_probe_snat_ipv4", "10.0.0.0/8"), ("host_probe_snat_ipv4", "0.0.0.0"),
    ("host_probe_snat_ipv6", "169.254.7.127"), ("pod_dns", "yes"), ("virtual_interfaces", "a b"),
    ("kubelet_uid", "-1"), ("kubelet_uid", "4294967295"), ("redirect_dns", "maybe"), ("force_iptables_binary", "x"),
])
def test_bad_values_name_their_source(name: str, value: str) -> None:
    with pytest.raises(ConfigError) as raised:
        parse(**{name: value})
    assert f"--{name}" in str(raised.value)


def test_native_host_rules_need_the_kubelet_uid() -> None:
    with pytest.raises(ConfigError, match="--kubelet-uid"):
        parse(host="true", native_nftables="true")
    assert parse(host="true", native_nftables="true", kubelet_uid="0").kubelet_uid == 0


def test_every_variable_is_istios() -> None:
    variables = {setting.flag: setting.istio for setting in AMBIENT_SETTINGS if setting.envvar}
    assert variables["--redirect-dns"] == "AMBIENT_DNS_CAPTURE"
    assert variables["--host-probe-snat-ipv4"] == "HOST_PROBE_SNAT_IP"
    assert variables["--host-probe-snat-ipv6"] == "HOST_PROBE_SNAT_IPV6"
    assert variables["--reconcile"] == "AMBIENT_RECONCILE_POD_RULES_ON_STARTUP"
    assert variables["--native-nftables"] == "NATIVE_NFTABLES"


def test_variables_set_what_flags_set() -> None:
    by_flag = run("--dry-run", "--redirect-dns", "--host-probe-snat-ipv4", "169.254.9.9", "--enable-ipv6")
    by_env = run("--dry-run", env={"AMBIENT_DNS_CAPTURE": "true", "HOST_PROBE_SNAT_IP": "169.254.9.9",
                                   "AMBIENT_IPV6": "true"})
    assert by_flag.returncode == by_env.returncode == 0, by_env.stderr
    assert by_flag.stdout == by_env.stdout
    assert "169.254.9.9" in by_env.stdout and "15053" in by_env.stdout and "ip6tables-restore" in by_env.stdout


def test_a_bad_variable_exits_2_naming_it() -> None:
    result = run("--dry-run", env={"HOST_PROBE_SNAT_IP": "x\n-A INPUT -j DROP"})
    assert result.returncode == 2
    assert "HOST_PROBE_SNAT_IP" in result.stderr and "\n-A INPUT" not in result.stderr
    assert result.stdout == ""


def test_pflag_booleans() -> None:
    on, off = run("--dry-run", "--redirect-dns"), run("--dry-run", "--redirect-dns=false")
    assert "15053" in on.stdout and "15053" not in off.stdout


def test_a_bad_value_of_a_real_run_exits_2_before_any_namespace_is_touched() -> None:
    # (Real runs are tested in network namespaces: tests/kernel/test_ambient_engine.py.)
    result = run("--network-namespace", "/nonexistent/ns", "--host-probe-snat-ipv4", "300.1.1.1")
    assert result.returncode == 2 and "--host-probe-snat-ipv4" in result.stderr


def test_probe_address_in_the_rules() -> None:
    text = run("--dry-run", "--host-probe-snat-ipv4", "169.254.1.1").stdout
    assert "-s 169.254.1.1/32" in text and str(ipaddress.ip_address("169.254.1.1")) in text


def test_typo_of_the_subcommand_is_named() -> None:
    result = subprocess.run([sys.executable, "-m", "istio_iptables", "ambeint"], capture_output=True, text=True)
    assert result.returncode == 2 and "ambient" in result.stderr


@pytest.mark.parametrize(("args", "flag"), [
    (("--host", "--enrol", "10.0.0.2"), "--pod-uid"),
    (("--enrol", "10.0.0.2", "--pod-uid", "u"), "--enrol"),
    (("--host", "--enrol", "fd00::2", "--pod-uid", "u"), "--enrol"),
    (("--host", "--enrol", "10.0.0.0/24", "--pod-uid", "u"), "--enrol"),
    (("--host", "--enrol", "10.0.0.2", "--pod-uid", 'u" ; flush ruleset ; "'), "--pod-uid"),
    (("--host", "--unenrol", "x"), "--unenrol"),
])
def test_probe_set_updates_are_validated(args: tuple[str, ...], flag: str) -> None:
    result = run("--dry-run", *args)
    assert result.returncode == 2 and flag in result.stderr and result.stdout == ""
