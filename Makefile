# The two commands a newcomer needs: `make demo` and `make test` (both as root on Debian/Ubuntu).
VENV ?= .venv
PYTHON := $(VENV)/bin/python
APT_PACKAGES := iptables iproute2 nftables ipset conntrack libip4tc-dev libip6tc-dev
# Commands that must exist; a missing one triggers the apt-get install.
REQUIRED_COMMANDS := ip iptables-legacy-restore iptables-nft-restore nft ipset conntrack

.PHONY: deps venv demo test lint bench clean

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

test: deps venv
	$(VENV)/bin/ruff check .
	$(PYTHON) -m pytest -q

bench: deps venv
	$(PYTHON) bench/bench_dry_run.py

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache
