# Everything runs from .venv, created and filled here from nothing.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
PIP := $(VENV)/bin/pip
STAMP := $(VENV)/.installed
export DS_BUILD_OPS := 0
export OMP_NUM_THREADS ?= 1

.PHONY: install test test-scale lint format demo bench bench-perf bench-scale study clean

install: $(STAMP)

# torch first (the CPU wheel), then the rest without build isolation so the
# fairseq build compiles against that torch instead of downloading a CUDA one.
$(STAMP): setup.py
	$(PYTHON) -m venv $(VENV)
	$(PIP) install --upgrade pip setuptools wheel
	$(PIP) install torch==2.13.0
	$(PIP) install numpy cython
	$(PIP) install --no-build-isolation -e '.[test]'
	touch $(STAMP)

# the suite but its scale cases (8 to 16 minutes on 2 cores)
test: $(STAMP)
	$(PY) -m pytest tests -q -rs -m "not scale"

# the scale cases: 4 and 8 processes, two simulated nodes (4 to 9 minutes; CI runs both targets)
test-scale: $(STAMP)
	$(PY) -m pytest tests -q -rs -m scale

# ruff (settings in ruff.toml): lint and formatting, as CI checks them
lint: $(STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

format: $(STAMP)
	$(VENV)/bin/ruff check --fix .
	$(VENV)/bin/ruff format .

demo: $(STAMP)
	bash scripts/demo.sh

# dense vs MoE with the same settings: workspace/bench/bench.{md,json,png}
bench: $(STAMP)
	$(PY) scripts/bench.py

# what makes the MoE beat its dense twin (issue 16): variants of the MoE screened on the
# valid split, then the recipe against dense over 3 seeds on the test split, at the demo's
# budget: workspace/study/study.{md,json} (about 90 minutes on 2 cores). STUDY_ARGS: more
# flags, e.g. --stage final or --jobs 4.
study: $(STAMP)
	$(PY) scripts/prepare_demo.py --workspace workspace
	$(PY) scripts/study.py $(STUDY_ARGS)

# MoE x8 top-1 vs dense: train and generation tokens/s in one process, EP=2 vs
# data-parallel training in two, the MoE layer alone (about 13 minutes on 2 cores).
# Prepares the demo corpus first (a no-op once done). BENCH_PERF_ARGS: more flags,
# e.g. --parts layer,train or --quick.
bench-perf: $(STAMP)
	$(PY) scripts/prepare_demo.py --workspace workspace
	$(PY) scripts/bench_perf.py $(BENCH_PERF_ARGS)

# dense data parallel vs expert-parallel MoE at W = 1, 2, 4, 8 processes: train tokens/s,
# and validation and beam search at W = 2, 4: workspace/bench_scale/scale.{md,png} and
# results.json (about 7 minutes on 2 cores). BENCH_SCALE_ARGS: more flags, e.g. --quick.
bench-scale: $(STAMP)
	$(PY) scripts/prepare_demo.py --workspace workspace
	$(PY) scripts/bench_perf.py --parts scale --out workspace/bench_scale $(BENCH_SCALE_ARGS)

clean:
	rm -rf $(VENV) build *.egg-info
