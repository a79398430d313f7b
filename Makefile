# The two commands a newcomer needs: `make demo` and `make test` (both as root on Debian/Ubuntu).
VENV ?= .venv
PYTHON := $(VENV)/bin/python
APT_PACKAGES := iptables iproute2 nftables ipset conntrack libip4tc-dev libip6tc-dev
# Commands that must exist; a missing one triggers the apt-get install.
REQUIRED_COMMANDS := ip iptables-legacy-restore iptables-nft-restore nft ipset conntrack

.PHONY: deps venv demo demo-ambient test image-test cni-runtime-test bench clean

deps:
	@missing=""; for c in $(REQUIRED_COMMANDS); do command -v $$c >/dev/null 2>&1 || missing="$$missing $$c"; done; \
	if [ -n "$$missing" ]; then \
		echo "installing$$missing (apt: $(APT_PACKAGES))"; \
		apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $(APT_PACKAGES) >/dev/null; \
	fi

$(VENV)/.installed: pyproject.toml
	python3 -m venv $(VENV)
	$(VENV)/bin/pip install -q --upgrade pip
	$(VENV)/bin/pip install -q -e '.[test]'
	touch $@

venv: $(VENV)/.installed

demo: deps venv
	$(PYTHON) scripts/demo.py

demo-ambient: deps venv
	$(PYTHON) scripts/demo.py --ambient

test: deps venv
	$(VENV)/bin/ruff check .
	$(PYTHON) -m pytest -q

# Builds the init-container image with podman on a local debootstrap base and runs it as Kubernetes would.
IMAGE_APT_PACKAGES := podman runc debootstrap
image-test: deps venv
	@for c in $(IMAGE_APT_PACKAGES); do command -v $$c >/dev/null 2>&1 || { \
		echo "installing $(IMAGE_APT_PACKAGES)"; apt-get update -qq && \
		DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $(IMAGE_APT_PACKAGES) >/dev/null; break; }; done
	ISTIO_IPTABLES_IMAGE_TEST=1 $(PYTHON) -m pytest -q -rxX tests/e2e/test_image.py

# istio-cni called by a real runtime: podman's CNI backend with Debian's bridge plugin (docs/cni.md).
CNI_RUNTIME_APT_PACKAGES := podman runc containernetworking-plugins busybox-static
cni-runtime-test: deps venv
	@test -x /usr/lib/cni/bridge && command -v podman >/dev/null && command -v busybox >/dev/null || { \
		echo "installing $(CNI_RUNTIME_APT_PACKAGES)"; apt-get update -qq && \
		DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $(CNI_RUNTIME_APT_PACKAGES) >/dev/null; }
	ISTIO_IPTABLES_CNI_RUNTIME_TEST=1 $(PYTHON) -m pytest -q -rxX tests/e2e/test_cni_runtime.py

bench: deps venv
	$(PYTHON) bench/bench_apply.py
	$(PYTHON) bench/bench_nft.py
	$(PYTHON) bench/bench_speed.py --skip-scale
	$(PYTHON) bench/bench_cni.py

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache
