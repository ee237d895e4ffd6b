# The two commands of the README: `make demo` and `make test`. Everything else is a helper.
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: demo test lint typecheck pytest compose-check bench chaos clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -e ".[test]"
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/python examples/demo.py

test: $(STAMP) lint typecheck compose-check pytest

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

clean:
	rm -rf $(VENV) build dist *.egg-info .mypy_cache .ruff_cache .pytest_cache
