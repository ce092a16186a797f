# The README's commands. `make quickstart` and `make test` are all a user types on a
# fresh Debian 12 machine (as root): each runs `setup` first, which installs what is
# missing and nothing else.

PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

# Debian packages the product and its tests use: kernel tools for the lab and the agent
# (iproute2, iptables, nftables, conntrack), tshark as the independent IPFIX decoder and
# softflowd as an independent IPFIX exporter, iperf3 for traffic, libnetfilter-queue-dev
# and a compiler for NetfilterQueue, and the Python venv/headers.
APT_PACKAGES := iproute2 iptables nftables conntrack tshark softflowd iperf3 procps \
	libnetfilter-queue-dev build-essential python3-venv python3-dev

.PHONY: setup system-packages quickstart test bench lint

setup: system-packages $(STAMP)

system-packages:
	@missing=""; for p in $(APT_PACKAGES); do \
		dpkg-query -W -f='$${Status}' $$p 2>/dev/null | grep -q "install ok installed" || missing="$$missing $$p"; \
	done; \
	if [ -n "$$missing" ]; then \
		echo "installing Debian packages:$$missing"; \
		echo "wireshark-common wireshark-common/install-setuid boolean false" | debconf-set-selections; \
		DEBIAN_FRONTEND=noninteractive apt-get update -q && \
		DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends $$missing; \
	fi

$(STAMP): setup.cfg pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[dev]'
	touch $(STAMP)

quickstart: setup
	$(VENV)/bin/antrea-flow quickstart $(ARGS)

test: setup
	$(PY) -m pytest -q $(ARGS)

bench: setup
	@for b in test/bench/bench_*.py; do echo "== $$b"; $(PY) $$b || exit 1; done

lint: setup
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
