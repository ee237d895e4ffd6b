# The two commands of the README: `make demo` and `make test`. Everything else is a helper.
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
REPORTS := .reports
# The primary version, where the full suite runs: Python 3.11 with the newest Celery, pinned
# like every cell of the support matrix (noxfile.py, constraints/).
PRIMARY_CONSTRAINTS := constraints/celery-5.7.txt
# The other cells of the support matrix that `make test` runs, one after the other (never
# beside the full suite: its timing-sensitive tests share 2 cores). nox session names;
# `$(BIN)/nox -l` lists every cell. Measured on 2 cores (clean-clone .ci/run of 29 Nov 2026):
# a core cell 3.5-4.5 minutes, a quick cell (no crash-safety tests) 1.5-2 minutes, resolutions
# 2 minutes; the full suite 13.5 minutes. Crash safety runs on the oldest and the newest pins
# (core cells) and in the full suite; the middle Celery minors run the quick cells, which keeps
# the whole .ci/run near 30 minutes (36 with four core cells).
MATRIX_CELLS ?= core-3.10(celery-5.4) core-3.13(celery-5.7) quick-3.12(celery-5.5) \
	quick-3.12(celery-5.6) quick-3.13(celery-5.4) quick-3.10(celery-5.7) resolutions

.PHONY: demo test primary matrix lint typecheck pytest compose-check bench chaos compat clean

$(STAMP): pyproject.toml $(PRIMARY_CONSTRAINTS)
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -c $(PRIMARY_CONSTRAINTS) -e ".[test]"
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/python examples/demo.py

# Lint and types, the full suite on the primary version, the other cells of the matrix, then
# the matrix with pass counts and times (.ci/matrix.py). Fails if any of them failed.
test: $(STAMP) lint typecheck compose-check
	@rm -rf $(REPORTS) && mkdir -p $(REPORTS)
	@status=0; \
	$(MAKE) --no-print-directory primary || status=1; \
	$(MAKE) --no-print-directory matrix || status=1; \
	$(BIN)/python .ci/matrix.py report $(REPORTS) || status=1; \
	exit $$status

# The full suite (packaging test included) on the primary version, with a JUnit report.
primary: $(STAMP)
	@mkdir -p $(REPORTS); start=$$(date +%s); status=0; \
	$(BIN)/pytest --junitxml=$(REPORTS)/primary.xml $(PYTEST_ARGS) || status=$$?; \
	$(BIN)/python .ci/matrix.py record "full suite" $(REPORTS)/primary.xml \
		$$(( $$(date +%s) - start )) $(REPORTS); \
	exit $$status

matrix: $(STAMP)
	@mkdir -p $(REPORTS)
	$(BIN)/nox --non-interactive -s $(foreach cell,$(MATRIX_CELLS),'$(cell)')

lint: $(STAMP)
	$(BIN)/ruff check .

typecheck: $(STAMP)
	$(BIN)/mypy

# docker-compose.yml cannot run here (no Docker engine), but Debian's docker-compose validates it.
compose-check:
	@if command -v docker-compose >/dev/null 2>&1; then \
		docker-compose -f docker-compose.yml config -q && echo "docker-compose.yml: valid"; \
	elif [ -n "$$CI" ]; then \
		echo "docker-compose is not installed (CI: .ci/run installs it)"; exit 1; \
	else \
		echo "docker-compose not installed: skipping the docker-compose.yml check"; \
	fi

pytest: $(STAMP)
	$(BIN)/pytest $(PYTEST_ARGS)

bench: $(STAMP)
	$(BIN)/python -m pip install -q -e ".[bench]"
	$(BIN)/python -m benchmarks $(BENCH_ARGS)

# The chaos suite in its long configuration (CI runs the same tests in a short one, with the
# defaults of tests/chaos/harness.py). Any CHAOS_* variable can be overridden:
# `make chaos CHAOS_TASKS=20000 CHAOS_SEED=42`.
CHAOS_TASKS ?= 5000
CHAOS_KILLS ?= 50
CHAOS_STORE_RESTARTS ?= 5
CHAOS_RATE ?= 25
chaos: $(STAMP)
	CHAOS_TASKS=$(CHAOS_TASKS) CHAOS_KILLS=$(CHAOS_KILLS) \
	CHAOS_STORE_RESTARTS=$(CHAOS_STORE_RESTARTS) CHAOS_RATE=$(CHAOS_RATE) \
	$(BIN)/pytest tests/chaos -p no:cacheprovider $(PYTEST_ARGS)

# Celery's own integration suite (test_canvas, test_tasks, test_group_chains of the installed
# Celery release, from its sdist, cached in .cache/compat/), run twice against a private
# redis-server: plain, and with IdempotentTask as the app's task class; fails on any test that
# passes on plain Celery but not with IdempotentTask, unless tests/compat/expected_failures.txt
# lists it. `make test` runs a subset. About 45 minutes on 2 cores.
# Extra arguments: `make compat COMPAT_ARGS="--mode idempotent -- -k chain"`.
compat: $(STAMP)
	$(BIN)/python -m tests.compat.celery_suite $(COMPAT_ARGS)

clean:
	rm -rf $(VENV) build dist *.egg-info .mypy_cache .ruff_cache .pytest_cache .nox $(REPORTS)
