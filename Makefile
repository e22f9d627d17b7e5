# snaketune: `make demo` sets up and runs the default study; `make test` sets up and runs the tests.
VENV   ?= .venv
PYTHON ?= python3
TORCH  ?= torch==2.13.0
CORES  ?= 2
BIN     = $(VENV)/bin
export PATH := $(abspath $(BIN)):$(PATH)

.PHONY: setup demo test lint report clean

setup: $(VENV)/.installed

# torch first, from its own line, so that no later package pulls a different (CUDA) build
$(VENV)/.installed: requirements.txt constraints.txt pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet $(TORCH)
	$(BIN)/python -m pip install --quiet -r requirements.txt -c constraints.txt
	$(BIN)/python -m pip install --quiet --no-deps -e .
	touch $@

demo: setup
	$(BIN)/snakemake --cores $(CORES) --printshellcmds

test: setup
	$(BIN)/python -m pytest -q

lint: setup
	$(BIN)/snakemake --lint

clean:
	rm -rf results .snakemake
