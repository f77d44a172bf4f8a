# Every target sets up what it needs: a fresh clone runs `make demo` or `make test` directly.
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
# The local PostgreSQL, when one answers; otherwise tests start an embedded one.
LOCAL_PG := postgresql://postgres@127.0.0.1:5432/postgres

.PHONY: install demo test test-local test-embedded lint conformance bench clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[dev]'
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(BIN)/python -m worker demo

# The whole suite against the local server when it answers, and the embedded-database
# tests always, so both database paths run on every `make test`.
test: $(STAMP)
	@if $(BIN)/python -m worker.store.probe "$(LOCAL_PG)"; then \
	  echo "== suite against the local PostgreSQL"; \
	  DATABASE_URL="$(LOCAL_PG)" $(BIN)/pytest; \
	else \
	  echo "== no local PostgreSQL: the suite runs on the embedded server"; \
	  env -u DATABASE_URL $(BIN)/pytest; \
	fi
	@echo "== embedded PostgreSQL"
	env -u DATABASE_URL $(BIN)/pytest tests/test_embedded.py

lint: $(STAMP)
	$(BIN)/ruff check worker tests
	$(BIN)/ruff format --check worker tests
	$(BIN)/mypy
	$(BIN)/lint-imports

conformance: $(STAMP)
	$(BIN)/python -m tests.conformance.run

bench: $(STAMP)
	$(BIN)/python -m tests.benchmarks.run

clean:
	rm -rf $(VENV) .data .cache .pytest_cache .mypy_cache .ruff_cache *.egg-info
