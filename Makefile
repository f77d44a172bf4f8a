# Every target sets up what it needs: a fresh clone runs `make demo` or `make test` directly.
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
# The local PostgreSQL, when one answers; otherwise tests start an embedded one.
LOCAL_PG := postgresql://postgres@127.0.0.1:5432/postgres
SUDO   := $(shell [ "$$(id -u)" = 0 ] || echo sudo)

.PHONY: install tools demo test lint conformance bench clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV) || { \
	  $(SUDO) env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq python3-venv && $(PYTHON) -m venv $(VENV); }
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[dev]'
	touch $(STAMP)

install: $(STAMP)

# qemu-img makes real VMDKs of every subformat for the inspection tests (Debian qemu-utils).
# Headless chromium renders the web dashboard in its tests (Debian chromium).
tools:
	@command -v qemu-img >/dev/null || { \
	  echo "== installing qemu-utils (qemu-img) for the VMDK tests"; \
	  $(SUDO) apt-get update -qq && $(SUDO) env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq qemu-utils >/dev/null; }
	@test -x /usr/bin/chromium || { \
	  echo "== installing chromium (headless) for the dashboard tests"; \
	  $(SUDO) apt-get update -qq && $(SUDO) env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null; }

# The demo keeps its database in .data/pg beside the project, not in the user's data
# directory, so that it stays self-contained and `make clean` removes it.
demo: $(STAMP)
	VMDK_MIGRATE_DATA_DIR="$(CURDIR)/.data" $(BIN)/python -m worker demo
	@echo
	@echo "To use the command from this shell:  . $(VENV)/bin/activate"
	@echo "then, for the demo's database:        export VMDK_MIGRATE_DATA_DIR=\"$(CURDIR)/.data\"; vmdk-migrate jobs"

# The whole suite against the local server when one answers, then the embedded-database
# tests with no DATABASE_URL, so both database paths run on every `make test`.
test: $(STAMP) tools
	@if $(BIN)/python -m worker.store.probe "$(LOCAL_PG)"; then \
	  echo "== suite against the local PostgreSQL"; \
	  DATABASE_URL="$(LOCAL_PG)" $(BIN)/pytest --ignore=tests/test_embedded.py && \
	  echo "== embedded PostgreSQL" && \
	  env -u DATABASE_URL $(BIN)/pytest tests/test_embedded.py; \
	else \
	  echo "== no local PostgreSQL: the whole suite runs on the embedded server"; \
	  env -u DATABASE_URL $(BIN)/pytest; \
	fi

lint: $(STAMP)
	$(BIN)/ruff check worker tests
	$(BIN)/ruff format --check worker tests
	$(BIN)/mypy
	$(BIN)/lint-imports

conformance: $(STAMP) tools
	$(BIN)/python -m tests.conformance.run

# Throughput, memory, bandwidth cap and scale against their peers, and the same batch into a
# real Glance by every contender (minutes; not part of test). `python -m tests.benchmarks.run
# real-glance` (or `sandbox`) runs one part.
bench: $(STAMP)
	$(BIN)/python -m tests.benchmarks.run

clean:
	rm -rf $(VENV) .data .cache .pytest_cache .mypy_cache .ruff_cache *.egg-info
