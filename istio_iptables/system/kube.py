"""A small Kubernetes API client: read one Pod (and one Namespace) with a kubeconfig's credentials.

The CNI plugin runs once per pod creation on every node, so this uses the standard library only
(``http.client`` + ``ssl``), with bounded timeouts on every request. A kubeconfig is YAML: the
shape Istio's install-cni writes (and most others) is read by :func:`read_kubeconfig_text`'s
small block reader; anything it cannot follow goes to PyYAML when that is installed.
"""

from __future__ import annotations

import base64
import json
import os
import time
from collections.abc import Callable, Mapping
from typing import Any

from istio_iptables.errors import EnvironmentProblem

SERVICE_ACCOUNT_DIR = "/var/run/secrets/kubernetes.io/serviceaccount"
DEFAULT_TIMEOUT = 5.0  # seconds, per request (connect, then each read)


class KubeError(EnvironmentProblem):
    """The API could not answer: ``status`` is the HTTP status, 0 for a transport failure."""

    def __init__(self, message: str, status: int = 0) -> None:
        super().__init__(message)
        self.status = status

    @property
    def transient(self) -> bool:
        """Worth another attempt: no answer, throttling or a server-side failure."""
        return self.status == 0 or self.status == 429 or self.status >= 500


class KubeConfig:
    """Where the API is and how to authenticate: from a kubeconfig file or the in-cluster account."""

    def __init__(
        self,
        server: str,
        *,
        token: str = "",
        ca_file: str = "",
        ca_data: bytes = b"",
        insecure: bool = False,
        client_cert: tuple[str, str] | tuple[bytes, bytes] | None = None,
        source: str = "",
    ) -> None:
        self.server = server.rstrip("/")
        self.token = token
        self.ca_file = ca_file
        self.ca_data = ca_data
        self.insecure = insecure
        self.client_cert = client_cert
        self.source = source


def load_config(kubeconfig: str) -> KubeConfig:
    """Istio's ``kube.DefaultRestConfig(path, "")``: the file when a path is given, else in-cluster."""
    if not kubeconfig:
        return in_cluster_config()
    try:
        with open(kubeconfig, encoding="utf-8") as handle:
            text = handle.read()
    except OSError as error:
        raise KubeError(f"cannot read the kubeconfig {kubeconfig}: {error.strerror}") from None
    try:
        document = read_kubeconfig_text(text)
    except ValueError as error:
        raise KubeError(f"the kubeconfig {kubeconfig} is not valid YAML: {error}") from None
    return config_from_kubeconfig(document, os.path.dirname(os.path.abspath(kubeconfig)), kubeconfig)


def in_cluster_config() -> KubeConfig:
    host, port = os.environ.get("KUBERNETES_SERVICE_HOST", ""), os.environ.get("KUBERNETES_SERVICE_PORT", "")
    if not host or not port:
        raise KubeError("no kubeconfig given and not in a cluster (KUBERNETES_SERVICE_HOST/PORT unset)")
    if ":" in host:
        host = f"[{host}]"
    try:
        with open(os.path.join(SERVICE_ACCOUNT_DIR, "token"), encoding="utf-8") as handle:
            token = handle.read().strip()
    except OSError as error:
        raise KubeError(f"cannot read the service account token: {error.strerror}") from None
    return KubeConfig(
        f"https://{host}:{port}", token=token, ca_file=os.path.join(SERVICE_ACCOUNT_DIR, "ca.crt"), source="in-cluster"
    )


def config_from_kubeconfig(document: Any, base_dir: str, source: str) -> KubeConfig:
    """The current context's cluster and user (relative file paths are relative to the kubeconfig)."""
    if not isinstance(document, Mapping):
        raise KubeError(f"the kubeconfig {source} is not a mapping")

    def named(section: str, name: str, key: str) -> Mapping[str, Any]:
        for entry in document.get(section) or []:
            if isinstance(entry, Mapping) and entry.get("name") == name and isinstance(entry.get(key), Mapping):
                return entry[key]
        raise KubeError(f"the kubeconfig {source} has no {key} named {name!r}")

    contexts = [entry for entry in document.get("contexts") or [] if isinstance(entry, Mapping)]
    current = document.get("current-context") or (contexts[0].get("name") if len(contexts) == 1 else None)
    if not current:
        raise KubeError(f"the kubeconfig {source} names no current-context")
    context = named("contexts", current, "context")
    cluster = named("clusters", context.get("cluster", ""), "cluster")
    user = named("users", context.get("user", ""), "user") if context.get("user") else {}

    def path(value: Any) -> str:
        return value if not value or os.path.isabs(value) else os.path.join(base_dir, value)

    def data(value: Any) -> bytes:
        try:
            return base64.b64decode(value) if value else b""
        except ValueError:
            raise KubeError(f"the kubeconfig {source} holds invalid base64 data") from None

    server = str(cluster.get("server", ""))
    if not server.startswith(("https://", "http://")):
        raise KubeError(f"the kubeconfig {source} has no usable server URL ({server!r})")
    token = str(user.get("token", "") or "")
    if not token and user.get("tokenFile"):
        try:
            with open(path(user["tokenFile"]), encoding="utf-8") as handle:
                token = handle.read().strip()
        except OSError as error:
            raise KubeError(f"cannot read the token file {user['tokenFile']}: {error.strerror}") from None
    client_cert: tuple[str, str] | tuple[bytes, bytes] | None = None
    cert, key = user.get("client-certificate"), user.get("client-key")
    cert_data, key_data = data(user.get("client-certificate-data")), data(user.get("client-key-data"))
    if cert_data and key_data:
        client_cert = (cert_data, key_data)
    elif cert and key:
        client_cert = (path(cert), path(key))
    return KubeConfig(
        server,
        token=token,
        ca_file=path(cluster.get("certificate-authority", "")),
        ca_data=data(cluster.get("certificate-authority-data")),
        insecure=bool(cluster.get("insecure-skip-tls-verify", False)),
        client_cert=client_cert,
        source=source,
    )


