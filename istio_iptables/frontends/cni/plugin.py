"""``istio-cni``: the chained CNI plugin that gives sidecar pods their rules, as Istio's plugin does.

The runtime calls it after the main network plugin (bridge, Calico, ...) with ``prevResult``.
ADD reads the pod (Kubernetes API), decides as Istio does whether it needs rules
(``istio_iptables.frontends.pod``) and writes them in the pod's network namespace; DEL removes
them; CHECK compares the namespace with the pod's rules. The result on stdout is the previous
plugin's, unchanged; logs go to stderr and ``<cni_agent_run_dir>/istio-cni.log`` (never stdout).

Start-up cost matters (every pod creation on a node): only json and our light modules load
before the command is known; the API client, the engine and the kernel code load on the paths
that use them.
"""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Mapping

from istio_iptables._lib.log import LEVELS, log
from istio_iptables.frontends.cni import spec
from istio_iptables.frontends.cni.spec import CniError

TYPE_CHECKING = False  # typing costs ~5 ms of a ~20 ms start: only type checkers import it
if TYPE_CHECKING:
    from typing import Any, NoReturn, TextIO

KUBECONFIG_NAME = "istio-cni-kubeconfig"  # Istio's constants.CNIPluginKubeconfName
LOG_FILE_NAME = "istio-cni.log"  # Istio's constants.LocalRollingLogName
LOG_FILE_MAX_BYTES = 10 * 1024 * 1024
POD_ANNOTATIONS_CAPABILITY = "io.kubernetes.cri.pod-annotations"
OWN_AGENT_PREFIX = "istio-cni-node-"
# frontends.pod.STATUS_ANNOTATION, spelt here so that a skip needs no import of the mapping.
SIDECAR_STATUS_ANNOTATION = "sidecar.istio.io/status"
# Istio: 30 attempts, one second apart, whatever failed. We retry only what can get better.
POD_RETRIEVAL_ATTEMPTS = 30
POD_RETRIEVAL_INTERVAL = 1.0


class PluginConfig:
    """Istio's plugin fields of the network configuration (unknown fields are ignored, as Go does)."""

    def __init__(self, config: Mapping[str, Any]) -> None:
        self.log_level = _field(config, "plugin_log_level", str, "info")
        self.run_dir = _field(config, "cni_agent_run_dir", str, "")
        self.ambient_enabled = _field(config, "ambient_enabled", bool, False)
        self.enablement_selectors = _field(config, "enablement_selectors", list, []) or []
        self.exclude_namespaces = _field(config, "exclude_namespaces", list, []) or []
        if not all(isinstance(name, str) for name in self.exclude_namespaces):
            raise CniError(spec.INVALID_CONFIG, "exclude_namespaces must be a list of namespace names")
        self.pod_namespace = _field(config, "pod_namespace", str, "")
        self.native_nftables = _field(config, "native_nftables", bool, False)
        # Ours, off by default: runtimes outside Kubernetes (podman's CNI backend) pass K8S_POD_NAME
        # but no namespace; with this set, such a container is looked up as a pod of that namespace.
        self.assume_pod_namespace = _field(config, "assume_pod_namespace", str, "")
        self.enable_ambient_detection_retry = _field(config, "enable_ambient_detection_retry", bool, False)
        kubernetes = _field(config, "kubernetes", dict, {}) or {}
        self.kubeconfig = _field(kubernetes, "kubeconfig", str, "", "kubernetes.")
        if not self.kubeconfig and self.run_dir:
            self.kubeconfig = os.path.join(self.run_dir, KUBECONFIG_NAME)
        self.request_timeout = float(_field(kubernetes, "request_timeout_seconds", (int, float), 5, "kubernetes."))
        self.pod_attempts = int(_field(kubernetes, "pod_retrieval_attempts", int, POD_RETRIEVAL_ATTEMPTS,
                                       "kubernetes."))
        if self.log_level.lower() not in LEVELS:
            raise CniError(spec.INVALID_CONFIG, f"plugin_log_level {self.log_level!r} is not one of "
                           f"{', '.join(sorted(LEVELS))}")


def _field(config: Mapping[str, Any], name: str, kind: Any, default: Any, prefix: str = "") -> Any:
    value = config.get(name, default)
    if value is None:
        return default
    if not isinstance(value, kind) or (kind in (int, (int, float)) and isinstance(value, bool)):
        raise CniError(spec.INVALID_CONFIG, f"{prefix}{name} has the wrong type ({type(value).__name__})")
    return value


