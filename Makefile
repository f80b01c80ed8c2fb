# The two commands a newcomer needs: `make demo` and `make test`. Both install what they need.
SHELL := /bin/bash
.SHELLFLAGS := -eu -o pipefail -c
VENV ?= .venv
PY := $(VENV)/bin/python
APT_PACKAGES := debootstrap systemd-container zstd libsystemd-dev pkg-config gcc python3-dev \
                dbus-daemon systemd-journal-remote iproute2 rpm prometheus
STAMP := $(VENV)/.installed

.PHONY: demo test lint unit component system fuzz bench docs packages lab-image lab-shell deps apt clean

deps: apt $(STAMP)

apt:
	@missing=""; for p in $(APT_PACKAGES); do dpkg -s $$p >/dev/null 2>&1 || missing="$$missing $$p"; done; \
	if [ -n "$$missing" ]; then \
	  echo "installing Debian packages:$$missing"; \
	  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $$missing >/dev/null; \
	fi

$(STAMP): pyproject.toml
	python3 -m venv $(VENV)
	$(PY) -m pip install -q --disable-pip-version-check -e '.[dev]'
	touch $@

lint: deps
	$(VENV)/bin/ruff check src tests lab bench packaging
	$(VENV)/bin/ruff format --check src tests lab bench packaging
	$(VENV)/bin/mypy

# Each layer is its own pytest run: a layer that runs no test fails (pytest exits 5).
unit: deps
	$(PY) -m pytest -m unit tests/unit

component: deps
	$(PY) -m pytest -m component tests/component

system: deps
	$(PY) -m pytest -m system tests/system

test: lint unit component system

# Property tests (tests/unit/test_fuzz_*.py) with many more cases than `make test` runs; long.
fuzz: deps
	HYPOTHESIS_PROFILE=fuzz $(PY) -m pytest -m unit --timeout=0 tests/unit -k fuzz

demo: deps
	$(PY) -m lab.demo

bench: deps
	$(PY) bench/socket_dir.py
	$(PY) bench/hung.py
	$(PY) bench/sighup_storm.py
	$(PY) bench/second_guide.py
	$(PY) bench/config_down.py
	$(PY) bench/journal_lines.py
	$(PY) bench/journal_flood.py
	$(PY) bench/idle.py
	$(PY) bench/placeholder.py

# .deb and .rpm from packaging/nfpm.yaml into build/packages/ (docs/packaging.md)
packages: deps
	$(PY) packaging/build.py

# docs/policy.md is generated from the policy models' docstrings (a unit test checks it is current).
docs: deps
	$(PY) -m nodemedic policy-reference --write docs/policy.md

lab-image: deps
	$(PY) -m lab build

lab-shell: deps
	$(PY) -m lab shell

clean:
	rm -rf $(VENV) .mypy_cache .ruff_cache .pytest_cache build
