# `make test` and `make run` create the virtualenv on first use: nothing else to run before them.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
SIM_DEVICES := XLA_FLAGS="--xla_force_host_platform_device_count=8 --xla_backend_optimization_level=0"

.PHONY: test run lint bench bench-gpu anchors clean

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

# The one GPU script (issue 30), with the machine's own python3 (the GPU image has no venv and no network,
# so the checkout goes on PYTHONPATH instead of being installed): sections in priority order under one
# 450 s budget (`python3 experiments/gpu_bench.py --help`); GPU_OUT/results.json and table.txt.
GPU_OUT ?= results/gpu
bench-gpu: anchors
	PYTHONPATH=$(CURDIR)$${PYTHONPATH:+:$$PYTHONPATH} $(PYTHON) experiments/gpu_bench.py --out $(GPU_OUT)

# The plain-JAX anchor lives beside the checkout (../shared/anchors, not part of this project): copied into
# the ignored .anchors/ where that exists, so a machine that gets only the checkout (carry .anchors) has it.
anchors:
	@if [ -f ../shared/anchors/gpu_ref.py ]; then mkdir -p .anchors && cp -f ../shared/anchors/gpu_ref.py .anchors/; \
	else echo "no ../shared/anchors/gpu_ref.py here: the anchor section uses .anchors/ if present, else skips"; fi

lint: $(STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache results
