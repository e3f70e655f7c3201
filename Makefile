# Everything a fresh machine with Python 3.11 and pip needs; each target builds .venv itself.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
# A new workdir per demo run: train.py resumes an existing one, and a finished run does nothing.
WORKDIR ?= runs/demo-$(shell date +%Y%m%d-%H%M%S)

.PHONY: demo test lint bench clean

$(BIN)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --upgrade pip
	$(BIN)/pip install -e '.[test]'
	touch $@

demo: $(BIN)/.installed
	$(BIN)/python train.py --config=configs/decoder.py:tiny --workdir=$(WORKDIR)

lint: $(BIN)/.installed
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

test: lint
	$(BIN)/python -m pytest -n 2 --durations=15

bench: $(BIN)/.installed
	$(BIN)/python benchmarks/attention.py
	$(BIN)/python benchmarks/train_step.py
	$(BIN)/python benchmarks/forward.py
	$(BIN)/python benchmarks/decoding.py
	$(BIN)/python benchmarks/data.py
	$(BIN)/python benchmarks/packing.py

clean:
	rm -rf $(VENV) runs
