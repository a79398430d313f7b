"""The one pod mapping (istio_iptables/frontends/pod.py): Istio's skip decisions and settings, no root needed."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from istio_iptables.config.sidecar import RawSettings, parse
from istio_iptables.errors import ConfigError
from istio_iptables.frontends.pod import go_bool, load_pod, pod_info, pod_settings, skip_reason
from tests.support.cni_support import sidecar_pod
from tests.support.fakes import FakeHost

CLI = [sys.executable, "-m", "istio_iptables"]


def config_of(pod: dict[str, Any], **environ: str) -> Any:
    values, flags = pod_settings(pod_info(pod), environ)
    return parse(RawSettings(values=values, flags=flags, enable_ipv6=False), FakeHost())


def proxy(pod: dict[str, Any]) -> dict[str, Any]:
    return next(c for c in pod["spec"]["containers"] if c["name"] == "istio-proxy")


def test_a_sidecar_pod_gets_istios_defaults() -> None:
    config = config_of(sidecar_pod())
    assert config.proxy_port == 15001 and config.mode == "REDIRECT"
    assert config.proxy_uids == ("1337",) and config.proxy_gids == ("1337",)
    assert config.inbound_ports.wildcard and config.outbound_include.wildcard
    assert config.inbound_exclude_ports == (15020, 15021, 15090)
    assert config.outbound_ports_exclude == (15020,)
    assert config.cni_mode and not config.redirect_dns


@pytest.mark.parametrize(
    ("change", "reason"),
    [
        (lambda pod: pod["spec"]["initContainers"].append({"name": "istio-init"}), "istio-init"),
        (lambda pod: proxy(pod).update(env=[{"name": "DISABLE_ENVOY", "value": "true"}]), "DISABLE_ENVOY"),
        (lambda pod: pod["spec"]["containers"].pop(), "no istio-proxy"),
        (lambda pod: proxy(pod).update(args=["proxy", "router"]), "proxy type router"),
        (lambda pod: pod["metadata"]["annotations"].update({"sidecar.istio.io/inject": "false"}), "disabled"),
        (lambda pod: pod["metadata"].update(labels={"sidecar.istio.io/inject": "f"}), "disabled"),
        (lambda pod: pod["metadata"]["annotations"].pop("sidecar.istio.io/status"), "status"),
    ],
)
def test_istios_reasons_to_skip(change: Any, reason: str) -> None:
    pod = sidecar_pod()
    change(pod)
    skipped = skip_reason(pod_info(pod))
    assert skipped is not None and reason in skipped.reason


def test_the_inject_label_wins_over_the_annotation_and_garbage_does_not_skip() -> None:
    pod = sidecar_pod(**{"sidecar.istio.io/inject": "false"})
    pod["metadata"]["labels"] = {"sidecar.istio.io/inject": "true"}
    assert skip_reason(pod_info(pod)) is None
    assert skip_reason(pod_info(sidecar_pod(**{"sidecar.istio.io/inject": "maybe"}))) is None
    assert skip_reason(pod_info(sidecar_pod())) is None


def test_native_sidecar_in_init_containers_counts() -> None:
    pod = sidecar_pod()
    pod["spec"]["initContainers"].append(pod["spec"]["containers"].pop())
    assert skip_reason(pod_info(pod)) is None


def test_annotations_and_container_fields_map_as_in_istio() -> None:
    pod = sidecar_pod(**{
        "sidecar.istio.io/interceptionMode": "TPROXY",
        "traffic.sidecar.istio.io/includeOutboundIPRanges": "10.0.0.0/8,192.168.0.0/16",
        "traffic.sidecar.istio.io/excludeOutboundIPRanges": "10.1.0.0/16",
        "traffic.sidecar.istio.io/excludeInboundPorts": "3333, 15020",
        "traffic.sidecar.istio.io/includeOutboundPorts": "7777",
        "traffic.sidecar.istio.io/excludeInterfaces": "eth1",
        "traffic.sidecar.istio.io/kubevirtInterfaces": "old0",
        "istio.io/reroute-virtual-interfaces": "new0",
    })
    proxy(pod)["securityContext"] = {"runAsUser": 0, "runAsGroup": 4242}
    proxy(pod)["env"] = [{"name": "ISTIO_META_DNS_CAPTURE", "value": "True"}, {"name": "INVALID_DROP", "value": "1"},
                         {"name": "ISTIO_DUAL_STACK", "value": "yes"}]
    config = config_of(pod)
    assert config.mode == "TPROXY"
    assert config.proxy_uids == ("1337",) and config.proxy_gids == ("4242",)  # uid 0 means Istio's default
    assert [str(c) for c in config.outbound_include.cidrs] == ["10.0.0.0/8", "192.168.0.0/16"]
    assert [str(c) for c in config.outbound_exclude] == ["10.1.0.0/16"]
    assert config.inbound_exclude_ports == (3333, 15020, 15021, 15090)
    assert config.outbound_ports_include == (7777,)
    assert config.exclude_interfaces == ("eth1",)
    assert config.virt_interfaces == ("new0",)  # the deprecated annotation only counts alone
    assert config.redirect_dns and config.capture_all_dns and config.drop_invalid
    assert not config.dual_stack  # "yes" is not a Go bool: Istio warns and leaves it off


def test_the_plugins_environment_supplies_istios_env_only_knobs() -> None:
    config = config_of(sidecar_pod(), ISTIO_OUTBOUND_OWNER_GROUPS_EXCLUDE="4000")
    assert config.owner_groups_exclude == ("4000",)


@pytest.mark.parametrize(
    ("annotation", "value"),
    [
        ("sidecar.istio.io/interceptionMode", "tproxy"),
        ("traffic.sidecar.istio.io/excludeInboundPorts", "80,http"),
        ("traffic.sidecar.istio.io/includeOutboundIPRanges", "10.0.0.0"),
        ("traffic.sidecar.istio.io/excludeInterfaces", "eth0;rm"),
    ],
)
def test_bad_annotations_are_refused_naming_the_annotation(annotation: str, value: str) -> None:
    with pytest.raises(ConfigError) as refused:
        config_of(sidecar_pod(**{annotation: value}))
    assert annotation in str(refused.value) and "annotation" in refused.value.source


def test_go_bool_is_strconv_parsebool() -> None:
    assert [go_bool(text) for text in ("1", "t", "TRUE", "True", "0", "F", "false")] == [True] * 4 + [False] * 3
    assert go_bool("yes") is None and go_bool("") is None


def test_load_pod_reads_json_and_yaml(tmp_path: Path) -> None:
    import yaml

    pod = sidecar_pod()
    (tmp_path / "pod.json").write_text(json.dumps(pod))
    (tmp_path / "pod.yaml").write_text(yaml.safe_dump(pod))
    assert load_pod(str(tmp_path / "pod.json")) == load_pod(str(tmp_path / "pod.yaml")) == pod
    (tmp_path / "deploy.yaml").write_text("kind: Deployment\n")
    with pytest.raises(ConfigError, match="one Pod object"):
        load_pod(str(tmp_path / "deploy.yaml"))


def run_cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*CLI, *args], capture_output=True, text=True, timeout=60)


def test_from_pod_dry_run_prints_the_pods_rules(tmp_path: Path) -> None:
    import yaml

    pod_file = tmp_path / "pod.yaml"
    pod_file.write_text(yaml.safe_dump(sidecar_pod(**{"traffic.sidecar.istio.io/includeInboundPorts": "8080"})))
    result = run_cli("--dry-run", "--from-pod", str(pod_file), "--disable-ipv6")
    assert result.returncode == 0, result.stderr
    assert "-A ISTIO_INBOUND -p tcp --dport 8080 -j ISTIO_IN_REDIRECT" in result.stdout
    # A flag on the command line wins over the pod.
    result = run_cli("--dry-run", "--from-pod", str(pod_file), "--disable-ipv6", "-b", "9090")
    assert "--dport 9090 -j ISTIO_IN_REDIRECT" in result.stdout and "8080" not in result.stdout


def test_from_pod_on_a_skipped_pod_writes_nothing(tmp_path: Path) -> None:
    pod = sidecar_pod()
    pod["metadata"]["annotations"].clear()
    (tmp_path / "pod.json").write_text(json.dumps(pod))
    result = run_cli("--dry-run", "--from-pod", str(tmp_path / "pod.json"), "--disable-ipv6")
    assert (result.returncode, result.stdout) == (0, "")
    assert "would skip" in result.stderr


def test_from_pod_with_a_bad_annotation_exits_2_naming_it(tmp_path: Path) -> None:
    (tmp_path / "pod.json").write_text(json.dumps(sidecar_pod(**{"sidecar.istio.io/interceptionMode": "X"})))
    result = run_cli("--dry-run", "--from-pod", str(tmp_path / "pod.json"), "--disable-ipv6")
    assert result.returncode == 2 and result.stdout == ""
    assert "sidecar.istio.io/interceptionMode" in result.stderr and "Traceback" not in result.stderr
    result = run_cli("--dry-run", "--from-pod", str(tmp_path / "missing.json"))
    assert result.returncode == 2 and "--from-pod" in result.stderr


def test_the_plugins_own_spelling_of_the_status_annotation_is_the_mappings() -> None:
    from istio_iptables.frontends import pod
    from istio_iptables.frontends.cni import plugin

    assert plugin.SIDECAR_STATUS_ANNOTATION == pod.STATUS_ANNOTATION


def test_the_plugins_light_paths_import_neither_typing_nor_the_engine() -> None:
    """Skips and DEL of a gone namespace start with json and our small modules only (bench/bench_cni.py)."""
    code = (
        "import sys, io, os\n"
        "from istio_iptables.frontends.cni.plugin import main\n"
        "env = {'CNI_COMMAND': 'ADD', 'CNI_CONTAINERID': 'c', 'CNI_IFNAME': 'eth0', 'CNI_NETNS': '/none',\n"
        "       'CNI_ARGS': 'K8S_POD_NAMESPACE=kube-system;K8S_POD_NAME=a'}\n"
        "conf = '{\"cniVersion\": \"1.0.0\", \"name\": \"n\", \"type\": \"istio-cni\", "
        "\"exclude_namespaces\": [\"kube-system\"]}'\n"
        "assert main(env, io.StringIO(conf), io.StringIO()) == 0\n"
        "assert main({**env, 'CNI_COMMAND': 'DEL'}, io.StringIO(conf), io.StringIO()) == 0\n"
        "heavy = [m for m in ('typing', 'istio_iptables.config.sidecar', 'istio_iptables.engine.xtables',\n"
        "                      'ssl', 'click') if m in sys.modules]\n"
        "print(heavy)\n"
    )
    done = subprocess.run([sys.executable, "-I", "-c", code], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "[]"


def test_the_runtimes_annotations_win_over_the_apis() -> None:
    pod = sidecar_pod(**{"sidecar.istio.io/interceptionMode": "REDIRECT"})
    info = pod_info(pod, {"sidecar.istio.io/interceptionMode": "TPROXY"})
    assert info.annotations["sidecar.istio.io/interceptionMode"] == "TPROXY"
    assert info.annotations["sidecar.istio.io/status"]  # the API's others stay
