# make demo: set up .venv (once) and compress a built-in task, printing the measured report.
# make test: set up .venv (once) and run the whole test suite.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed-$(shell cat pyproject.toml | cksum | cut -d' ' -f1)
PIP    := $(BIN)/python -m pip -q --disable-pip-version-check

.PHONY: install demo test bench schema clean

install: $(STAMP)

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)

$(STAMP): pyproject.toml | $(BIN)/python
	$(PIP) install -e '.[dev]'
	rm -f $(VENV)/.installed-*
	touch $@

demo: install
	$(BIN)/edgecompress demo

test: install
	$(BIN)/python -m pytest

bench: install
	$(BIN)/python -m bench.prune

schema: install
	$(BIN)/python -c "from edgecompress.recipe import write_schema; write_schema('recipe.schema.json')"

clean:
	rm -rf $(VENV) edgecompress-out .pytest_cache
