# Quick start: `make demo` (main job on the embedded default) and `make test`. Both create .venv by themselves.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: demo test test-fast bench bench-cpu bench-gpu report baselines results reproduce install clean

# constraints.txt: the versions known to work (torch and torchvision by range: the registry serves other builds
# per machine); pyproject.toml keeps the ranges a user's own environment may use.
$(STAMP): pyproject.toml constraints.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -c constraints.txt -e '.[dev]'
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(PY) experiments/run.py method=adavit

# The suite in two passes: most tests spread over $(JOBS) xdist workers, then the tests marked `serial` (SLURM, the
# source-tree writers; tests/conftest.py) alone. Both passes always run; the target fails if either fails. Exit 5
# ("no tests collected", e.g. every serial test deselected) is not a failure. PYTEST_ARGS narrows both passes, e.g.
# `make test PYTEST_ARGS=tests/test_configs.py`.
JOBS ?= 2
PYTEST_ARGS ?=
PYTEST_PASSES = status=0; \
	echo "== pytest: parallel pass ($(JOBS) workers)"; \
	$(PY) -m pytest -q -n $(JOBS) --dist loadgroup -m "not serial and $(1)" $(2) $(PYTEST_ARGS) || [ $$? -eq 5 ] || status=1; \
	echo "== pytest: serial pass"; \
	$(PY) -m pytest -q -m "serial and $(1)" $(2) $(PYTEST_ARGS) || [ $$? -eq 5 ] || status=1; \
	exit $$status

test: $(STAMP)
	@$(call PYTEST_PASSES,not benchmark,--timeout=1200)

test-fast: $(STAMP)
	@$(call PYTEST_PASSES,not slow and not slurm and not benchmark,)

bench: $(STAMP)
	mkdir -p results/benchmarks
	$(PY) -m pytest tests/benchmarks -m benchmark --benchmark-enable --benchmark-json=results/benchmarks/bench.json

bench-gpu: $(STAMP)  ## the GPU table (DeiT-S/B, batch 1/64/256, fp32/bf16, every method x 2 settings); refuses without a GPU
	$(PY) experiments/bench.py gpu

bench-cpu: $(STAMP)  ## the CPU table (DeiT-S at 224 px, batch 1/32/64, 1 and 2 threads)
	$(PY) experiments/bench.py cpu --threads 1,2

RESULTS ?= results

results: $(STAMP)  ## rebuild the committed records (experiments/regeneration.yaml); resumable: skips what exists
	$(PY) -m experiments.regenerate $(if $(STAGE),--stage $(STAGE),)

SEEDS ?= 0,1,2,3,4
baselines: $(STAMP)  ## train (where .cache/baselines lacks them) and ship the embedded dense baselines into results/baselines
	$(PY) -m experiments.ship_baselines -m seed=$(SEEDS)

report: $(STAMP)  ## tables + figures from the records under $(RESULTS) into $(RESULTS)/report/
	$(PY) -m analysis.run_report $(RESULTS)

CHECKPOINTS ?= checkpoints/released
IMAGENET ?= /datasets/imagenet
# overrides for every run, e.g. REPRODUCE_ARGS="launcher=slurm hydra.launcher.partition=gpu" (one SLURM job array)
REPRODUCE_ARGS ?=

reproduce: $(STAMP)  ## evaluate every released checkpoint in $(CHECKPOINTS) on $(IMAGENET)/val; records + report table
	$(PY) -m experiments.reproduce --checkpoints $(CHECKPOINTS) --imagenet $(IMAGENET) $(REPRODUCE_ARGS)

clean:
	rm -rf $(VENV) outputs .cache .pytest_cache
