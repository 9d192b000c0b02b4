# Every target builds its own virtual environment from scratch if it is missing or stale.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python

.PHONY: demo test bench clean

$(VENV)/.installed: pyproject.toml
	rm -rf $(VENV)
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e ".[test]"
	$(PY) -m pip install -q -e ".[test,tunix]" && $(PY) -m pip install -q --no-deps google-tunix==0.1.7  # README: Tunix models
	touch $@

demo: $(VENV)/.installed
	$(PY) examples/train.py

test: $(VENV)/.installed
	$(PY) -m pytest

bench: $(VENV)/.installed
	$(PY) -m cce_jax.benchmark --shape small

clean:
	rm -rf $(VENV) .pytest_cache