class KubeClient:
    def __init__(self, config: KubeConfig, timeout: float = DEFAULT_TIMEOUT) -> None:
        self.config = config
        self.timeout = timeout

    def get_pod(self, namespace: str, name: str) -> Mapping[str, Any]:
        return self._get(f"/api/v1/namespaces/{_segment(namespace)}/pods/{_segment(name)}", f"pod {namespace}/{name}")

    def get_namespace(self, name: str) -> Mapping[str, Any]:
        return self._get(f"/api/v1/namespaces/{_segment(name)}", f"namespace {name}")

    def _get(self, path: str, what: str) -> Mapping[str, Any]:
        import http.client
        from urllib.parse import urlsplit

        url = urlsplit(self.config.server)
        headers = {"Accept": "application/json", "User-Agent": "istio-cni (istio-iptables)"}
        if self.config.token:
            headers["Authorization"] = f"Bearer {self.config.token}"
        connection: http.client.HTTPConnection
        if url.scheme == "https":
            connection = http.client.HTTPSConnection(
                url.hostname or "", url.port or 443, timeout=self.timeout, context=self._tls()
            )
        else:
            connection = http.client.HTTPConnection(url.hostname or "", url.port or 80, timeout=self.timeout)
        try:
            connection.request("GET", url.path.rstrip("/") + path, headers=headers)
            response = connection.getresponse()
            body = response.read()
        except TimeoutError:
            raise KubeError(f"reading {what}: the API server {self.config.server} did not answer within "
                            f"{self.timeout:g}s") from None
        except OSError as error:  # ssl.SSLError is an OSError
            raise KubeError(f"reading {what}: cannot reach the API server {self.config.server}: {error}") from None
        except http.client.HTTPException as error:
            raise KubeError(f"reading {what}: bad answer from {self.config.server}: {error!r}") from None
        finally:
            connection.close()
        if response.status != 200:
            raise KubeError(f"reading {what}: {_status_message(response.status, body)}", response.status)
        try:
            document = json.loads(body)
        except ValueError:
            raise KubeError(f"reading {what}: the API server answered something that is not JSON") from None
        if not isinstance(document, Mapping):
            raise KubeError(f"reading {what}: the API server answered something that is not an object")
        return document

    def _tls(self) -> Any:
        import ssl

        context = ssl.create_default_context(cafile=self.config.ca_file or None)
        if self.config.ca_data:
            context.load_verify_locations(cadata=self.config.ca_data.decode("ascii", "replace"))
        if self.config.insecure:
            context.check_hostname = False
            context.verify_mode = ssl.CERT_NONE
        if self.config.client_cert:
            cert, key = self.config.client_cert
            if isinstance(cert, bytes) and isinstance(key, bytes):
                # ssl loads certificates from files only: private temporary ones, removed at once.
                cert_file, key_file = _private_file(cert), _private_file(key)
                try:
                    context.load_cert_chain(cert_file, key_file)
                finally:
                    os.unlink(cert_file)
                    os.unlink(key_file)
            else:
                context.load_cert_chain(cert, key)  # type: ignore[arg-type]
        return context


def with_retries(
    read: Callable[[], Mapping[str, Any]],
    attempts: int,
    interval: float,
    on_failure: Callable[[KubeError, int], None] | None = None,
) -> Mapping[str, Any]:
    """Istio retries reading the pod (30 times, 1 s apart); we retry only what can get better."""
    for attempt in range(1, max(attempts, 1) + 1):
        try:
            return read()
        except KubeError as error:
            if on_failure is not None:
                on_failure(error, attempt)
            if not error.transient or attempt >= attempts:
                raise
            time.sleep(interval)
    raise AssertionError("unreachable")


def _status_message(status: int, body: bytes) -> str:
    message = ""
    try:
        document = json.loads(body)
        if isinstance(document, Mapping):
            message = str(document.get("message", ""))
    except ValueError:
        pass
    meaning = {
        401: "unauthorized: the API server refused the credentials",
        403: "forbidden: the credentials may not read it",
        404: "not found",
    }.get(status, "the API server failed")
    return f"{meaning} (HTTP {status}{': ' + message if message else ''})"


