# make deps: installs the apt packages of ops/apt-packages.txt that are missing (as root; otherwise it
#   prints the sudo line and stops). test, up and bench run it first; a second run does nothing.
# make test: builds .venv when missing, installs zmesh with its test extras, lints (ruff, and lint-imports
#   for the layering in .importlinter), runs pytest.
# make up: the same .venv, then `meshctl up` (the mesh and bookinfo on this machine, as root; Ctrl-C stops it).
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: deps test lint bench clean up down

deps:
	@ops/deps.sh

# order-only: the venv and NetfilterQueue's build need the packages, but are not rebuilt for them
$(BIN)/python: | deps
	$(PY) -m venv $(VENV)

$(STAMP): $(BIN)/python setup.cfg pyproject.toml | deps
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -e '.[test]'
	touch $(STAMP)

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/lint-imports

test: deps lint
	$(BIN)/pytest $(PYTEST_ARGS)

up: deps $(STAMP)
	$(BIN)/meshctl up

down: $(STAMP)
	$(BIN)/meshctl down

bench: deps $(STAMP)
	$(BIN)/python benchmarks/bus_fanout.py --quick

clean:
	rm -rf $(VENV) build *.egg-info
