"""Build the image with podman from a locally made Debian base, and run it as Kubernetes would.

No registry is reachable where the tests run, so the base image is made here: ``debootstrap
--variant=minbase bookworm`` from the Debian mirror apt already uses, trimmed like Debian's
``bookworm-slim`` and ``podman import``ed. The rootfs tarball is cached outside the repository, so
only the first run on a machine pays for debootstrap; podman's layer cache makes rebuilds cheap.

Podman runs with the ``runc`` runtime and never with its own networking: the build uses the
host's network, containers join namespaces the tests made, so nothing touches the host's rules.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

REPO = Path(__file__).resolve().parent.parent.parent
CACHE = Path(os.environ.get("ISTIO_IPTABLES_IMAGE_CACHE", "/var/cache/istio-iptables-image"))
SUITE = "bookworm"
# Bump when the recipe of the base changes: the cached tarball and the imported image are keyed on it.
BASE_RECIPE = 1
BASE_IMAGE = f"localhost/istio-iptables-base:{SUITE}-minbase-{BASE_RECIPE}"
IMAGE = "localhost/istio-iptables:test"
DEPLOY = REPO / "deploy"
PODMAN = ("podman", "--runtime", "runc")
# Needed on this kind of machine: podman's defaults exceed what the runtime may set.
RUN_LIMITS = ("--ulimit", "nofile=1024:1024", "--ulimit", "nproc=1024:1024")
# What bookworm-slim leaves out, and dpkg keeps out of every later install (copyright files stay).
SLIM_DPKG_FILTER = """\
path-exclude /usr/share/doc/*
path-include /usr/share/doc/*/copyright
path-exclude /usr/share/man/*
path-exclude /usr/share/groff/*
path-exclude /usr/share/info/*
path-exclude /usr/share/lintian/*
path-exclude /usr/share/linda/*
path-exclude /usr/share/locale/*
"""


def _run(command: Sequence[str], *, check: bool = True, timeout: float = 900) -> subprocess.CompletedProcess[str]:
    """Run ``command``; on failure, raise with its output's tail (a failed build must explain itself)."""
    done = subprocess.run(command, capture_output=True, text=True, timeout=timeout, check=False)
    if check and done.returncode != 0:
        tail = "\n".join((done.stdout + done.stderr).splitlines()[-40:])
        raise RuntimeError(f"{' '.join(command)} exited {done.returncode}:\n{tail}")
    return done


def podman(*args: str, check: bool = True, timeout: float = 900) -> subprocess.CompletedProcess[str]:
    return _run([*PODMAN, *args], check=check, timeout=timeout)


def debian_mirror() -> str:
    """The first Debian archive apt is configured with (both sources formats), else deb.debian.org."""
    if mirror := os.environ.get("DEBIAN_MIRROR"):
        return mirror
    texts = [path.read_text() for path in (Path("/etc/apt/sources.list"),) if path.exists()]
    texts += [path.read_text() for path in sorted(Path("/etc/apt/sources.list.d").glob("*.sources"))]
    texts += [path.read_text() for path in sorted(Path("/etc/apt/sources.list.d").glob("*.list"))]
    for text in texts:
        for match in re.finditer(r"^(?:deb\s+(?:\[[^\]]*\]\s+)?|URIs:\s*)(\S+)", text, re.MULTILINE):
            uri = match.group(1)
            if "debian" in uri and "security" not in uri:
                return uri
    return "http://deb.debian.org/debian"


def _security_mirror(mirror: str) -> str:
    return mirror.rstrip("/").removesuffix("/debian") + "/debian-security"


def base_tarball() -> Path:
    """The trimmed bookworm rootfs as a tarball, made with debootstrap on first use and cached."""
    tarball = CACHE / f"{SUITE}-minbase-{BASE_RECIPE}.tar"
    if tarball.exists():
        return tarball
    CACHE.mkdir(parents=True, exist_ok=True)
    mirror = debian_mirror()
    with tempfile.TemporaryDirectory(dir=CACHE) as scratch:
        rootfs = Path(scratch) / "rootfs"
        _run(["debootstrap", "--variant=minbase", SUITE, str(rootfs), mirror])
        _trim(rootfs, mirror)
        partial = Path(scratch) / tarball.name
        _run(["tar", "-C", str(rootfs), "--numeric-owner", "-cf", str(partial), "."])
        partial.rename(tarball)
    return tarball


def _trim(rootfs: Path, mirror: str) -> None:
    """Make the debootstrap tree look like bookworm-slim: no docs, manuals, translations or apt lists."""
    (rootfs / "etc/dpkg/dpkg.cfg.d/slim").write_text(SLIM_DPKG_FILTER)
    (rootfs / "etc/apt/sources.list").write_text(
        f"deb {mirror} {SUITE} main\n"
        f"deb {mirror} {SUITE}-updates main\n"
        f"deb {_security_mirror(mirror)} {SUITE}-security main\n"
    )
    for pattern in ("var/cache/apt/archives/*.deb", "var/cache/apt/*.bin", "var/lib/apt/lists/*",
                    "usr/share/man/*", "usr/share/info/*", "usr/share/locale/*", "var/log/*.log"):
        for path in rootfs.glob(pattern):
            _remove(path)
    for path in (rootfs / "usr/share/doc").glob("*/*"):
        if path.name != "copyright":
            _remove(path)


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    else:
        path.unlink()


