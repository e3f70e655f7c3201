# Everything a fresh machine with Python 3.11 and pip needs; each target builds .venv itself.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
WORKDIR ?= runs/demo

.PHONY: demo test lint bench clean

$(BIN)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --upgrade pip
	$(BIN)/pip install -e '.[test]'
	touch $@

demo: $(BIN)/.installed
	$(BIN)/python benchmarks/attention.py --quick

lint: $(BIN)/.installed
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

test: lint
	$(BIN)/python -m pytest -n 2 --durations=15

bench: $(BIN)/.installed
	$(BIN)/python benchmarks/attention.py

clean:
	rm -rf $(VENV) runs
