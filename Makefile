# The README's commands. `make quickstart` and `make test` are all a user types on a
# fresh Debian 12 machine (as root): each runs `setup` first, which installs what is
# missing and nothing else.

PYTHON ?= python3
# Seconds `make fuzz` spends on each harness of test/fuzz/.
FUZZ_SECONDS ?= 600
FUZZ_TARGETS := decoder framing config
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

# Debian packages the product and its tests use: kernel tools for the lab and the agent
# (iproute2, iptables, nftables, conntrack), tshark as the independent IPFIX decoder and
# softflowd as an independent IPFIX exporter, iperf3 for traffic, libnetfilter-queue-dev
# and a compiler for NetfilterQueue, the Python venv/headers, for the eBPF counter path
# BCC (python3-bpfcc) with Debian's kernel headers, which BCC compiles against, and the
# eBPF benchmark's libpcap peers (tcpdump, pmacct); for the collectors' tests Ruby (the
# Logstash filter runs in it), curl (the Kibana import Job's script), shellcheck and
# vagrant (the Vagrant deployment's scripts); Chromium and its WebDriver (with a font) for
# the web UI's tests in a real browser.
APT_PACKAGES := iproute2 iptables nftables conntrack tshark softflowd iperf3 procps \
	libnetfilter-queue-dev build-essential python3-venv python3-dev \
	python3-bpfcc linux-headers-amd64 tcpdump pmacct ruby shellcheck vagrant curl \
	chromium chromium-driver fonts-dejavu-core

.PHONY: setup system-packages kernel-headers quickstart test bench lint fuzz manifests

setup: system-packages kernel-headers $(STAMP)
	@$(PY) build/ui_assets.py
	@# BCC is Debian's (its Python module binds the system's libbcc): the venv links it.
	@site=$$($(PY) -c 'import sysconfig; print(sysconfig.get_path("purelib"))'); \
	if [ -d /usr/lib/python3/dist-packages/bcc ] && [ ! -e $$site/bcc ]; then \
		ln -s /usr/lib/python3/dist-packages/bcc $$site/bcc; fi

# BCC finds headers at /lib/modules/$(uname -r)/build, and needs both halves of Debian's
# split headers (the arch part there, the common part at `source`). A kernel that ships no
# headers of its own gets links to Debian's generic ones: the counter uses only UAPI
# structures, the same in every kernel.
kernel-headers: system-packages
	@release=$$(uname -r); dir=/lib/modules/$$release; \
	arch=$$(ls -d /usr/src/linux-headers-*-amd64 2>/dev/null | sort -V | tail -1); \
	common=$$(ls -d /usr/src/linux-headers-*-common 2>/dev/null | sort -V | tail -1); \
	if [ ! -e $$dir/build ] && [ -n "$$arch" ] && [ -n "$$common" ]; then \
		mkdir -p $$dir && ln -sfn $$arch $$dir/build && ln -sfn $$common $$dir/source && \
		echo "linked $$dir/build -> $$arch and $$dir/source -> $$common"; fi

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

# build/yamls/ from build/generate.py and the default config files (a test checks they agree).
manifests: setup
	$(PY) build/generate.py

lint: setup
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/mypy

# Each harness at length over a working corpus in out/fuzz/<target> (kept between runs, so
# each run starts where the last left off); a crash stops that harness, the others go on.
fuzz: setup
	@failed=""; for t in $(FUZZ_TARGETS); do \
		mkdir -p out/fuzz/$$t out/fuzz/crashes/$$t; \
		cp -rn test/fuzz/corpus/$$t/. out/fuzz/$$t/; \
		echo "== fuzz $$t for $(FUZZ_SECONDS) s (log: out/fuzz/$$t.log)"; \
		$(PY) test/fuzz/fuzz_$$t.py -max_total_time=$(FUZZ_SECONDS) -print_final_stats=1 \
			-artifact_prefix=out/fuzz/crashes/$$t/ out/fuzz/$$t >out/fuzz/$$t.log 2>&1 \
			|| { failed="$$failed $$t"; grep -A3 -m1 "Uncaught Python exception" out/fuzz/$$t.log; \
			grep "Test unit written to" out/fuzz/$$t.log; }; \
		grep -E "^#[0-9]+[[:space:]]" out/fuzz/$$t.log | tail -1; \
		echo "$$t: $$(sed -n 's/^stat::number_of_executed_units: *//p' out/fuzz/$$t.log) inputs executed"; \
	done; \
	if [ -n "$$failed" ]; then echo "crashes in:$$failed (out/fuzz/crashes/)"; exit 1; fi
