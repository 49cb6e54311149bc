# `make test` and `make run` create the virtualenv on first use: nothing else to run before them.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
SIM_DEVICES := XLA_FLAGS="--xla_force_host_platform_device_count=8 --xla_backend_optimization_level=0"

.PHONY: test run lint bench bench-gpu clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[dev]'
	touch $(STAMP)

test: $(STAMP)
	$(SIM_DEVICES) $(PY) -m pytest -q -n 2 --dist loadfile

# Every strategy on dp=2,tp=4 (8 simulated CPU devices without an accelerator): table, results/, plots.
run: $(STAMP)
	$(PY) experiments/run.py

# The run BENCHMARKS.md records, into results/bench.
bench: $(STAMP)
	$(PY) experiments/run.py --out results/bench

# Issue 13's one-GPU benchmark, with the machine's own python3 (the GPU image has no venv and no network,
# so the checkout goes on PYTHONPATH instead of being installed): gpt2 MFU, decode vs its bandwidth floor,
# the naive generator; results/gpu/results.json and table.txt.
bench-gpu:
	PYTHONPATH=$(CURDIR)$${PYTHONPATH:+:$$PYTHONPATH} $(PYTHON) experiments/gpu_bench.py --out results/gpu

lint: $(STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache results
