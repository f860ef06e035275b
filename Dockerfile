# DARTS on an official PyTorch CUDA runtime image.
#   docker build -t darts .
#   docker run --gpus all -it --ipc=host -v "$PWD/data:/workspace/darts/data" \
#       -v "$PWD/searchs:/workspace/darts/searchs" -v "$PWD/augments:/workspace/darts/augments" \
#       darts \
#       python search.py --name cifar10 --dataset cifar10
# Smoke run (`make docker-smoke`): one epoch of search on scikit-learn's digits, offline.
# The base image's PyTorch is the Makefile's COMPAT_TORCH and the floor in requirements.txt:
# `make test-compat` runs the tests on it, and tests/test_docker.py keeps the three equal.
# To move the image, change all three, then run `make test-compat`.
FROM pytorch/pytorch:2.5.1-cuda12.4-cudnn9-runtime

# graphviz's `dot` draws the cells.
RUN apt-get update \
    && apt-get install -y --no-install-recommends graphviz \
    && rm -rf /var/lib/apt/lists/*

WORKDIR /workspace/darts
# The image's PyTorch (and its torchvision) is the floor of requirements.txt, so it is kept.
COPY requirements.txt .
RUN pip install --no-cache-dir -r requirements.txt

COPY *.py ./
COPY models/ models/
COPY scripts/ scripts/

CMD ["python", "search.py", "--help"]
