# make test: builds .venv when missing, installs zmesh with its test extras, lints, runs pytest.
# make up: the same .venv, then `meshctl up` (the mesh and bookinfo on this machine, as root; Ctrl-C stops it).
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: test lint bench clean up down

$(BIN)/python:
	$(PY) -m venv $(VENV)

$(STAMP): $(BIN)/python setup.cfg pyproject.toml
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -e '.[test]'
	touch $(STAMP)

lint: $(STAMP)
	$(BIN)/ruff check .

test: lint
	$(BIN)/pytest $(PYTEST_ARGS)

up: $(STAMP)
	$(BIN)/meshctl up

down: $(STAMP)
	$(BIN)/meshctl down

bench: $(STAMP)
	$(BIN)/python benchmarks/bus_fanout.py --quick

clean:
	rm -rf $(VENV) build *.egg-info
