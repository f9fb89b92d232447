# `make demo` and `make test` work on a fresh machine: the virtual environment is made when missing.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-stamp

.PHONY: install lint typecheck services browser test demo walkthrough serve screenshot bench bench-compare clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --disable-pip-version-check -U pip
	$(BIN)/python -m pip install -q --disable-pip-version-check -e '.[all,dev]'
	touch $(STAMP)

install: $(STAMP) ## the virtual environment, with every extra and the dev tools

lint: install ## ruff: formatting and lints; import-linter: the import contracts in pyproject.toml
	$(BIN)/ruff format --check .
	$(BIN)/ruff check .
	$(BIN)/lint-imports --no-cache --no-logo

typecheck: install ## mypy --strict over src, tests, examples and benchmarks
	$(BIN)/mypy

services: ## Redis and PostgreSQL on 127.0.0.1 (installed with apt-get and started when missing)
	scripts/services

browser: ## Debian's Chromium and Node.js for tests/browser and tests/js (installed with apt-get when missing)
	scripts/browser

test: lint typecheck services browser ## everything: lint, types, the whole test suite, and its coverage gates
	$(BIN)/python -m coverage run -m pytest $(ARGS)
	$(BIN)/python -m coverage report
	$(BIN)/python -m coverage report --include='src/idempo/_core/*' --fail-under=100

demo: install ## the demo page on http://127.0.0.1:8000 (`idempo demo`; ARGS="--port 9000 --store URL")
	$(BIN)/idempo demo $(ARGS)

walkthrough: install ## replay, 409, 422 and 400 shown in-process on the SQLite store, printed
	$(BIN)/python examples/demo.py $(ARGS)

screenshot: install browser ## docs/demo.png: the demo page after a payment, taken by the browser tests
	IDEMPO_SCREENSHOT=docs/demo.png $(BIN)/python -m pytest -q tests/browser -k screenshot

serve: install ## the example app under uvicorn on http://127.0.0.1:8000 (SQLite store)
	$(BIN)/python examples/demo.py --serve $(ARGS)

bench: install ## in-process ASGI benchmark: bare app vs. wrapped, per store; then idempo proxy vs. direct over HTTP
	$(BIN)/python benchmarks/bench.py $(ARGS)
	$(BIN)/python benchmarks/proxy.py $(PROXY_ARGS)

COMPARE := .venv-compare
COMPARED := fastapi-idempotency-key==0.1.1 asgi-idempotency-header==0.2.0 fastapi-idempotency==0.1.1 redis

bench-compare: ## idempo beside other Python idempotency middlewares and reduced ones (in .venv-compare)
	test -x $(COMPARE)/bin/python || $(PYTHON) -m venv $(COMPARE)
	$(COMPARE)/bin/python -m pip install -q --disable-pip-version-check -e . fastapi $(COMPARED)
	$(COMPARE)/bin/python benchmarks/compare.py $(ARGS)

clean:
	rm -rf $(VENV) $(COMPARE) .mypy_cache .ruff_cache .pytest_cache .coverage
