# HFL-TDX Lab. The two commands: `make run` (install + whole lab headless, local backend)
# and `make test` (lint + every test, slow end-to-end ones included).
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
export KERAS_BACKEND := tensorflow
export TF_CPP_MIN_LOG_LEVEL := 2
export MPLBACKEND := agg
export PYTHONHASHSEED := 0

.PHONY: install system-deps proto lint test test-fast run bench reliability clean

# Debian packages: cryptsetup (LUKS headers) and e2fsprogs (ext4 images) for the vault,
# shellcheck for the tests of the operator scripts in native/, chromium for the real-browser
# test of the notebooks (Playwright drives /usr/bin/chromium; no browser is downloaded);
# skopeo, umoci, docker-registry and gnupg for the workload image (build, encrypt, sign, a
# registry on loopback, pull: hfl_lab/image/).
system-deps:
	@missing=""; \
	command -v cryptsetup >/dev/null || missing="$$missing cryptsetup-bin"; \
	command -v mke2fs >/dev/null && command -v debugfs >/dev/null || missing="$$missing e2fsprogs"; \
	command -v shellcheck >/dev/null || missing="$$missing shellcheck"; \
	test -x /usr/bin/chromium || missing="$$missing chromium"; \
	for tool in skopeo umoci docker-registry; do \
	  command -v $$tool >/dev/null || missing="$$missing $$tool"; done; \
	command -v gpg >/dev/null && command -v gpgconf >/dev/null || missing="$$missing gnupg"; \
	if [ -n "$$missing" ]; then \
	  if [ "$$(id -u)" = 0 ]; then apt-get update -qq && apt-get install -y -qq $$missing; \
	  else echo "please install:$$missing (sudo apt-get install$$missing)"; exit 1; fi; \
	fi

$(STAMP): requirements.txt pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q --no-compile -r requirements.txt
	$(PY) -m pip install -q --no-deps --no-build-isolation -e .
	$(PY) -m trainer.proto
	$(PY) -m hfl_lab.trust.proto
	$(VENV)/bin/hfl-lab lab --install-kernel
	touch $(STAMP)

install: system-deps $(STAMP)

# Regenerate the gRPC stubs from trainer/proto/*.proto and hfl_lab/trust/proto/*.proto (also
# done at install and on import).
proto: $(STAMP)
	$(PY) -m trainer.proto
	$(PY) -m hfl_lab.trust.proto

lint: install
	$(VENV)/bin/ruff check hfl_lab trainer tests bench notebooks
	$(VENV)/bin/mypy hfl_lab trainer bench tests
	$(VENV)/bin/lint-imports --no-cache

# The R1 fuzzers run a fifth of their 10^5 inputs here (the full campaign: `make reliability`).
test: lint
	HFL_LAB_FUZZ_SCALE=0.2 $(PY) -m pytest

test-fast: install
	$(PY) -m pytest -m "not slow"

run: install
	$(VENV)/bin/hfl-lab run --profile quick

bench: install
	$(PY) -m bench

# The reliability and security suite; its figures (R1-R8, shared/docs/BENCH.md) go to
# bench/reliability.json. `make test` runs the same tests without writing the report.
reliability: install
	rm -f bench/reliability.json
	HFL_LAB_FUZZ_SCALE=1 HFL_LAB_RELIABILITY_REPORT=bench/reliability.json $(PY) -m pytest tests/reliability tests/security -q

clean:
	rm -rf $(VENV) .mypy_cache .ruff_cache .pytest_cache .hypothesis
