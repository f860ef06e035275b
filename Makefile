# One entry point for users and CI. `make demo` and `make test` set everything up first.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

.PHONY: setup demo test test-fast lint format coverage benchmark clean

setup: $(STAMP)
	@bash scripts/install_graphviz.sh

$(STAMP): requirements.txt requirements-dev.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -r requirements-dev.txt
	@touch $(STAMP)

# A short search on scikit-learn's digits (offline), then a short training of what it found.
demo: setup
	rm -rf searchs/demo augments/demo
	$(BIN)/python search.py --name demo --dataset digits --epochs 4 --layers 5 \
		--init_channels 8 --batch_size 64 --workers 0 --print_freq 10
	$(BIN)/python augment.py --name demo --dataset digits --genotype searchs/demo/genotype.txt \
		--epochs 4 --layers 6 --init_channels 16 --batch_size 64 --workers 0 --print_freq 10 --cutout_length 4

lint: setup
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy

format: setup
	$(BIN)/ruff check --fix .
	$(BIN)/ruff format .

test: setup lint
	$(BIN)/python -m pytest

test-fast: setup
	$(BIN)/python -m pytest -m "not slow"

coverage: setup
	$(BIN)/coverage run -m pytest
	$(BIN)/coverage report

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache .mypy_cache .coverage htmlcov
