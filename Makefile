# One entry point for users and CI. `make demo` and `make test` set everything up first.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

# The PyTorch of the Docker image (its FROM tag): `make test-compat` runs the fast tests on it,
# and tests/test_docker.py checks that the Dockerfile and requirements.txt agree with it.
COMPAT_TORCH  := 2.5.1
COMPAT_VISION := 0.20.1
COMPAT_VENV   := .venv-compat
COMPAT_BIN    := $(COMPAT_VENV)/bin
COMPAT_STAMP  := $(COMPAT_VENV)/.installed-$(COMPAT_TORCH)

.PHONY: setup demo test test-fast test-compat clean-compat docker-smoke lint format coverage benchmark clean

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

# Two pytest-xdist workers, one OpenMP thread each: the two cores stay busy without the
# workers' OpenMP threads spinning against each other. Tests sharing a module-scoped fixture
# run in one worker (tests/conftest.py). The 15 slowest tests are listed at the end.
PYTEST_PAR := OMP_NUM_THREADS=1 $(BIN)/python -m pytest -n 2 --dist loadgroup

test: setup lint
	$(PYTEST_PAR) --durations=15

test-fast: setup
	$(PYTEST_PAR) -m "not slow"

# The fast tests on the Docker image's PyTorch, in a second venv. Not part of `make test`: the
# install is large (PyPI's Linux torch wheel is a CUDA build, ~2.5 GB with its nvidia-* wheels;
# it runs on a CPU). Run it when requirements.txt, the Dockerfile or a version-sensitive API
# changes.
test-compat: $(COMPAT_STAMP)
	@bash scripts/install_graphviz.sh
	$(COMPAT_BIN)/python -m pytest -m "not slow"

$(COMPAT_STAMP): requirements.txt requirements-dev.txt
	$(PYTHON) -m venv $(COMPAT_VENV)
	$(COMPAT_BIN)/pip install --quiet --upgrade pip
	$(COMPAT_BIN)/pip install --quiet torch==$(COMPAT_TORCH) torchvision==$(COMPAT_VISION) \
		-r requirements-dev.txt
	$(COMPAT_BIN)/python -c "import torch, torchvision; print('test-compat: torch', \
		torch.__version__, 'torchvision', torchvision.__version__)"
	@touch $(COMPAT_STAMP)

clean-compat:
	rm -rf $(COMPAT_VENV)

# The image's smoke run, for a machine with Docker and an NVIDIA GPU: builds the image, then one
# epoch of search on scikit-learn's digits (offline: nothing is downloaded at run time).
docker-smoke:
	docker build -t darts .
	docker run --gpus all --ipc=host --rm --network none darts \
		python search.py --name smoke --dataset digits --epochs 1 --layers 5 --init_channels 8

coverage: setup
	$(BIN)/coverage run -m pytest
	$(BIN)/coverage report

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache .mypy_cache .coverage htmlcov
