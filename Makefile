# llm2vec-mini: `make demo` runs the main job, `make test` runs every test. Both set up .venv first.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
REF_VENV := .venv-ref
REF_PY := $(REF_VENV)/bin/python
PYTEST_ARGS ?=

.PHONY: setup test test-fast lint tutorials exercises lab demo model data test-reference reference-setup bench reproduce fuzz clean

# Re-runs are no-ops: the stamp is newer than both requirement files.
setup: $(VENV)/.stamp
$(VENV)/.stamp: requirements.txt requirements-dev.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --disable-pip-version-check -r requirements-dev.txt
	$(PY) -m pip install --quiet --disable-pip-version-check --no-deps --no-build-isolation -e .
	touch $@

# The real model (SmolLM2-135M-Instruct, GGUF) into the local cache; a second run only prints its path.
model: setup
	$(PY) -m llm2vec_mini download smollm2

# The data (STS-B, WikiText-2, wiki1m, UD English-EWT, two vocabularies) into the cache, from the
# pinned public sources or $LLM2VEC_MINI_DATA_URL; a second run re-hashes the files and fetches nothing.
data: setup
	$(PY) -m llm2vec_mini download data

# ruff (configured in pyproject.toml) on the whole tree, then every test.
lint: setup
	$(PY) -m ruff check .

test: setup model lint
	$(PY) -m pytest tests $(PYTEST_ARGS)

# The component tests only: no model download, no data, no notebooks, nothing slow (under a minute).
test-fast: setup lint
	LLM2VEC_MINI_TEST_FAST=1 $(PY) -m pytest tests -q -m "not notebook and not slow" $(PYTEST_ARGS)

# Execute every tutorial (the SmolLM2 cells too) and write its outputs into the committed notebook.
tutorials: setup model
	$(PY) tutorials/execute.py --real

# The exercise notebooks (tutorials/exercises/): the tutorials with their hand derivations left blank.
exercises: setup
	$(PY) -m llm2vec_mini.kit notebooks

# JupyterLab on the tutorials (an optional extra, requirements-lab.txt; opens the .py sources as notebooks too).
lab: setup
	$(PY) -m pip install --quiet --disable-pip-version-check -r requirements-lab.txt
	$(PY) -m jupyter lab tutorials

# The fuzz suite at length (make test runs one round of it): more rounds of mutations, other seeds.
FUZZ_ROUNDS ?= 12
fuzz: setup
	LLM2VEC_MINI_FUZZ_ROUNDS=$(FUZZ_ROUNDS) $(PY) -m pytest tests/test_fuzz.py $(PYTEST_ARGS)

# Without a data folder the demo downloads its data first; offline it says how to get data in one
# line and runs its labelled smoke corpus.
demo: setup model
	$(PY) -m llm2vec_mini demo

# The paper's trend on SmolLM2 with more training (about half an hour on 2 CPU cores; not run in CI).
reproduce: setup model
	$(PY) -m llm2vec_mini demo --recipe reproduce --out runs/reproduce

# The official llm2vec 0.2.3 only works with transformers 4.44.2 and peft 0.13.2: its own venv.
reference-setup: $(REF_VENV)/.stamp
$(REF_VENV)/.stamp: requirements-ref.txt
	test -x $(REF_PY) || $(PYTHON) -m venv $(REF_VENV)
	$(REF_PY) -m pip install --quiet --disable-pip-version-check -r requirements-ref.txt
	$(REF_PY) -m pip install --quiet --disable-pip-version-check --no-deps llm2vec==0.2.3
	touch $@

test-reference: setup model reference-setup
	LLM2VEC_MINI_REFERENCE=1 $(PY) -m pytest tests/reference $(PYTEST_ARGS)

# Speed and memory against the reference stacks, each measured in one run (not tests: they print).
# bench_load_hf writes a 5.4 GB Sheared-LLaMA-shaped checkpoint to a temporary folder (and removes it).
bench: setup model reference-setup
	$(PY) benchmarks/bench_load.py
	$(PY) benchmarks/bench_load_hf.py
	$(PY) benchmarks/bench_encode.py
	$(PY) benchmarks/bench_train.py

clean:
	rm -rf $(VENV) $(REF_VENV) .pytest_cache build *.egg-info
