# dinokit: `make demo` runs the whole toolkit on real images, `make test` runs the quick tests.
# Both create .venv on first use. CI runs `make test-all` (slow tests included).
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: install test test-all demo lint clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	# torch 2.14.1 / torchvision 0.29.1 are the releases on this machine's disk (see README).
	$(BIN)/pip install -q "torch==2.14.1" "torchvision==0.29.1"
	$(BIN)/pip install -q -e ".[dev]"
	touch $(STAMP)

install: $(STAMP)

test: $(STAMP)
	$(BIN)/python -m pytest -q -m "not slow"

test-all: $(STAMP)
	$(BIN)/python -m pytest -q

demo: $(STAMP)
	$(BIN)/python recipes/demo.py --out demo-out

lint: $(STAMP)
	$(BIN)/ruff check dinokit tests benchmarks recipes hubconf.py

clean:
	rm -rf demo-out .pytest_cache