def main(environ: Mapping[str, str], stdin: TextIO, stdout: TextIO) -> int:
    """One invocation; returns the exit code (0, or 1 with an error document on stdout)."""
    log.configure(LEVELS["info"], [sys.stderr], True)
    version = spec.LATEST_VERSION
    try:
        text = stdin.read()
        request = spec.parse_request(environ, text)
        if request.command == "VERSION":
            stdout.write(json.dumps(spec.version_document(request.config)))
            return 0
        version = request.version
        plugin = PluginConfig(request.config)
        _configure_logging(plugin)
        answer = COMMANDS[request.command](request, plugin)
        if answer is not None:
            stdout.write(json.dumps(answer))
        return 0
    except CniError as error:
        log.error("istio-cni %s failed: %s%s", environ.get("CNI_COMMAND", "?"), error.msg,
                  f" ({error.details})" if error.details else "")
        stdout.write(json.dumps(error.document(version)))
        return 1
    except Exception as error:  # a bug of ours: still an answer the runtime can read
        log.exception("istio-cni failed unexpectedly")
        stdout.write(json.dumps(CniError(100, f"istio-cni failed unexpectedly: {error!r}").document(version)))
        return 1


def program() -> NoReturn:
    """The ``istio-cni`` executable: a CNI plugin, or ``istio-cni install|uninstall ...`` on a node."""
    if sys.argv[1:2] and sys.argv[1] in ("install", "uninstall", "-h", "--help"):
        from istio_iptables.frontends.cni.install import main as install_main

        code = install_main(sys.argv[1:])
    else:
        code = main(os.environ, sys.stdin, sys.stdout)
    try:
        sys.stdout.flush()
        sys.stderr.flush()
    except OSError:
        code = code or 1
    os._exit(code)


# --- commands ------------------------------------------------------------------


def add(request: spec.Request, plugin: PluginConfig) -> Mapping[str, Any]:
    pod = _pod_to_program(request, plugin)
    if pod is not None:
        from istio_iptables.frontends.cni import actions

        info, raw = pod
        log.info("programming %s for pod %s/%s in %s", "nftables" if plugin.native_nftables else "iptables",
                 info.namespace, info.name, request.netns)
        _engine_call(lambda: actions.apply_rules(raw, request.netns))
    return spec.result_document(request.config)


def delete(request: spec.Request, plugin: PluginConfig) -> None:
    if not request.netns or not os.path.exists(request.netns):
        log.debug("DEL: the namespace %r is gone, and our rules with it", request.netns)
        return
    skipped = _skipped_without_api(request, plugin)
    if skipped:
        log.debug("DEL: %s, so ADD wrote nothing to remove", skipped)
        return
    from istio_iptables.frontends.cni import actions

    _engine_call(lambda: actions.remove_rules(request.netns, plugin.native_nftables))


def check(request: spec.Request, plugin: PluginConfig) -> None:
    pod = _pod_to_program(request, plugin)
    if pod is not None:
        from istio_iptables.frontends.cni import actions

        _engine_call(lambda: actions.check_rules(pod[1], request.netns))


def status(request: spec.Request, plugin: PluginConfig) -> None:
    """STATUS (1.1.0): ready when the credentials Istio's agent writes are there."""
    del request
    if plugin.kubeconfig and not os.path.exists(plugin.kubeconfig):
        raise CniError(50, f"not ready: the kubeconfig {plugin.kubeconfig} is not there yet")


def garbage_collect(request: spec.Request, plugin: PluginConfig) -> None:
    """GC (1.1.0): nothing to collect; every rule lives in a pod's namespace and goes with it."""
    del request, plugin


COMMANDS = {"ADD": add, "DEL": delete, "CHECK": check, "STATUS": status, "GC": garbage_collect}


def _pod_identity(request: spec.Request, plugin: PluginConfig) -> tuple[str, str]:
    namespace, name = request.args.get("K8S_POD_NAMESPACE", ""), request.args.get("K8S_POD_NAME", "")
    if name and not namespace:
        namespace = plugin.assume_pod_namespace
    return namespace, name


def _runtime_annotations(request: spec.Request) -> dict[str, str] | None:
    runtime_config = request.config.get("runtimeConfig")
    annotations = runtime_config.get(POD_ANNOTATIONS_CAPABILITY) if isinstance(runtime_config, Mapping) else None
    return {str(k): str(v) for k, v in annotations.items()} if isinstance(annotations, Mapping) else None