def _segment(text: str) -> str:
    from urllib.parse import quote

    return quote(text, safe="")


def _private_file(content: bytes) -> str:
    import tempfile

    descriptor, path = tempfile.mkstemp(prefix="istio-cni-", suffix=".pem")
    with os.fdopen(descriptor, "wb") as handle:
        handle.write(content)
    return path


# --- kubeconfig reading --------------------------------------------------------


def read_kubeconfig_text(text: str) -> Any:
    """JSON, the block-style YAML kubeconfigs are written in, or (else) whatever PyYAML reads."""
    if text.lstrip().startswith("{"):
        try:
            return json.loads(text)
        except ValueError as error:
            raise ValueError(str(error)) from None
    try:
        return _BlockReader(text).document()
    except ValueError:
        try:
            import yaml
        except ImportError:
            raise ValueError("this kubeconfig needs PyYAML to be read") from None
        try:
            return yaml.safe_load(text)
        except yaml.YAMLError as error:
            raise ValueError(str(error).splitlines()[0]) from None


class _BlockReader:
    """Block mappings and sequences of plain or quoted scalars: the kubeconfig subset of YAML."""

    def __init__(self, text: str) -> None:
        self.lines: list[tuple[int, str]] = []
        for raw in text.splitlines():
            stripped = raw.strip()
            if not stripped or stripped.startswith("#") or stripped in ("---", "..."):
                continue
            if "\t" in raw[: len(raw) - len(raw.lstrip())]:
                raise ValueError("tab indentation")
            self.lines.append((len(raw) - len(raw.lstrip(" ")), stripped))
        self.position = 0

    def document(self) -> Any:
        if not self.lines:
            return None
        value = self._block(self.lines[0][0])
        if self.position != len(self.lines):
            raise ValueError(f"unexpected indentation at {self.lines[self.position][1]!r}")
        return value

    def _block(self, indent: int) -> Any:
        if self.lines[self.position][1].startswith("- ") or self.lines[self.position][1] == "-":
            return self._sequence(indent)
        return self._mapping(indent)

    def _sequence(self, indent: int) -> list[Any]:
        items: list[Any] = []
        while self.position < len(self.lines):
            level, text = self.lines[self.position]
            if level != indent or not (text.startswith("- ") or text == "-"):
                break
            rest = text[1:].strip()
            if not rest:
                self.position += 1
                items.append(self._block(self.lines[self.position][0]) if self._deeper(indent) else None)
            elif _is_key(rest):
                # "- key: value" opens a mapping whose keys sit two columns further in.
                self.lines[self.position] = (indent + 2, rest)
                items.append(self._mapping(indent + 2))
            else:
                self.position += 1
                items.append(_scalar(rest))
        return items

    def _mapping(self, indent: int) -> dict[str, Any]:
        mapping: dict[str, Any] = {}
        while self.position < len(self.lines):
            level, text = self.lines[self.position]
            if level < indent:
                break
            if level > indent or not _is_key(text):
                raise ValueError(f"cannot read {text!r}")
            key, _, rest = text.partition(":")
            key = str(_scalar(key.strip()))
            rest = rest.strip()
            self.position += 1
            if rest:
                mapping[key] = _scalar(rest)
            elif self._deeper(indent) or self._sequence_at(indent):
                mapping[key] = self._block(self.lines[self.position][0])
            else:
                mapping[key] = None
        return mapping

    def _deeper(self, indent: int) -> bool:
        return self.position < len(self.lines) and self.lines[self.position][0] > indent

    def _sequence_at(self, indent: int) -> bool:
        # YAML lets a sequence under a key start at the key's own indentation.
        return (
            self.position < len(self.lines)
            and self.lines[self.position][0] == indent
            and (self.lines[self.position][1].startswith("- ") or self.lines[self.position][1] == "-")
        )


def _is_key(text: str) -> bool:
    if text[:1] in ('"', "'"):
        closing = text.find(text[0], 1)
        return closing > 0 and text[closing + 1 : closing + 2] == ":"
    key, colon, rest = text.partition(":")
    return bool(colon) and bool(key) and (not rest or rest[0] == " ") and not key.startswith(("{", "["))


def _scalar(text: str) -> Any:
    if text[:1] in ('"', "'"):
        if len(text) < 2 or text[-1] != text[0]:
            raise ValueError(f"unterminated quote in {text!r}")
        inner = text[1:-1]
        if text[0] == '"':
            if "\\" in inner:
                return json.loads(text)
            return inner
        return inner.replace("''", "'")
    if text.startswith(("{", "[", "&", "*", "!", "|", ">")):
        if text in ("{}", "[]"):
            return {} if text == "{}" else []
        raise ValueError(f"unsupported YAML in {text!r}")
    if " #" in text:
        text = text.split(" #", 1)[0].rstrip()
    lowered = text.lower()
    if lowered in ("true", "false"):
        return lowered == "true"
    if lowered in ("null", "~"):
        return None
    if text.lstrip("-").isdigit():
        return int(text)
    return text
