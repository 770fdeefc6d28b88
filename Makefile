# The two commands of the README: `make up` (run) and `make test` (the whole suite).
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

.PHONY: up test lint bench tools clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[test,loadtest,bench]'
	touch $(STAMP)

# System tools from the distribution: redis-server (the embedded Redis, the test suite's
# private Redis), wrk (the benchmarks), prometheus with promtool (the alert rules and the
# real-Prometheus test) and chromium with its chromedriver (the ops console's browser tests,
# driven by Selenium: nothing is downloaded at run time). Installed with apt-get when missing
# and allowed.
tools:
	@missing=""; \
	command -v redis-server >/dev/null 2>&1 || missing="$$missing redis-server"; \
	command -v wrk >/dev/null 2>&1 || missing="$$missing wrk"; \
	command -v promtool >/dev/null 2>&1 || missing="$$missing prometheus"; \
	command -v chromium >/dev/null 2>&1 || missing="$$missing chromium"; \
	command -v chromedriver >/dev/null 2>&1 || missing="$$missing chromium-driver"; \
	if [ -n "$$missing" ]; then \
	  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
	    echo "installing:$$missing"; \
	    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $$missing >/dev/null; \
	  else \
	    echo "missing:$$missing (install them with your package manager)"; exit 1; \
	  fi; \
	fi

up: $(STAMP)
	@command -v redis-server >/dev/null 2>&1 || [ -n "$$SECKILL_REDIS_URL" ] || $(MAKE) --no-print-directory tools
	$(BIN)/seckill up

# The suite spends its time waiting (subprocesses, Redis, PostgreSQL, deliberate faults), not
# computing: PYTEST_WORKERS processes share it out (pytest-xdist, each worker with a
# redis-server of its own; worksteal evens out the long tests). The few marked `alone` (a load
# generator, the benchmark harness: their verdicts depend on the CPU they get) run afterwards,
# one at a time.
PYTEST_WORKERS ?= 4

test: $(STAMP) tools
	$(BIN)/ruff check .
	$(BIN)/mypy
	$(BIN)/pytest -q -n $(PYTEST_WORKERS) --dist worksteal -m "not alone"
	$(BIN)/pytest -q -m alone

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/mypy

# about 5 minutes: every path at 64 connections, the headline ones at 256, 5 s per run, 3
# interleaved rounds; the py-spy profiles of the two hot paths are benchmarks/profile.py's
bench: $(STAMP) tools
	$(BIN)/python benchmarks/run.py --seconds 5 --repeat 3

clean:
	rm -rf $(VENV) var .pytest_cache .mypy_cache .ruff_cache .hypothesis
