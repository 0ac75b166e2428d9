# Quick start: `make demo` (main job on the embedded default) and `make test`. Both create .venv by themselves.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: demo test test-fast bench report install clean

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[dev]'
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(PY) experiments/run.py method=adavit

test: $(STAMP)
	$(PY) -m pytest -q -m "not benchmark" --timeout=1200

test-fast: $(STAMP)
	$(PY) -m pytest -q -m "not slow and not slurm and not benchmark"

bench: $(STAMP)
	mkdir -p results/benchmarks
	$(PY) -m pytest tests/benchmarks -m benchmark --benchmark-enable --benchmark-json=results/benchmarks/bench.json

RESULTS ?= results

report: $(STAMP)  ## tables + figures from the records under $(RESULTS) into $(RESULTS)/report/
	$(PY) -m analysis.run_report $(RESULTS)

clean:
	rm -rf $(VENV) outputs .cache .pytest_cache
