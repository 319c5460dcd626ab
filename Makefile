# dinokit: `make demo` runs the whole toolkit on real images, `make test` runs the quick tests.
# Both create .venv and fetch Fashion-MNIST on first use. CI runs `make test-all` (slow tests included).
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
FMNIST := /usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz

.PHONY: install data test test-all demo lint clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	# torch 2.14.1 / torchvision 0.29.1 are the releases on this machine's disk (see README).
	$(BIN)/pip install -q "torch==2.14.1" "torchvision==0.29.1"
	$(BIN)/pip install -q -e ".[dev]"
	touch $(STAMP)

install: $(STAMP)

# Fashion-MNIST (Debian's dataset-fashion-mnist package): the tests and the demo use it.
data:
	@bash scripts/ensure_data.sh

test: $(STAMP) data
	$(BIN)/python -m pytest -q -m "not slow"

test-all: $(STAMP) data
	$(BIN)/python -m pytest -q

demo: $(STAMP) data
	$(BIN)/python recipes/demo.py --out demo-out

lint: $(STAMP)
	$(BIN)/ruff check dinokit tests benchmarks recipes hubconf.py
	$(BIN)/mypy dinokit

clean:
	rm -rf demo-out .pytest_cache
