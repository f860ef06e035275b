"""Small helpers every stage shares: the user-error base class, seeds, logging, meters, atomic
files, JSON lines and the code version a run records. Nothing here knows about configs, models
or processes (distributed.py, checkpoint.py and engine.py build on it)."""

from __future__ import annotations

import functools
import glob
import hashlib
import json
import logging
import os
import random
import subprocess
import sys
import tempfile
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import numpy as np
import torch
import torch.nn as nn


# --------------------------------------------------------------------------------------------
# Errors shown to the user
# --------------------------------------------------------------------------------------------
class UserError(Exception):
    """Bad input or an impossible setting. ``str(e)`` is one line, shown to the user as is, and
    the command-line frame (``engine.script_main``) exits with status 2 on it. ConfigError,
    DataError (preproc), GenotypeError (genotypes) and NonFiniteLossError (engine) derive
    from it."""


class ConfigError(UserError, ValueError):
    """An impossible setting, found before anything is written."""


# --------------------------------------------------------------------------------------------
# Seeds, layout and logging
# --------------------------------------------------------------------------------------------
def set_seed(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)  # seeds CUDA too


def memory_format(name: str) -> torch.memory_format:
    """The torch memory format of ``--memory_format``: ``model.to(memory_format=...)`` stores
    the 4-d weights in it, and the convs then give activations in it (the stem turns an NCHW
    batch into NHWC). Apply it before the optimizers are built: their buffers copy the
    parameters' layout."""
    return torch.channels_last if name == "channels_last" else torch.contiguous_format


def get_logger(file_path: str, name: str, enabled: bool = True) -> logging.Logger:
    """A logger writing to stdout and ``file_path`` (set up per run, not at import); silent
    when not ``enabled`` (processes other than the first under DDP)."""
    logger = logging.getLogger(name)
    for h in list(logger.handlers):
        logger.removeHandler(h)
        h.close()
    fmt = logging.Formatter("%(asctime)s | %(message)s", datefmt="%m/%d %I:%M:%S %p")
    handlers: list[logging.Handler] = (
        [logging.FileHandler(file_path), logging.StreamHandler(sys.stdout)]
        if enabled
        else [logging.NullHandler()]
    )
    for h in handlers:
        h.setFormatter(fmt)
        logger.addHandler(h)
    logger.setLevel(logging.INFO)
    logger.propagate = False
    return logger


def progress(iterable: Iterable, total: int, desc: str, enabled: bool) -> Any:
    """A tqdm bar over the steps of an epoch, only where the output is a terminal."""
    if not (enabled and sys.stderr.isatty()):
        return iterable
    from tqdm import tqdm

    return tqdm(iterable, total=total, desc=desc, leave=False, dynamic_ncols=True)


class NullWriter:
    """Stands in for the tensorboard writer in processes other than the first."""

    def add_scalar(self, *args: Any, **kwargs: Any) -> None:
        pass

    def add_image(self, *args: Any, **kwargs: Any) -> None:
        pass

    def close(self) -> None:
        pass


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


def count_parameters(module: nn.Module, exclude: str | None = None) -> int:
    """Number of parameters, leaving out those whose name contains ``exclude``."""
    return sum(
        p.numel() for n, p in module.named_parameters() if exclude is None or exclude not in n
    )


def clip_grad_norm(parameters: Iterable[torch.Tensor], max_norm: float) -> torch.Tensor:
    """``nn.utils.clip_grad_norm_(parameters, max_norm)``: the same L2 norms, scale and result,
    in five calls however many tensors (torch's own takes its one-call foreach kernels on GPUs
    only, and two calls per tensor elsewhere: ~560 of a search step's calls on the CPU).
    Returns the total norm, as a tensor (no host sync)."""
    grads = [p.grad for p in parameters if p.grad is not None]
    if not grads:
        return torch.tensor(0.0)
    total = torch.linalg.vector_norm(torch.stack(torch._foreach_norm(grads)))
    torch._foreach_mul_(grads, torch.clamp(max_norm / (total + 1e-6), max=1.0))
    return total


# glibc's own settings of its allocator: a user who sets any of them has chosen for himself.
MALLOC_ENV = (
    "MALLOC_MMAP_MAX_",
    "MALLOC_TRIM_THRESHOLD_",
    "MALLOC_MMAP_THRESHOLD_",
    "MALLOC_TOP_PAD_",
    "GLIBC_TUNABLES",
)
# "glibc": leave glibc's allocator as it is; "keep" (or unset): keep_freed_memory acts.
ALLOCATOR_ENV = "DARTS_CPU_ALLOCATOR"
_M_TRIM_THRESHOLD, _M_MMAP_MAX = -1, -4  # mallopt's parameters (glibc's malloc.h)


