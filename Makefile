# Two commands a newcomer needs: `make demo` and `make test`. Each creates .venv on first use.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
DEV := $(VENV)/.installed-dev

.PHONY: demo test test-slow lint typecheck docs ci clean

# torch first, pinned to the CPU build (a bare torch requirement pulls several GB of CUDA wheels)
$(STAMP): pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -c constraints.txt torch==2.13.0
	$(PY) -m pip install --quiet -c constraints.txt -e '.[test]'
	touch $(STAMP)

$(DEV): $(STAMP)
	$(PY) -m pip install --quiet -c constraints.txt -e '.[dev]'
	touch $(DEV)

demo: $(STAMP)
	$(PY) -m infkit demo

# a worker per core (at most 4: each holds its own torch and test data), one thread each
test: $(STAMP)
	$(PY) -m pytest -q -n auto --maxprocesses 4 --dist worksteal

test-slow: $(STAMP)
	$(PY) -m pip install --quiet -c constraints.txt -e '.[test,hf]'
	$(PY) -m pytest -q -m slow

lint: $(DEV)
	$(PY) -m ruff check src tests benchmarks examples
	$(PY) -m ruff format --check src tests benchmarks examples

typecheck: $(DEV)
	$(PY) -m mypy

docs: $(DEV)
	$(PY) -m mkdocs build --strict --site-dir build/site

# everything CI checks (.ci/run)
ci: lint typecheck docs test

clean:
	rm -rf $(VENV) runs .pytest_cache build
