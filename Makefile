# runlora_nb developer entry points. Everything installs into .venv; nothing touches the system Python.
PYTHON ?= python3
VENV ?= .venv
# torch first, pinned: on the project machine 2.13.0 is a local CPU wheel; any other request pulls a CUDA build.
TORCH_SPEC ?= torch==2.13.0
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
PYTEST_ARGS ?=
LAB_PORT ?= 8888
export HF_HUB_OFFLINE ?= 1
export PIP_DISABLE_PIP_VERSION_CHECK = 1

.PHONY: help install test test-fast test-latest lock lint format lab demo bench browser-deps clean
LOCK := requirements-lock.txt
LATEST_VENV ?= .venv-latest

help:
	@echo "make install      create $(VENV), install $(TORCH_SPEC) first, then the tested versions in $(LOCK), then -e ."
	@echo "make lock         re-resolve $(LOCK) from pyproject.toml (+dev) with uv: update the tested versions on purpose"
	@echo "make test-latest  the suite in $(LATEST_VENV) against the newest releases; prints what drifted from the lock"
	@echo "make test         install, then run the whole test suite (the CI command)"
	@echo "make test-fast    skip the browser and notebook tests"
	@echo "make lint         ruff check + ruff format --check"
	@echo "make lab          install, fetch the default model, open JupyterLab on notebooks/ (127.0.0.1, token)"
	@echo "make demo         headless main job: race chains, fine-tune SmolLM2-135M, write artifacts/report.html"
	@echo "make bench        the layer benchmark grid (prints a table, writes artifacts/bench_layers.csv)"

# The lock holds every direct and transitive dependency at the versions the suite was run with; the project
# itself goes in with --no-deps so nothing outside the lock is resolved. pip check catches a stale lock.
$(VENV)/.installed: pyproject.toml $(LOCK)
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	$(PIP) install -q "$(TORCH_SPEC)"
	$(PIP) install -q -r $(LOCK)
	$(PIP) install -q --no-deps -e .
	$(PIP) check
	touch $@

install: $(VENV)/.installed

# Debian's chromium for the real-browser test (never `playwright install`: it downloads its own browser).
browser-deps:
	@if [ ! -x /usr/bin/chromium ]; then \
	  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
	    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null; \
	  else echo "browser-deps: /usr/bin/chromium missing; run 'sudo apt-get install chromium' for the browser test"; fi; \
	fi

lock: install
	$(PIP) install -q uv
	UV=$(VENV)/bin/uv scripts/lock.sh --upgrade

# Not part of CI: the newest releases the floors in pyproject.toml admit. Failures here are future work.
test-latest: browser-deps
	test -x $(LATEST_VENV)/bin/python || $(PYTHON) -m venv $(LATEST_VENV)
	$(LATEST_VENV)/bin/python -m pip install -q --upgrade pip
	$(LATEST_VENV)/bin/python -m pip install -q "$(TORCH_SPEC)"
	$(LATEST_VENV)/bin/python -m pip install -q --upgrade --upgrade-strategy eager -e '.[dev]'
	$(LATEST_VENV)/bin/python scripts/lock_drift.py $(LOCK)
	RUNLORA_NB_LATEST=1 $(LATEST_VENV)/bin/python -m pytest $(PYTEST_ARGS); rc=$$?; \
	  $(LATEST_VENV)/bin/python scripts/lock_drift.py $(LOCK); echo "test-latest: pytest exit status $$rc"; exit $$rc

test: install browser-deps
	$(PY) -m pytest $(PYTEST_ARGS)

test-fast: install
	$(PY) -m pytest -m "not browser and not notebooks" $(PYTEST_ARGS)

lint: install
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

format: install
	$(VENV)/bin/ruff check --fix .
	$(VENV)/bin/ruff format .

lab: install
	$(VENV)/bin/runlora-nb fetch smollm2-135m
	$(VENV)/bin/jupyter lab --no-browser --ip=127.0.0.1 --port=$(LAB_PORT) \
	  --ServerApp.root_dir=notebooks $(if $(filter 0,$(shell id -u)),--allow-root,) \
	  notebooks/00_dashboard.ipynb

demo: install
	$(VENV)/bin/runlora-nb demo --out artifacts

bench: install
	$(VENV)/bin/runlora-nb bench grid --csv artifacts/bench_layers.csv

clean:
	rm -rf $(VENV) $(LATEST_VENV) build *.egg-info .pytest_cache .ruff_cache .hypothesis artifacts
