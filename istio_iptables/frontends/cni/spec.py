"""The CNI protocol (containernetworking/cni SPEC.md, 0.3.1 to 1.1.0): request, result, errors.

Pure: reads the environment mapping and the stdin text it is given, returns values. A runtime
calls the plugin with ``CNI_COMMAND`` and friends in the environment and the network
configuration on stdin; the plugin answers on stdout (a result, a version document, or an error
document) and logs elsewhere.
"""

from __future__ import annotations

import json
from collections.abc import Mapping

TYPE_CHECKING = False  # typing and records cost ~6 ms of the plugin's start
if TYPE_CHECKING:
    from typing import Any

SUPPORTED_VERSIONS = ("0.3.0", "0.3.1", "0.4.0", "1.0.0", "1.1.0")
LATEST_VERSION = SUPPORTED_VERSIONS[-1]
COMMANDS = ("ADD", "DEL", "CHECK", "VERSION", "STATUS", "GC")
# Commands and the first version that has them (older configurations must not be sent them).
FIRST_VERSION = {"CHECK": "0.4.0", "STATUS": "1.1.0", "GC": "1.1.0"}

# Error codes of the specification ...
INCOMPATIBLE_VERSION = 1
UNSUPPORTED_FIELD = 2
CONTAINER_UNKNOWN = 3
INVALID_ENVIRONMENT = 4
IO_FAILURE = 5
DECODE_FAILURE = 6
INVALID_CONFIG = 7
TRY_AGAIN_LATER = 11
# ... and ours (100 and above belong to the plugin).
APPLY_FAILED = 101  # the namespace was rolled back
INVALID_POD_SETTINGS = 102  # an annotation or the istio-proxy container holds a value we refuse
DRIFT = 103  # CHECK: the namespace holds other rules than this pod's
ENVIRONMENT = 104  # privilege, a binary, a kernel feature, a lock
POD_UNREADABLE = 105  # the Kubernetes API did not give us the pod
NODE_AGENT_UNREACHABLE = 106  # an ambient pod, and Istio's node agent did not take it


class CniError(Exception):
    """An error the plugin answers with: ``{cniVersion, code, msg, details}`` on stdout, exit 1."""

    def __init__(self, code: int, msg: str, details: str = "") -> None:
        super().__init__(msg)
        self.code = code
        self.msg = msg
        self.details = details

    def document(self, version: str) -> dict[str, Any]:
        document: dict[str, Any] = {"cniVersion": version, "code": self.code, "msg": self.msg}
        if self.details:
            document["details"] = self.details
        return document


class Request:
    """One invocation: the CNI_* variables and the network configuration."""

    __slots__ = ("args", "command", "config", "container_id", "ifname", "netns", "path")

    def __init__(
        self,
        command: str,
        container_id: str,
        netns: str,
        ifname: str,
        args: Mapping[str, str],
        path: str,
        config: Mapping[str, Any],
    ) -> None:
        self.command = command
        self.container_id = container_id
        self.netns = netns
        self.ifname = ifname
        self.args = args
        self.path = path
        self.config = config

    @property
    def version(self) -> str:
        return str(self.config.get("cniVersion", LATEST_VERSION))


def version_key(version: str) -> tuple[int, ...]:
    try:
        return tuple(int(part) for part in version.split("."))
    except ValueError:
        return (0,)