def ensure_base_image() -> str:
    if podman("image", "exists", BASE_IMAGE, check=False).returncode != 0:
        podman("import", "--change", 'CMD ["/bin/bash"]', str(base_tarball()), BASE_IMAGE)
    return BASE_IMAGE


def build_image(tag: str = IMAGE) -> str:
    """Build the Dockerfile of this checkout on the local base (layers are cached between runs)."""
    base = ensure_base_image()
    # pip inside the build trusts what pip here trusts (a TLS-intercepting proxy's CA, say).
    ca_bundle = os.environ.get("PIP_CERT", "/etc/ssl/certs/ca-certificates.crt")
    secret = ["--secret", f"id=pip-ca,src={ca_bundle}"] if Path(ca_bundle).is_file() else []
    podman(
        "build", "--network", "host", "--build-arg", f"BASE_IMAGE={base}", "--layers", *secret,
        "-t", tag, "-f", str(REPO / "Dockerfile"), str(REPO),
        timeout=1200,
    )
    return tag


def image_size(tag: str = IMAGE) -> int:
    return int(podman("image", "inspect", "--format", "{{.Size}}", tag).stdout.strip())


@dataclass(frozen=True)
class Run:
    returncode: int
    stdout: str
    stderr: str
    seconds: float


def run_command(
    args: Sequence[str],
    *,
    network: str,
    caps: Sequence[str] = (),
    user: str | None = None,
    env: dict[str, str] | None = None,
    read_only: bool = True,
    volumes: Sequence[str] = (),
    name: str | None = None,
    remove: bool = True,
    entrypoint: str | None = None,
    image: str = IMAGE,
) -> list[str]:
    """``podman run`` of the image as an init container: every capability dropped but ``caps``."""
    # no-new-privileges: the pods in deploy/ say allowPrivilegeEscalation: false.
    command = [*PODMAN, "run", *RUN_LIMITS, "--network", network, "--security-opt", "no-new-privileges",
               "--cap-drop", "ALL"]
    if caps:
        command += ["--cap-add", ",".join(caps)]
    if user:
        command += ["--user", user]
    if read_only:
        # As Kubernetes' readOnlyRootFilesystem: podman would otherwise mount tmpfs on /run and /tmp.
        command += ["--read-only", "--read-only-tmpfs=false"]
    if remove:
        command.append("--rm")
    if name:
        command += ["--name", name]
    if entrypoint is not None:
        command += ["--entrypoint", entrypoint]
    for volume in volumes:
        command += ["-v", volume]
    for key, value in (env or {}).items():
        command += ["-e", f"{key}={value}"]
    return [*command, image, *args]


def run_container(args: Sequence[str], *, timeout: float = 120, **options: Any) -> Run:
    """Run :func:`run_command` (same options) to completion."""
    started = time.perf_counter()
    done = subprocess.run(run_command(args, **options), capture_output=True, text=True, timeout=timeout, check=False)
    return Run(done.returncode, done.stdout, done.stderr, time.perf_counter() - started)

def manifests() -> list[Path]:
    return sorted(DEPLOY.glob("*.yaml"))


def init_container(manifest: str = "pod.yaml") -> dict[str, Any]:
    """The (only) init container of a pod manifest in deploy/: its args and securityContext."""
    pod = yaml.safe_load((DEPLOY / manifest).read_text())
    (container,) = pod["spec"]["initContainers"]
    return container
