# The istio-iptables init-container image.
#
#   podman build --build-arg BASE_IMAGE=<a Debian bookworm image> -t istio-iptables .
#
# Runs as root and needs only NET_ADMIN and NET_RAW; works with a read-only root filesystem
# (every module is byte-compiled here, and Python never tries to write bytecode at run time).
# docs/image.md explains how tests/e2e/test_image.py builds and proves it with podman.

# Any Debian bookworm image: the official slim one, or one made locally with debootstrap.
ARG BASE_IMAGE=docker.io/library/debian:bookworm-slim

# ---- build: wheels from pinned, hashed requirements, installed into a venv -----------------------
FROM ${BASE_IMAGE} AS build
RUN apt-get update \
 && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends \
        python3 python3-venv python3-dev gcc libc6-dev \
 && rm -rf /var/lib/apt/lists/*
ENV PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_NO_CACHE_DIR=1 PIP_ROOT_USER_ACTION=ignore
WORKDIR /src

# The build toolchain is pinned too: python-iptables is an sdist (it compiles a small C helper),
# and both it and this project are built without build isolation, with exactly these tools.
# Behind a TLS-intercepting proxy, hand pip the CA bundle that trusts it as a build secret:
#   --secret id=pip-ca,src=/etc/ssl/certs/ca-certificates.crt   (nothing of it stays in the image)
# A PyPI mirror: --build-arg PIP_INDEX_URL=...  (the hashes still decide what is accepted)
ARG PIP_INDEX_URL
COPY requirements-build.lock requirements.lock ./
RUN --mount=type=secret,id=pip-ca \
    if [ -s /run/secrets/pip-ca ]; then export PIP_CERT=/run/secrets/pip-ca; fi \
 && python3 -m venv /opt/build \
 && /opt/build/bin/pip install --require-hashes --no-deps -r requirements-build.lock \
 && /opt/build/bin/pip wheel --require-hashes --no-deps --no-build-isolation -w /wheels -r requirements.lock

COPY pyproject.toml README.md ./
COPY istio_iptables ./istio_iptables
# unchecked-hash: the .pyc files stay valid whatever mtimes the copy into the next stage gives
# the sources, so a read-only root filesystem never sees a stale cache (nor a write attempt).
RUN /opt/build/bin/pip wheel --no-deps --no-build-isolation -w /wheels . \
 && python3 -m venv --without-pip /opt/istio-iptables \
 && /opt/build/bin/pip --python /opt/istio-iptables/bin/python install --no-index --no-deps /wheels/*.whl \
 && /opt/istio-iptables/bin/python -m compileall -q -j 0 --invalidation-mode unchecked-hash \
        /opt/istio-iptables/lib

# ---- runtime: the distribution's iptables (legacy and nft), nftables, iproute2, Python ----------
FROM ${BASE_IMAGE}
# The symlinks: one arch-independent path for the xtables extensions (python-iptables and iptables
# read XTABLES_LIBDIR), and the unversioned names python-iptables looks for in IPTABLES_LIBDIR
# (the -dev packages' only useful files here). Both spare `--applier libiptc` an ldconfig scan.
RUN apt-get update \
 && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends \
        python3 iptables nftables iproute2 \
 && apt-get clean \
 && rm -rf /var/lib/apt/lists/* /var/log/apt /var/log/dpkg.log \
 && libdir="/usr/lib/$(python3 -c 'import sysconfig; print(sysconfig.get_config_var("MULTIARCH"))')" \
 && ln -s "$libdir/xtables" /usr/local/lib/xtables \
 && ln -s libip4tc.so.2 "$libdir/libip4tc.so" \
 && ln -s libip6tc.so.2 "$libdir/libip6tc.so" \
 && test -e /usr/local/lib/xtables/libxt_REDIRECT.so -a -e "$libdir/libip4tc.so" -a -e "$libdir/libip6tc.so"
COPY --from=build /opt/istio-iptables /opt/istio-iptables

# PYTHONDONTWRITEBYTECODE: init containers often run with a read-only root filesystem.
# SETUPTOOLS_USE_DISTUTILS=stdlib: python-iptables imports distutils; never let a setuptools
# shim load its own copy (slow). XTABLES_LIBDIR: see above.
ENV PATH=/opt/istio-iptables/bin:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin \
    PYTHONDONTWRITEBYTECODE=1 \
    SETUPTOOLS_USE_DISTUTILS=stdlib \
    XTABLES_LIBDIR=/usr/local/lib/xtables

LABEL org.opencontainers.image.title="istio-iptables" \
      org.opencontainers.image.description="Pure-Python drop-in for Istio's istio-iptables init container" \
      org.opencontainers.image.licenses="Apache-2.0"

# Root, as Istio's init container; Kubernetes grants it only NET_ADMIN and NET_RAW.
USER 0:0
ENTRYPOINT ["/opt/istio-iptables/bin/istio-iptables"]