def _skipped_without_api(request: spec.Request, plugin: PluginConfig) -> str:
    """Istio's decisions that need no API call: why the pod gets no rules, or "" to go on."""
    namespace, name = _pod_identity(request, plugin)
    if not namespace or not name:
        return "not a Kubernetes pod (no K8S_POD_NAMESPACE/K8S_POD_NAME in CNI_ARGS)"
    if name.startswith(OWN_AGENT_PREFIX) and namespace == plugin.pod_namespace:
        return f"pod {namespace}/{name} looks like our own agent pod"
    if namespace in plugin.exclude_namespaces:
        return f"pod namespace {namespace} excluded"
    annotations = _runtime_annotations(request)
    if annotations is not None and SIDECAR_STATUS_ANNOTATION not in annotations and not plugin.ambient_enabled:
        # Istio would read the pod and skip it for the missing annotation: the same answer, without the API.
        return f"pod {namespace}/{name} excluded: no {SIDECAR_STATUS_ANNOTATION} annotation (from the runtime)"
    return ""


def _pod_to_program(request: spec.Request, plugin: PluginConfig) -> tuple[Any, Any] | None:
    """Istio's ``doAddRun`` decisions: (pod info, settings) for a pod that gets rules, else None."""
    skipped = _skipped_without_api(request, plugin)
    if skipped:
        (log.debug if skipped.startswith("not a") else log.info)("%s, skipping", skipped)
        return None
    namespace, name = _pod_identity(request, plugin)
    annotations = _runtime_annotations(request)

    from istio_iptables.frontends import pod as pods

    client = _client(plugin)
    if plugin.ambient_enabled and _is_ambient(client, plugin, namespace, name):
        if request.command == "ADD":
            _hand_to_node_agent(request, plugin, namespace, name)
        return None
    pod_object = _read(lambda: client.get_pod(namespace, name), plugin)
    try:
        info = pods.pod_info(pod_object, annotations)
        skipped = pods.skip_reason(info)
        if skipped is not None:
            log.info("pod %s/%s excluded: %s", namespace, name, skipped.reason)
            return None
        values, flags = pods.pod_settings(info, warn=log.warning)
    except Exception as error:
        raise _as_cni_error(error) from None
    if plugin.native_nftables:
        from istio_iptables.config.sidecar import Setting

        flags["native_nftables"] = Setting("true", "native_nftables")
    from istio_iptables.config.sidecar import RawSettings

    return info, RawSettings(values=values, flags=flags)


def _client(plugin: PluginConfig) -> Any:
    from istio_iptables.system import kube

    try:
        return kube.KubeClient(kube.load_config(plugin.kubeconfig), timeout=plugin.request_timeout)
    except kube.KubeError as error:
        raise CniError(spec.POD_UNREADABLE, f"cannot set up the Kubernetes client: {error}") from None


def _read(read: Any, plugin: PluginConfig) -> Mapping[str, Any]:
    from istio_iptables.system import kube

    def note(error: kube.KubeError, attempt: int) -> None:
        (log.warning if attempt == 1 else log.debug)("attempt %d: %s", attempt, error)

    try:
        return kube.with_retries(read, plugin.pod_attempts, POD_RETRIEVAL_INTERVAL, note)
    except kube.KubeError as error:
        code = spec.TRY_AGAIN_LATER if error.transient else spec.POD_UNREADABLE
        raise CniError(code, f"cannot read the pod's facts, no rules written: {error}") from None


def _is_ambient(client: Any, plugin: PluginConfig, namespace: str, name: str) -> bool:
    """Istio's ``isAmbientPod``: the enablement selectors on the pod and its namespace's labels.

    Host-network pods and pods with a sidecar never are. When the API cannot say, Istio goes on as
    for a sidecar pod, unless ``enable_ambient_detection_retry`` asks it to retry and then fail.
    """
    attempts = (POD_RETRIEVAL_ATTEMPTS if plugin.enable_ambient_detection_retry else 1) + 1
    try:
        from istio_iptables.system import kube

        def read_both() -> Mapping[str, Any]:
            return {"pod": client.get_pod(namespace, name), "namespace": client.get_namespace(namespace)}

        both = kube.with_retries(read_both, attempts, POD_RETRIEVAL_INTERVAL)
    except Exception as error:
        log.error("failed to check whether pod %s/%s is ambient: %s", namespace, name, error)
        if plugin.enable_ambient_detection_retry:
            raise CniError(spec.POD_UNREADABLE, f"cannot tell whether the pod is ambient: {error}") from None
        return False
    pod_object, namespace_object = both["pod"], both["namespace"]
    metadata = pod_object.get("metadata") or {}
    if (pod_object.get("spec") or {}).get("hostNetwork") or SIDECAR_STATUS_ANNOTATION in (
        metadata.get("annotations") or {}
    ):
        return False
    pod_labels = metadata.get("labels") or {}
    namespace_labels = (namespace_object.get("metadata") or {}).get("labels") or {}
    for selector in plugin.enablement_selectors:
        if not isinstance(selector, Mapping):
            continue
        if _selects(selector.get("podSelector"), pod_labels) and _selects(
            selector.get("namespaceSelector"), namespace_labels
        ):
            return True
    return False


