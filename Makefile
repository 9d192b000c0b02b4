# Every target uses the project's own virtual environment, $(VENV) (default .venv-cce-jax), created on first use
# and refreshed in place (pip install, nothing deleted) when pyproject.toml changes. The Makefile marks the
# environments it creates ($(MARKER)) and never installs into, or removes, a directory without that mark: point
# VENV elsewhere to use another path.
PYTHON ?= python3
VENV ?= .venv-cce-jax
PY := $(VENV)/bin/python
MARKER := $(VENV)/.created-by-cce-jax-makefile
PYTEST_WORKERS ?= auto

.PHONY: demo test check-wheel bench clean

$(VENV)/.installed: pyproject.toml
	@if [ -e "$(VENV)" ] && [ ! -e "$(MARKER)" ]; then \
		echo "$(VENV) exists but was not created by this Makefile (no $(MARKER)); leaving it alone." >&2; \
		echo "Remove it yourself or run make with VENV=<another path>." >&2; exit 1; fi
	@if [ ! -e "$(VENV)" ]; then $(PYTHON) -m venv "$(VENV)" && touch "$(MARKER)"; fi
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e ".[test,tunix]"
	$(PY) -m pip install -q --no-deps google-tunix==0.1.7  # its declared dependencies are too heavy: README, Tunix models
	touch $@

demo: $(VENV)/.installed
	$(PY) examples/train.py

# pytest-xdist workers (PYTEST_WORKERS=0 runs in one process); the cache lives inside the venv so that
# `make clean` removes it with the venv.
test: $(VENV)/.installed
	$(PY) -m pytest -n $(PYTEST_WORKERS) -o cache_dir=$(VENV)/.pytest_cache

# Builds the sdist and wheel, installs the wheel (no dependencies) into a fresh virtual environment that borrows
# $(VENV)'s packages, imports every package and checks the extras in its metadata.
check-wheel: $(VENV)/.installed
	$(PY) .ci/check_wheel.py

bench: $(VENV)/.installed
	$(PY) -m cce_jax.benchmark --shape small

clean:
	@if [ -e "$(MARKER)" ]; then rm -rf "$(VENV)"; \
	elif [ -e "$(VENV)" ]; then echo "$(VENV) was not created by this Makefile; not removing it." >&2; fi
