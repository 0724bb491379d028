# phivault: `make run` serves a development instance, `make test` checks everything.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
# Two processes (pytest-xdist): each makes its own databases, so the suite halves on 2 cores.
PYTEST_ARGS ?= -n 2

.DEFAULT_GOAL := help

.PHONY: help run demo test fuzz lint fmt bench clean

help: ## List the targets.
	@grep -E '^[a-z]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  make %-6s %s\n", $$1, $$2}'

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip

$(VENV)/.installed: pyproject.toml | $(BIN)/python
	$(BIN)/python -m pip install -q -e .
	@touch $@

$(VENV)/.dev-installed: pyproject.toml | $(BIN)/python
	$(BIN)/python -m pip install -q -e '.[dev]'
	@touch $@ $(VENV)/.installed

run: $(VENV)/.installed ## Serve https://127.0.0.1:8443 from ./var/ (created on first run).
	$(BIN)/phivault init --dev
	@set -a && . ./var/phivault.env && set +a && exec $(BIN)/phivault serve --host 127.0.0.1 --port 8443

demo: $(VENV)/.installed ## Fill the dev instance in ./var/ with a small clinic; prints the logins.
	$(BIN)/phivault init --dev
	@set -a && . ./var/phivault.env && set +a && exec $(BIN)/phivault demo

lint: $(VENV)/.dev-installed ## ruff (with the S security rules) and mypy --strict.
	$(BIN)/ruff check src tests bench
	$(BIN)/mypy

test: lint ## Lint, then the suite on SQLite and PostgreSQL (PHIVAULT_TEST_DATABASE_URL).
	@bash scripts/ensure-chromium
	$(BIN)/python -m pytest $(PYTEST_ARGS)

fuzz: lint ## Fuzz the API longer than `make test` does: 200 cases per operation, a new seed.
	PHIVAULT_TEST_FUZZ_EXAMPLES=$${PHIVAULT_TEST_FUZZ_EXAMPLES:-200} PHIVAULT_TEST_FUZZ_RANDOM=1 \
		$(BIN)/python -m pytest $(PYTEST_ARGS) -s tests/fuzz

fmt: $(VENV)/.dev-installed ## Sort imports and apply ruff's fixes.
	$(BIN)/ruff check --fix src tests bench

bench: $(VENV)/.dev-installed ## Run the benchmarks; results in bench/results/, the table in bench/README.md.
	@command -v wrk >/dev/null || { echo "make bench: bench/api_bench.py and login_storm_bench.py load the API with wrk; install it first: apt-get install wrk (Debian, Ubuntu), dnf install wrk (Fedora), brew install wrk (macOS)"; exit 1; }
	PYTHONPATH=src $(BIN)/python bench/crypto_bench.py
	PYTHONPATH=src $(BIN)/python bench/audit_bench.py
	PYTHONPATH=src $(BIN)/python bench/audit_search_bench.py
	PYTHONPATH=src $(BIN)/python bench/auth_bench.py
	PYTHONPATH=src $(BIN)/python bench/attachment_bench.py
	PYTHONPATH=src $(BIN)/python bench/export_bench.py
	PYTHONPATH=src $(BIN)/python bench/api_bench.py
	PYTHONPATH=src $(BIN)/python bench/api_cpu_bench.py
	PYTHONPATH=src $(BIN)/python bench/login_storm_bench.py
	PYTHONPATH=src $(BIN)/python bench/rewrap_bench.py
	$(BIN)/python bench/summary.py

clean: ## Remove the virtualenv and caches (keeps ./var/).
	rm -rf $(VENV) .mypy_cache .ruff_cache .pytest_cache .hypothesis
