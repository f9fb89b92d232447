# `make help` lists the targets. Each works on a fresh clone: the virtual environment (.venv) is made when missing,
# with what the target needs: `make demo` the `cli` extra only; the others every extra and the dev tools.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-stamp
DEMO_STAMP := $(VENV)/.demo-stamp
PIP := $(BIN)/python -m pip install -q --disable-pip-version-check

.DEFAULT_GOAL := help
.PHONY: help install check lint typecheck services browser test docs dist demo walkthrough serve screenshot bench \
	bench-compare bench-instructions bench-load bench-split clean

help: ## this list
	@echo "make TARGET (CI runs .ci/run: make test, with CI=true):"
	@awk 'BEGIN { FS = ":[^#]*## " } /^[a-z][a-z-]*:.*## / { printf "  %-14s %s\n", $$1, $$2 }' $(MAKEFILE_LIST)

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)

$(STAMP): pyproject.toml | $(BIN)/python
	$(PIP) -U pip
	$(PIP) -e '.[all,dev]'
	touch $(STAMP)

# The demo needs the `cli` extra only (click, uvicorn, starlette, httpx, prometheus-client), which the full
# installation has too.
$(DEMO_STAMP): pyproject.toml | $(BIN)/python
	if [ $(STAMP) -nt pyproject.toml ]; then :; else $(PIP) -e '.[cli]'; fi
	touch $(DEMO_STAMP)

install: $(STAMP) ## the virtual environment, with every extra and the dev tools

check: lint typecheck ## the inner loop (under a minute: 38 s on a 2-core machine): lint, types, and the tests that need no server, browser, Node or child process
	$(BIN)/python -m pytest -q --in-process $(ARGS)

lint: install ## ruff: formatting and lints; import-linter: the import contracts in pyproject.toml
	$(BIN)/ruff format --check .
	$(BIN)/ruff check .
	$(BIN)/lint-imports --no-cache --no-logo

typecheck: install ## mypy --strict over src, tests, examples, benchmarks and scripts
	$(BIN)/mypy

services: ## Redis and PostgreSQL on 127.0.0.1, started; as root, apt-get installs them if missing (listed first)
	scripts/services

browser: ## Chromium and Node.js for tests/browser and tests/js; as root, apt-get installs them if missing (listed first)
	scripts/browser

test: lint typecheck services browser ## everything CI runs (minutes): lint, types, the docs site, the whole suite, its coverage gates
	NO_MKDOCS_2_WARNING=1 $(BIN)/mkdocs build --strict  # not --quiet: it hides the warnings that --strict counts
	$(BIN)/python -m coverage run -m pytest $(ARGS)
	$(BIN)/python -m coverage report
	$(BIN)/python -m coverage report --include='src/idempo/_core/*' --fail-under=100

docs: install ## the documentation site on http://127.0.0.1:8008, rebuilt as pages change (mkdocs.yml; API from docstrings)
	NO_MKDOCS_2_WARNING=1 $(BIN)/mkdocs serve --dev-addr 127.0.0.1:8008

dist: install ## the sdist and the wheel, built into dist/ and checked (scripts/check_dist.py)
	rm -rf dist
	$(BIN)/python -m build --outdir dist .
	$(BIN)/python scripts/check_dist.py dist

demo: $(DEMO_STAMP) ## the demo page on http://127.0.0.1:8000 (`idempo demo`; ARGS="--port 9000 --store URL")
	$(BIN)/idempo demo $(ARGS)

walkthrough: install ## replay, 409, 422 and 400 shown in-process on the SQLite store, printed
	$(BIN)/python examples/demo.py $(ARGS)

screenshot: install browser ## docs/demo.png: the demo page after a payment, taken by the browser tests
	IDEMPO_SCREENSHOT=docs/demo.png $(BIN)/python -m pytest -q tests/browser -k screenshot

serve: install ## the example app under uvicorn on http://127.0.0.1:8000 (SQLite store)
	$(BIN)/python examples/demo.py --serve $(ARGS)

bench: install ## in-process benchmarks: bare app vs. wrapped, per store (ASGI, and WSGI on memory/SQLite); then idempo proxy vs. direct over HTTP
	$(BIN)/python benchmarks/bench.py $(ARGS)
	$(BIN)/python benchmarks/proxy.py $(PROXY_ARGS)

bench-split: install ## where idempo's distance to the floor goes, per request: around the app, in its callbacks, the app's own
	$(BIN)/python benchmarks/split.py $(ARGS)

bench-instructions: install services ## instructions per request, idempo beside the floor, counted by valgrind (next to no noise; ~20 min)
	scripts/valgrind
	$(BIN)/python benchmarks/instructions.py $(ARGS)

bench-load: install services ## uvicorn (1, 2 workers) under wrk: req/s of bare, idempo, the floor (~17 min; docs/assets/load.*)
	scripts/wrk
	$(BIN)/python benchmarks/load.py --json docs/assets/load.json --chart docs/assets/load.png $(ARGS)

COMPARE := .venv-compare
COMPARED := fastapi-idempotency-key==0.1.1 asgi-idempotency-header==0.2.0 fastapi-idempotency==0.1.1 redis

bench-compare: ## idempo beside other Python idempotency middlewares and reduced ones (in .venv-compare)
	test -x $(COMPARE)/bin/python || $(PYTHON) -m venv $(COMPARE)
	$(COMPARE)/bin/python -m pip install -q --disable-pip-version-check -e . fastapi $(COMPARED)
	$(COMPARE)/bin/python benchmarks/compare.py $(ARGS)

clean: ## remove the virtual environments, dist/ and the tools' caches
	rm -rf $(VENV) $(COMPARE) dist .mypy_cache .ruff_cache .pytest_cache .coverage
