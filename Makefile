# Two commands a new user runs on a fresh machine: `make demo` and `make test`.
# Each creates .venv and installs what it needs (torch pinned to the CPU build).
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
# Passive OpenMP waiting: a busy-waiting torch loop next to another job can be 10-100x slower.
export OMP_WAIT_POLICY ?= PASSIVE

.PHONY: setup demo test lint bench clean

setup: $(STAMP)

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -e '.[dev]'
# headless Chromium for tests/test_report_browser.py (skipped without it): Debian package, root only
	command -v chromium >/dev/null || (command -v apt-get >/dev/null && [ "$$(id -u)" = 0 ] && (apt-get update -q >/dev/null && apt-get install -y -q chromium >/dev/null)) || true
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/anomalab demo --overwrite

test: $(STAMP)
	$(BIN)/ruff check src tests benchmarks
	$(BIN)/pytest

bench: $(STAMP)
	$(BIN)/python benchmarks/bench_vae.py

clean:
	rm -rf $(VENV) runs .pytest_cache .ruff_cache
