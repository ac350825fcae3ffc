# The README's two commands (`make demo`, `make test`) are the whole set-up:
# each creates .venv if missing and installs what it needs.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
BASE_STAMP := $(VENV)/.base-installed
FULL_STAMP := $(VENV)/.full-installed
PIP := $(PY) -m pip install -q --disable-pip-version-check
PY_DIRS := mer sim traces analysis tests bench setup.py

.PHONY: demo test lint format bench clean install

$(PY):
	$(PYTHON) -m venv $(VENV)

$(BASE_STAMP): pyproject.toml setup.py | $(PY)
	$(PIP) --upgrade pip setuptools wheel
	$(PIP) -e .
	touch $@

# torch first, pinned, so that transformers does not pull a CUDA build.
$(FULL_STAMP): $(BASE_STAMP)
	$(PIP) torch==2.13.0
	$(PIP) -e ".[dev,record,generate,dist,peers]"
	touch $@

install: $(BASE_STAMP)

demo: $(BASE_STAMP)
	$(PY) -m mer demo

test: $(FULL_STAMP)
	$(PY) -m pytest

# mypy needs the installed layout (sim/ -> mer/sim, ...): a tree of symlinks gives it that.
TYPECHECK := build/typecheck

lint: $(FULL_STAMP)
	$(VENV)/bin/ruff check $(PY_DIRS)
	$(VENV)/bin/ruff format --check $(PY_DIRS)
	rm -rf $(TYPECHECK) && mkdir -p $(TYPECHECK)/mer
	for f in mer/*; do ln -s "$(CURDIR)/$$f" $(TYPECHECK)/mer/; done
	for d in sim traces analysis; do ln -s "$(CURDIR)/$$d" $(TYPECHECK)/mer/$$d; done
	cd $(TYPECHECK) && $(CURDIR)/$(VENV)/bin/mypy --config-file $(CURDIR)/pyproject.toml -p mer

format: $(FULL_STAMP)
	$(VENV)/bin/ruff format $(PY_DIRS)
	$(VENV)/bin/ruff check --fix $(PY_DIRS)

bench: $(FULL_STAMP)
	$(PY) bench/run_all.py

clean:
	rm -rf $(VENV) build *.egg-info out
