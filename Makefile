# Both entry points bootstrap what they need (idempotent) and then run:
#   make run   the daemon on configs/demo.yaml: embedded broker, real data streaming in, training, growing, serving
#   make test  lint, type check and the whole test suite (real broker, real data, real HTTP)
VENV    := .venv
PY      := $(VENV)/bin/python
STAMP   := $(VENV)/.installed-stamp
PYTHON  ?= python3
CONFIG  ?= configs/demo.yaml
PYTEST_ARGS ?=

.PHONY: bootstrap debian-packages run test lint typecheck clean

$(STAMP): requirements.txt requirements-nodeps.txt pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --disable-pip-version-check -r requirements.txt
	$(PY) -m pip install -q --disable-pip-version-check --no-deps -r requirements-nodeps.txt
	$(PY) -m pip install -q --disable-pip-version-check --no-deps -e .
	touch $@

debian-packages:
	bash scripts/install-debian-packages.sh

bootstrap: $(STAMP) debian-packages

run: bootstrap
	$(VENV)/bin/growclip-daemon start --config $(CONFIG)

lint: $(STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

typecheck: $(STAMP)
	$(VENV)/bin/mypy

test: bootstrap lint typecheck
	$(PY) -m pytest $(PYTEST_ARGS)

clean:
	rm -rf $(VENV) .state .pytest_cache .mypy_cache .ruff_cache
