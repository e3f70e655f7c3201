# Everything a fresh machine with Python 3.11 and pip needs; each target builds .venv itself.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
# The Hugging Face Flax reference of the benchmarks: transformers 4.x on its own jax.
HF_VENV := .venv-hf
# A new workdir per demo run: train.py resumes an existing one, and a finished run does nothing.
WORKDIR ?= runs/demo-$(shell date +%Y%m%d-%H%M%S)

.PHONY: demo test lint bench bench-quick hf-venv clean

# The main job needs only the package; tests and benchmarks add the `test` extra (torch,
# transformers, pytest, ruff, the summarization scorers) on top of the same venv.
$(BIN)/.installed-main: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --upgrade pip
	$(BIN)/pip install -e .
	touch $@

$(BIN)/.installed: $(BIN)/.installed-main
	$(BIN)/pip install -e '.[test]'
	touch $@

$(HF_VENV)/.installed: benchmarks/requirements-hf.txt
	$(PYTHON) -m venv $(HF_VENV)
	$(HF_VENV)/bin/pip install --upgrade pip
	$(HF_VENV)/bin/pip install -r benchmarks/requirements-hf.txt
	touch $@

hf-venv: $(HF_VENV)/.installed

demo: $(BIN)/.installed-main
	$(BIN)/python train.py --config=configs/decoder.py:tiny --workdir=$(WORKDIR)

lint: $(BIN)/.installed
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

test: lint
	$(BIN)/python -m pytest -n 2 --durations=15

# Train step and decoding are measured against Hugging Face's Flax models in the same run.
bench: $(BIN)/.installed $(HF_VENV)/.installed
	$(BIN)/python benchmarks/train_step.py
	$(BIN)/python benchmarks/decoding.py --vs-hf
	$(BIN)/python benchmarks/attention.py
	$(BIN)/python benchmarks/attention_loop.py
	$(BIN)/python benchmarks/dropout.py
	$(BIN)/python benchmarks/forward.py
	$(BIN)/python benchmarks/decoding.py
	$(BIN)/python benchmarks/data.py
	$(BIN)/python benchmarks/packing.py
	$(BIN)/python benchmarks/startup.py

# Every benchmark end to end on small shapes (minutes): checks the harness, not the figures.
bench-quick: $(BIN)/.installed $(HF_VENV)/.installed
	$(BIN)/python benchmarks/train_step.py --quick
	$(BIN)/python benchmarks/decoding.py --vs-hf --quick
	$(BIN)/python benchmarks/attention.py --quick
	$(BIN)/python benchmarks/attention_loop.py --quick
	$(BIN)/python benchmarks/dropout.py --quick
	$(BIN)/python benchmarks/forward.py --quick
	$(BIN)/python benchmarks/decoding.py --quick
	$(BIN)/python benchmarks/data.py --quick
	$(BIN)/python benchmarks/startup.py --quick --json benchmarks/results/startup_quick.json

clean:
	rm -rf $(VENV) $(HF_VENV) runs
