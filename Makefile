# `make run`: the main job (real data -> train MHE -> decode -> sacreBLEU).
# `make test`: the test suite.  Both install what they need first.
VENV ?= .venv
PY := $(VENV)/bin/python

.PHONY: install run test test-fast lint coverage extreme-vocab clean-work

install:
	VENV=$(VENV) bash scripts/install.sh

run: install
	PATH=$(abspath $(VENV))/bin:$$PATH bash scripts/bible/main_job.sh

# two pytest-xdist workers (one thread each, tests/conftest.py), a test file per worker
# at a time so that a file's trained models are built once
TEST_WORKERS ?= 2
test: install
	$(PY) -m pytest -q -n $(TEST_WORKERS) --dist loadfile

# ruff (pyproject.toml): lint and format check, as .ci/run does
lint: install
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

# the suite under coverage (pytest-cov: the workers and the commands they start), line coverage of the plugin package
coverage: install
	$(PY) -m pytest -q -n $(TEST_WORKERS) --dist loadfile --cov=fairseq_mhce --cov-report=term

# tests not marked e2e: no command-line tool runs (tests/conftest.py fails an unmarked test that runs one)
test-fast: install
	$(PY) -m pytest -q -n $(TEST_WORKERS) -m "not e2e"

# issue 12: every output layer at V = 224k, equal wall-clock (~2 h on 2 cores)
extreme-vocab: install
	PATH=$(abspath $(VENV))/bin:$$PATH bash scripts/bible/extreme_vocab.sh

clean-work:
	rm -rf work