def parse_request(environ: Mapping[str, str], stdin: str) -> Request:
    """The invocation, checked as the specification asks; raises :class:`CniError`."""
    command = environ.get("CNI_COMMAND", "")
    if command not in COMMANDS:
        raise CniError(INVALID_ENVIRONMENT, f"CNI_COMMAND is {command!r}: expected one of {', '.join(COMMANDS)}")
    config = parse_config(stdin, required=command not in ("VERSION",))
    if command == "VERSION":
        return Request(command, "", "", "", {}, "", config)
    version = str(config["cniVersion"])
    first = FIRST_VERSION.get(command)
    if first and version_key(version) < version_key(first):
        raise CniError(INCOMPATIBLE_VERSION, f"{command} needs cniVersion {first} or later, not {version}")
    needed = {"ADD": ("CNI_CONTAINERID", "CNI_NETNS", "CNI_IFNAME"), "CHECK": ("CNI_CONTAINERID", "CNI_NETNS",
              "CNI_IFNAME"), "DEL": ("CNI_CONTAINERID", "CNI_IFNAME")}.get(command, ())
    for variable in needed:
        if not environ.get(variable):
            raise CniError(INVALID_ENVIRONMENT, f"{variable} is not set")
    if command == "CHECK" and "prevResult" not in config:
        raise CniError(INVALID_CONFIG, "CHECK needs the prevResult of the chain")
    return Request(
        command=command,
        container_id=environ.get("CNI_CONTAINERID", ""),
        netns=environ.get("CNI_NETNS", ""),
        ifname=environ.get("CNI_IFNAME", ""),
        args=parse_args(environ.get("CNI_ARGS", "")),
        path=environ.get("CNI_PATH", ""),
        config=config,
    )


def parse_config(stdin: str, required: bool = True) -> Mapping[str, Any]:
    if not stdin.strip() and not required:
        return {}
    try:
        config = json.loads(stdin)
    except ValueError as error:
        raise CniError(DECODE_FAILURE, "the network configuration is not valid JSON", str(error)) from None
    if not isinstance(config, dict):
        raise CniError(DECODE_FAILURE, "the network configuration is not a JSON object")
    version = config.get("cniVersion")
    if version is None and not required:
        return config
    if not isinstance(version, str) or not version:
        raise CniError(INVALID_CONFIG, "the network configuration has no cniVersion")
    if version not in SUPPORTED_VERSIONS:
        raise CniError(
            INCOMPATIBLE_VERSION,
            f"cniVersion {version} is not supported",
            f"supported: {', '.join(SUPPORTED_VERSIONS)}",
        )
    if required:
        for key in ("name", "type"):
            if not isinstance(config.get(key), str) or not config[key]:
                raise CniError(INVALID_CONFIG, f"the network configuration has no {key!r}")
    if "prevResult" in config and not isinstance(config["prevResult"], dict):
        raise CniError(INVALID_CONFIG, "prevResult is not a JSON object")
    return config


def parse_args(text: str) -> dict[str, str]:
    """``CNI_ARGS``: ``K=V;K=V``. Unknown keys are an error unless ``IgnoreUnknown`` is true (libcni)."""
    known = {"IgnoreUnknown", "K8S_POD_NAME", "K8S_POD_NAMESPACE", "K8S_POD_INFRA_CONTAINER_ID", "K8S_POD_UID"}
    pairs: dict[str, str] = {}
    for item in text.split(";"):
        if not item:
            continue
        key, equals, value = item.partition("=")
        if not equals:
            raise CniError(INVALID_ENVIRONMENT, f"CNI_ARGS: {item!r} is not KEY=VALUE")
        pairs[key] = value
    if pairs.get("IgnoreUnknown", "").lower() not in ("1", "true"):
        unknown = sorted(set(pairs) - known)
        if unknown:
            raise CniError(INVALID_ENVIRONMENT, f"CNI_ARGS: unknown key {unknown[0]!r} (and no IgnoreUnknown=1)")
    return pairs


def version_document(config: Mapping[str, Any]) -> dict[str, Any]:
    asked = config.get("cniVersion")
    return {
        "cniVersion": asked if asked in SUPPORTED_VERSIONS else LATEST_VERSION,
        "supportedVersions": list(SUPPORTED_VERSIONS),
    }


def result_document(config: Mapping[str, Any]) -> Mapping[str, Any]:
    """A chained plugin's result: the previous plugin's, unchanged; an empty one when first."""
    previous = config.get("prevResult")
    if isinstance(previous, Mapping):
        return previous
    return {"cniVersion": config.get("cniVersion", LATEST_VERSION)}
