"""Shared pieces of search.py and augment.py: device, seeding, logging, meters, evaluation and
checkpoints."""

from __future__ import annotations

import logging
import os
import random
import sys
import tempfile
from collections.abc import Callable, Iterable
from typing import Any

import numpy as np
import torch
import torch.nn as nn

from config import BaseConfig, ConfigError


# --------------------------------------------------------------------------------------------
# Device and seeds
# --------------------------------------------------------------------------------------------
def resolve_device(cfg: BaseConfig) -> torch.device:
    """``--device auto`` picks CUDA (the first of ``--gpus``) when there is one, else the CPU."""
    want = cfg.device
    ids = cfg.gpu_ids()
    n_gpu = torch.cuda.device_count()
    if want == "cpu" or (want == "auto" and n_gpu == 0):
        return torch.device("cpu")
    if n_gpu == 0:
        raise ConfigError(f"--device {want} asks for CUDA, but no CUDA GPU is visible")
    index = int(want[5:]) if want.startswith("cuda:") else (ids[0] if ids else 0)
    for i in [index] + (ids or []):
        if i >= n_gpu:
            raise ConfigError(f"GPU {i} does not exist (this machine has {n_gpu}: 0..{n_gpu - 1})")
    return torch.device("cuda", index)


def set_seed(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)  # seeds CUDA too


# --------------------------------------------------------------------------------------------
# Output folder and logging
# --------------------------------------------------------------------------------------------
def make_run_dir(path: str) -> str:
    """Create the run folder and check it is writable; ConfigError with one line if not."""
    try:
        os.makedirs(path, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=path):
            pass
    except OSError as e:
        raise ConfigError(f"cannot write to the output folder {path}: {e.strerror}") from None
    return path


def get_logger(file_path: str, name: str) -> logging.Logger:
    """A logger writing to stdout and ``file_path`` (set up per run, not at import)."""
    logger = logging.getLogger(name)
    for h in list(logger.handlers):
        logger.removeHandler(h)
        h.close()
    fmt = logging.Formatter("%(asctime)s | %(message)s", datefmt="%m/%d %I:%M:%S %p")
    for h in (logging.FileHandler(file_path), logging.StreamHandler(sys.stdout)):
        h.setFormatter(fmt)
        logger.addHandler(h)
    logger.setLevel(logging.INFO)
    logger.propagate = False
    return logger


class NonFiniteLossError(RuntimeError):
    """The loss became NaN or infinite; the message names the epoch, step and last checkpoint."""


# --------------------------------------------------------------------------------------------
# Metrics
# --------------------------------------------------------------------------------------------
class AverageMeter:
    """Running average of a scalar, weighted by the number of samples."""

    def __init__(self) -> None:
        self.sum = 0.0
        self.count = 0

    def update(self, val: float, n: int = 1) -> None:
        self.sum += val * n
        self.count += n

    @property
    def avg(self) -> float:
        return self.sum / max(self.count, 1)


def accuracy(
    logits: torch.Tensor, target: torch.Tensor, topk: Iterable[int] = (1, 5)
) -> list[float]:
    """Top-k accuracies in [0, 1]; k larger than the number of classes counts every sample."""
    topk = list(topk)
    maxk = min(max(topk), logits.size(1))
    pred = logits.topk(maxk, dim=1).indices  # (N, maxk)
    correct = pred.eq(target.view(-1, 1))
    return [correct[:, : min(k, maxk)].any(dim=1).float().mean().item() for k in topk]


class Meters:
    """loss, top1 and top5 meters updated together."""

    def __init__(self) -> None:
        self.loss, self.top1, self.top5 = AverageMeter(), AverageMeter(), AverageMeter()

    def update(self, loss: torch.Tensor, logits: torch.Tensor, y: torch.Tensor) -> None:
        n = y.size(0)
        top1, top5 = accuracy(logits, y, (1, 5))
        self.loss.update(loss.item(), n)
        self.top1.update(top1, n)
        self.top5.update(top5, n)

    def summary(self) -> dict[str, float]:
        return {"loss": self.loss.avg, "top1": self.top1.avg, "top5": self.top5.avg}

    def __str__(self) -> str:
        return f"loss {self.loss.avg:.3f} top1 {self.top1.avg:.2%} top5 {self.top5.avg:.2%}"


@torch.no_grad()
def evaluate(
    model: nn.Module,
    loader: Iterable,
    device: torch.device,
    criterion: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
) -> dict[str, float]:
    """Loss, top-1 and top-5 of ``model`` over ``loader`` in eval mode (search and augment)."""
    was_training = model.training
    model.eval()
    meters = Meters()
    for X, y in loader:
        X = X.to(device, non_blocking=True)
        y = y.to(device, non_blocking=True)
        out = model(X)
        logits = out[0] if isinstance(out, tuple) else out
        meters.update(criterion(logits, y), logits, y)
    model.train(was_training)
    return meters.summary()


def count_parameters(module: nn.Module, exclude: str | None = None) -> int:
    """Number of parameters, leaving out those whose name contains ``exclude``."""
    return sum(
        p.numel() for n, p in module.named_parameters() if exclude is None or exclude not in n
    )


# --------------------------------------------------------------------------------------------
# Checkpoints
# --------------------------------------------------------------------------------------------
def save_checkpoint(state: dict[str, Any], path: str) -> None:
    """Write atomically: a temp file in the same folder, then ``os.replace``. A crash half way
    leaves the previous checkpoint intact."""
    folder = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=".tmp-", suffix=".pth.tar")
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(state, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


def load_checkpoint(path: str, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """Load a checkpoint dict with ``weights_only=True``; ConfigError with one line if it is
    missing, truncated, corrupt or not one of ours."""
    if not os.path.isfile(path):
        raise ConfigError(f"no checkpoint at {path}")
    try:
        state = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as e:  # torch raises many kinds for a damaged file
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ConfigError(f"cannot read checkpoint {path}: {first[:200]}") from None
    if not isinstance(state, dict) or "model" not in state or "config" not in state:
        raise ConfigError(f"{path} is not a checkpoint of this project")
    return state