def keep_freed_memory() -> str | None:
    """On Linux with glibc, keep the memory of freed tensors in the process for reuse, as
    ``MALLOC_MMAP_MAX_=0 MALLOC_TRIM_THRESHOLD_=<huge>`` would. Returns what was done (a
    line for the log), or None where nothing was: another C library, ``DARTS_CPU_ALLOCATOR=
    glibc``, or any of MALLOC_ENV set. Raises ConfigError for another DARTS_CPU_ALLOCATOR.

    glibc serves each block above its mmap threshold (32 MiB at most) with a fresh mmap and
    unmaps it on free, so every large temporary of a CPU step (the supernet's stacked
    activations and their gradients, tens of MiB each) page-faults and is zeroed by the kernel
    again, on every use: a memory pass more per tensor. Kept, they are reused as they are.
    The price: the process's memory is not handed back to the system until it exits (its
    peak changes little). For CPU runs only: a GPU run's large tensors are not in this heap.
    """
    choice = os.environ.get(ALLOCATOR_ENV, "keep")
    if choice not in ("keep", "glibc"):
        raise ConfigError(f"{ALLOCATOR_ENV} must be keep or glibc, got {choice!r}")
    import ctypes
    import platform

    if sys.platform != "linux" or platform.libc_ver()[0] != "glibc":
        return None
    if choice == "glibc" or any(name in os.environ for name in MALLOC_ENV):
        return None
    libc = ctypes.CDLL(None)
    # mallopt returns 1 on success
    if libc.mallopt(_M_MMAP_MAX, 0) != 1 or libc.mallopt(_M_TRIM_THRESHOLD, 2**31 - 1) != 1:
        return None
    return f"freed memory is kept for reuse (glibc mallopt; {ALLOCATOR_ENV}=glibc to leave it)"


# --------------------------------------------------------------------------------------------
# Files: written atomically, JSON lines
# --------------------------------------------------------------------------------------------
def atomic_write(path: str, write: Callable[[str], None]) -> str:
    """Write ``path`` through ``write(tmp)`` on a temporary file in the same folder, then
    ``os.replace``: a reader never sees a half-written file, and a crash half way leaves the
    previous file intact. Returns ``path``."""
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    name, ext = os.path.splitext(os.path.basename(path))
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=f".tmp-{name}-", suffix=ext)
    os.close(fd)
    try:
        write(tmp)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise
    return path


def _jsonable(o: Any) -> Any:
    """Tensors and numpy scalars become numbers; anything else its string."""
    return o.item() if hasattr(o, "item") else str(o)


def write_jsonl(path: str, rows: Sequence[dict[str, Any]]) -> str:
    """Write ``rows`` as JSON lines, replacing the file atomically. The scripts rewrite their
    per-epoch files whole from the checkpointed history, so a resumed run has each epoch once."""

    def write(tmp: str) -> None:
        with open(tmp, "w") as f:
            for row in rows:
                f.write(json.dumps(row, default=_jsonable) + "\n")

    return atomic_write(path, write)


def read_jsonl(path: str) -> list[dict[str, Any]]:
    """The rows of a JSON-lines file (metrics.jsonl, alphas.jsonl); [] when it does not exist.
    A last line cut short by a crash is skipped."""
    if not os.path.exists(path):
        return []
    with open(path) as f:
        lines = [line for line in f.read().splitlines() if line.strip()]
    rows = []
    for n, line in enumerate(lines):
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            if n == len(lines) - 1:
                break
            raise ValueError(f"{path}:{n + 1}: not a JSON object") from None
    return rows


# --------------------------------------------------------------------------------------------
# The code version a run records (config.json, every checkpoint)
# --------------------------------------------------------------------------------------------
ROOT = os.path.dirname(os.path.abspath(__file__))
# The project's source files, as the Docker image copies them (Dockerfile: *.py, models/, scripts/).
SOURCES = ("*.py", "models/*.py", "scripts/*.py")


@functools.cache
def code_version() -> str:
    """The version of the code this process runs (:func:`version_of` the project), computed
    once per process."""
    return version_of(ROOT)


def version_of(root: str) -> str:
    """The git commit of the project at ``root`` (``git rev-parse HEAD``), followed by ``-dirty``
    where a tracked file differs from it; without git (a Docker image holds no .git, or git is
    missing or refuses the folder), ``source-sha256:`` and the hash of its source files."""
    return _git_version(root) or "source-sha256:" + source_hash(root)


def _git_version(root: str) -> str | None:
    def git(*args: str) -> str:
        # --no-optional-locks: a status never writes the index (another git may be running).
        cmd = ["git", "--no-optional-locks", "-C", root, *args]
        return subprocess.run(cmd, capture_output=True, text=True, timeout=30, check=True).stdout

    try:
        if os.path.realpath(git("rev-parse", "--show-toplevel").strip()) != os.path.realpath(root):
            return None  # the project's files, copied into some other repository
        commit = git("rev-parse", "HEAD").strip()
        dirty = git("status", "--porcelain", "--untracked-files=no").strip()
    except (OSError, subprocess.SubprocessError):  # no git, no repository, no commit yet
        return None
    return commit + ("-dirty" if dirty else "")


def source_hash(root: str) -> str:
    """SHA-256 over the source files under ``root`` (:data:`SOURCES`): each one's path, size
    and bytes, in path order."""
    h = hashlib.sha256()
    files = sorted({p for pattern in SOURCES for p in glob.glob(os.path.join(root, pattern))})
    for path in files:
        with open(path, "rb") as f:
            data = f.read()
        h.update(f"{os.path.relpath(path, root)}\0{len(data)}\0".encode())  # unambiguous
        h.update(data)
    return h.hexdigest()
