# localsbx: all set-up is here, idempotent and quick when already done.
#   make demo   - set up everything, build the example image, start a sandbox, run a command in it
#   make test   - set up everything and run the whole test suite (VM tests on real QEMU)
#   make bench  - benchmarks (cold boot vs restore, sizes, memory, every built base, registry pulls;
#                 BENCH_ARGS=--bases for the bases alone)

SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
LSBX := $(VENV)/bin/localsbx
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)
STAMPS := .stamps
BASE ?= debian-minimal

# Host packages: QEMU, the rootfs/initramfs tools, a C compiler for the static guest agent,
# skopeo + umoci for FROM a registry image, docker-registry for the tests' local registry.
APT_PACKAGES := qemu-system-x86 qemu-utils mmdebstrap e2fsprogs busybox-static cpio uidmap \
	debian-archive-keyring lz4 zstd xz-utils gcc libc6-dev python3-venv coreutils tar passt \
	skopeo umoci docker-registry fakeroot nftables

.PHONY: setup apt venv base ts-sdk demo test test-bases test-unit fuzz bench lint clean-stamps

setup: apt venv base

apt:
	@missing=$$(for p in $(APT_PACKAGES); do dpkg-query -W -f='$${Status}\n' $$p 2>/dev/null | grep -q '^install ok installed' || echo $$p; done); \
	if [ -n "$$missing" ]; then \
	  echo "== installing host packages:" $$missing; \
	  $(SUDO) apt-get update -qq && \
	  DEBIAN_FRONTEND=noninteractive $(SUDO) apt-get install -y -qq --no-install-recommends $$missing; \
	fi

$(STAMPS)/venv: pyproject.toml
	@mkdir -p $(STAMPS)
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[dev]'
	@touch $@

venv: $(STAMPS)/venv

base: apt venv
	@$(LSBX) base ls --json | $(PY) -c 'import json,sys; b={x["name"]:x for x in json.load(sys.stdin)}; sys.exit(0 if b.get("$(BASE)",{}).get("state")=="built" else 1)' \
	  || $(LSBX) base build $(BASE)

demo: setup
	$(LSBX) image build images/examples/hello/Dockerfile -n hello >/dev/null
	@id=$$($(LSBX) new --image hello) && echo "== sandbox $$id" && \
	  $(LSBX) exec $$id -- ./hello.sh; rc=$$?; $(LSBX) terminate $$id; exit $$rc

# The npm tensorlake SDK and a Node 22 runtime for tests/sdk (from the npm registry).
$(STAMPS)/ts-sdk: tests/sdk/ts/package.json tests/sdk/ts/package-lock.json
	@mkdir -p $(STAMPS)
	cd tests/sdk/ts && npm ci --silent --no-audit --no-fund
	@touch $@

ts-sdk: $(STAMPS)/ts-sdk

test: setup lint ts-sdk
	$(VENV)/bin/pytest -ra --durations=30 $(PYTEST_ARGS)

# the systemd bases alone (also in `make test`): systemd as PID 1, Docker inside debian-systemd,
# the debian-vnc desktop with Firefox. Measured here on a warm store (2026-12-03, TCG, each on
# its own): Docker 52 s, desktop + Firefox 278 s (609 s in a second run at load 4-7, Firefox's
# first start taking 564 s of it), against about 2130 s for the rest of `make test`. A store without them builds them lazily, once, and reuses them: the debian-vnc base
# (build_seconds 123 in its base.json), its image (snapshot once systemd has drawn the desktop,
# 294 s) and the t-docker image (apt-get of docker.io in the guest, 608 s), about 17 min more
# on that first run. LOCALSBX_HEAVY=0 leaves the two heavy tests out of a quick local run.
test-bases: setup
	$(VENV)/bin/pytest -ra tests/vm/test_bases_systemd.py $(PYTEST_ARGS)

test-unit: venv
	$(VENV)/bin/pytest -ra tests/unit $(PYTEST_ARGS)

# property tests of the Dockerfile front end and .dockerignore: FUZZ_EXAMPLES inputs per test
# (make test runs 1500 each)
FUZZ_EXAMPLES ?= 100000
fuzz: venv
	LOCALSBX_FUZZ=$(FUZZ_EXAMPLES) $(VENV)/bin/pytest -ra -q tests/unit/test_faults_fuzz.py $(PYTEST_ARGS)

bench: setup
	$(PY) -m bench.run $(BENCH_ARGS)

lint: venv
	$(VENV)/bin/ruff check localsbx conftest_plugin tests bench

clean-stamps:
	rm -rf $(STAMPS)