def _hand_to_node_agent(request: spec.Request, plugin: PluginConfig, namespace: str, name: str) -> None:
    """Istio's ``PushCNIEvent``: the agent, not this plugin, redirects an ambient pod's traffic."""
    from istio_iptables.errors import EnvironmentProblem
    from istio_iptables.system import node_agent

    previous = request.config.get("prevResult")
    ips = previous.get("ips") if isinstance(previous, Mapping) else None
    try:
        event = node_agent.add_event(request.netns, name, namespace, ips if isinstance(ips, list) else [])
        node_agent.push_add_event(os.path.join(plugin.run_dir, node_agent.EVENT_SOCKET_NAME), event)
    except (EnvironmentProblem, ValueError) as error:
        raise CniError(spec.NODE_AGENT_UNREACHABLE,
                       f"istio-cni cmdAdd failed to contact node Istio CNI agent: {error}") from None
    log.info("pod %s/%s is ambient: handed to Istio's node agent", namespace, name)


def _selects(selector: Any, labels: Mapping[str, str]) -> bool:
    """A Kubernetes label selector; an absent one selects everything."""
    if not isinstance(selector, Mapping):
        return True
    for key, value in (selector.get("matchLabels") or {}).items():
        if labels.get(key) != value:
            return False
    for expression in selector.get("matchExpressions") or []:
        key, operator, values = expression.get("key"), expression.get("operator"), expression.get("values") or []
        present = key in labels
        if operator == "In" and not (present and labels[key] in values):
            return False
        if operator == "NotIn" and present and labels[key] in values:
            return False
        if operator == "Exists" and not present:
            return False
        if operator == "DoesNotExist" and present:
            return False
    return True


def _engine_call(call: Any) -> None:
    try:
        call()
    except Exception as error:
        raise _as_cni_error(error) from None


def _as_cni_error(error: Exception) -> CniError:
    from istio_iptables.errors import ConfigError, DriftError, ExitCode, IstioIptablesError

    if isinstance(error, CniError):
        return error
    if isinstance(error, ConfigError) and error.source == "CNI_NETNS":
        return CniError(spec.CONTAINER_UNKNOWN, str(error))
    if isinstance(error, DriftError):
        return CniError(spec.DRIFT, str(error).splitlines()[0], "\n".join(str(error).splitlines()[1:]))
    if isinstance(error, IstioIptablesError):  # by exit code: errors from a child arrive as the base class
        code = {
            ExitCode.INVALID_INPUT: spec.INVALID_POD_SETTINGS,
            ExitCode.DRIFT: spec.DRIFT,
            ExitCode.ENVIRONMENT: spec.ENVIRONMENT,
        }.get(error.exit_code, spec.APPLY_FAILED)
        return CniError(code, str(error))
    raise error


# --- logging -------------------------------------------------------------------


def _configure_logging(plugin: PluginConfig) -> None:
    """stderr (the runtime keeps it) and the node-local log file Istio's plugin also writes; the
    logger drops a stream that fails (a full disk must not fail the pod)."""
    streams: list[TextIO] = [sys.stderr]
    if plugin.run_dir and os.path.isdir(plugin.run_dir):
        path = os.path.join(plugin.run_dir, LOG_FILE_NAME)
        try:
            if os.path.exists(path) and os.path.getsize(path) > LOG_FILE_MAX_BYTES:
                os.replace(path, path + ".1")
            streams.append(open(path, "a", encoding="utf-8"))  # noqa: SIM115 - lives as long as the process
        except OSError:
            pass
    log.configure(LEVELS[plugin.log_level.lower()], streams, True)


if __name__ == "__main__":
    program()
