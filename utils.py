"""Shared pieces of search.py and augment.py: device, seeding, logging, meters, evaluation and
checkpoints."""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
import random
import shlex
import signal
import sys
import tempfile
import threading
from collections.abc import Callable, Iterable, Iterator
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
    if want == "cpu":
        return torch.device("cpu")
    if want == "auto" and n_gpu == 0:
        if ids and max(ids) > 0:  # the default --gpus 0 falls back to the CPU, GPU 3 does not
            raise ConfigError(f"GPU {max(ids)} does not exist (no CUDA GPU is visible)")
        return torch.device("cpu")
    if n_gpu == 0:
        raise ConfigError(f"--device {want} asks for CUDA, but no CUDA GPU is visible")
    index = int(want[5:]) if want.startswith("cuda:") else (ids[0] if ids else 0)
    for i in [index] + (ids or []):
        if i >= n_gpu:
            raise ConfigError(f"GPU {i} does not exist (this machine has {n_gpu}: 0..{n_gpu - 1})")
    return torch.device("cuda", index)


def memory_format(cfg: BaseConfig) -> torch.memory_format:
    """The torch memory format of ``--memory_format``: ``model.to(memory_format=...)``
    stores the 4-d weights in it, and the convs then give activations in it (the stem turns
    an NCHW batch into NHWC). Apply it before the optimizers are built: their buffers copy the
    parameters' layout."""
    return torch.channels_last if cfg.memory_format == "channels_last" else torch.contiguous_format


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
    # Under DDP each process saw its own shard of the data: add the shards up.
    loss, top1, top5, n = all_reduce_sum(
        [meters.loss.sum, meters.top1.sum, meters.top5.sum, float(meters.loss.count)], device
    )
    return {"loss": loss / n, "top1": top1 / n, "top5": top5 / n, "count": n}


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


# --------------------------------------------------------------------------------------------
# Resume: run folders, RNG states, interruption
# --------------------------------------------------------------------------------------------
CHECKPOINT = "checkpoint.pth.tar"

# Settings that may change when a run is resumed: they do not change what is computed.
RESUMABLE_CHANGES = {
    "resume",
    "memory_format",
    "workers",
    "print_freq",
    "device",
    "gpus",
    "data_path",
    "no_progress",
}


def open_run(run_dir: str, cfg: BaseConfig) -> dict[str, Any] | None:
    """Check the run folder against ``--resume`` before anything is written.

    Returns the checkpoint to resume from (None for a fresh run). A fresh run never
    overwrites a checkpoint; a resumed run must have the configuration it was started with.
    """
    path = os.path.join(run_dir, CHECKPOINT)
    resume = getattr(cfg, "resume", False)
    if not resume:
        if os.path.exists(path):
            raise ConfigError(
                f"{run_dir} already holds a checkpoint: add --resume to continue that run, "
                f"or choose a new --name"
            )
        return None
    if not os.path.exists(path):
        raise ConfigError(f"--resume: there is no checkpoint to resume at {path}")
    state = load_checkpoint(path)
    saved, now = state["config"], cfg.to_dict()
    for key in sorted(set(saved) | set(now)):
        if key in RESUMABLE_CHANGES:
            continue
        if saved.get(key) != now.get(key):
            raise ConfigError(
                f"{path} was made with --{key} {saved.get(key)}, this run asks for "
                f"--{key} {now.get(key)}: resume with the settings of the run"
            )
    return state


def last_checkpoint(run_dir: str) -> str:
    path = os.path.join(run_dir, CHECKPOINT)
    return path if os.path.exists(path) else "none yet"


def rng_state(generator: torch.Generator) -> dict[str, Any]:
    """Every RNG the run depends on: Python, NumPy, torch (CPU, CUDA) and the data order."""
    # Only tensors and plain values, so the checkpoint loads with weights_only=True.
    version, internal, gauss = random.getstate()
    _, keys, pos, has_gauss, cached = np.random.get_state(legacy=True)  # type: ignore[misc]
    return {
        "python": list(internal) + [version, gauss],
        "numpy": {
            "keys": torch.from_numpy(np.asarray(keys, dtype=np.int64)),
            "pos": pos,
            "has_gauss": has_gauss,
            "cached_gaussian": cached,
        },
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        "data": generator.get_state(),
    }


def set_rng_state(state: dict[str, Any], generator: torch.Generator) -> None:
    py = state["python"]
    random.setstate((py[-2], tuple(py[:-2]), py[-1]))
    npst = state["numpy"]
    np.random.set_state(
        (
            "MT19937",
            npst["keys"].numpy().astype(np.uint32),
            npst["pos"],
            npst["has_gauss"],
            npst["cached_gaussian"],
        )
    )
    torch.set_rng_state(state["torch"])
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    generator.set_state(state["data"])


class Interrupted(Exception):
    """SIGTERM (or Ctrl-C) arrived; the last completed epoch's checkpoint is on disk."""

    def __init__(self, signum: int) -> None:
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


@contextlib.contextmanager
def interruptible() -> Iterator[None]:
    """Turn SIGTERM and SIGINT into :class:`Interrupted` inside the block (main thread only)."""

    def handler(signum: int, frame: Any) -> None:
        raise Interrupted(signum)

    if threading.current_thread() is not threading.main_thread():
        yield
        return
    old = {s: signal.signal(s, handler) for s in (signal.SIGTERM, signal.SIGINT)}
    try:
        yield
    finally:
        for s, h in old.items():
            signal.signal(s, h)


def resume_hint(script: str, run_dir: str, argv: list[str]) -> str:
    """One line telling the user how to continue an interrupted run."""
    ckpt = os.path.join(run_dir, CHECKPOINT)
    if not os.path.exists(ckpt):
        return f"no epoch was completed, nothing to resume in {run_dir}"
    args = " ".join(shlex.quote(a) for a in argv if a != "--resume")
    return (
        f"the last completed epoch is saved in {ckpt}; continue with: "
        f"python {script} {args} --resume"
    )


def progress(iterable: Iterable, total: int, desc: str, enabled: bool) -> Any:
    """A tqdm bar over the steps of an epoch, only where the output is a terminal."""
    if not (enabled and sys.stderr.isatty()):
        return iterable
    from tqdm import tqdm

    return tqdm(iterable, total=total, desc=desc, leave=False, dynamic_ncols=True)


# --------------------------------------------------------------------------------------------
# Distributed data parallel (torchrun, or --gpus 0,1,... which launches the processes itself)
# --------------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class DistInfo:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def launched_by_torchrun() -> bool:
    return "LOCAL_RANK" in os.environ and "WORLD_SIZE" in os.environ


def init_distributed(cfg: BaseConfig) -> tuple[DistInfo, torch.device]:
    """Join the process group torchrun set up (NCCL on CUDA, gloo on the CPU) and pick this
    process's device: GPU ``--gpus[local_rank]``. Without torchrun: one process."""
    if not launched_by_torchrun() or int(os.environ["WORLD_SIZE"]) == 1:
        return DistInfo(), resolve_device(cfg)
    import torch.distributed as dist

    info = DistInfo(
        int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"]), int(os.environ["LOCAL_RANK"])
    )
    device = resolve_device(cfg)
    if device.type == "cuda":
        ids = cfg.gpu_ids() or list(range(torch.cuda.device_count()))
        if info.local_rank >= len(ids):
            raise ConfigError(
                f"{info.local_rank + 1} processes on this node but --gpus lists {len(ids)} GPUs"
            )
        device = torch.device("cuda", ids[info.local_rank])
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return info, device


def world_size() -> int:
    """Processes in the default process group; 1 when there is none."""
    import torch.distributed as dist

    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def all_reduce_mean(tensors: Iterable[torch.Tensor]) -> None:
    """Average tensors in place across processes (no-op in a single process)."""
    import torch.distributed as dist

    if world_size() == 1:
        return
    tensors = list(tensors)
    flat = torch.cat([t.reshape(-1) for t in tensors])
    dist.all_reduce(flat)
    flat /= dist.get_world_size()
    offset = 0
    for t in tensors:
        n = t.numel()
        t.copy_(flat[offset : offset + n].view_as(t))
        offset += n


def all_reduce_sum(values: list[float], device: torch.device) -> list[float]:
    """Sum scalars across processes (identity in a single process)."""
    import torch.distributed as dist

    if world_size() == 1:
        return values
    t = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return t.tolist()


def self_launch(script: str, cfg: BaseConfig, argv: list[str]) -> int | None:
    """``--gpus 0,1,...`` without torchrun: start one process per listed GPU with PyTorch's
    launcher (the API behind torchrun) and wait for them. Returns None when there is nothing
    to launch (one GPU, or already under torchrun)."""
    ids = cfg.gpu_ids()
    if launched_by_torchrun() or cfg.device == "cpu" and not ids:
        return None
    n = len(ids) if ids is not None else torch.cuda.device_count()
    if n <= 1:
        return None
    if cfg.device != "cpu":
        resolve_device(cfg)  # every listed GPU must exist
    from torch.distributed.launcher.api import LaunchConfig, elastic_launch

    config = LaunchConfig(
        min_nodes=1,
        max_nodes=1,
        nproc_per_node=n,
        run_id=f"darts-{os.getpid()}",
        rdzv_backend="c10d",
        rdzv_endpoint="localhost:0",
        max_restarts=0,
        monitor_interval=1,
    )
    try:
        elastic_launch(config, sys.executable)(os.path.abspath(script), *argv)
    except Exception as e:  # ChildFailedError: the failing rank has printed its own error
        print(
            f"{os.path.basename(script)}: error: a worker process failed ({type(e).__name__})",
            file=sys.stderr,
        )
        return 1
    return 0


def wrap_ddp(
    model: nn.Module, dist_info: DistInfo, device: torch.device, ignore: Iterable[str] = ()
) -> Any:
    """The model wrapped in DistributedDataParallel when there are several processes."""
    if not dist_info.enabled:
        return model
    from torch.nn.parallel import DistributedDataParallel

    names = list(ignore)
    if names:  # the supported way to keep parameters out of DDP's gradient reduction
        DistributedDataParallel._set_params_and_buffers_to_ignore_for_model(model, names)
    return DistributedDataParallel(
        model, device_ids=[device.index] if device.type == "cuda" else None
    )


def cleanup_distributed() -> None:
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


class NullWriter:
    """Stands in for the tensorboard writer in processes other than the first."""

    def add_scalar(self, *args: Any, **kwargs: Any) -> None:
        pass

    def add_figure(self, *args: Any, **kwargs: Any) -> None:
        pass

    def close(self) -> None:
        pass


def broadcast_buffers(module: nn.Module) -> None:
    """Give every process the first process's buffers (BN running statistics), in place.

    Each process updates its BN statistics with its own batches, so after a training epoch they
    differ between processes. Evaluated with them, each shard of the test set would be scored
    by a slightly different network, none of them the one the checkpoint (written by the first
    process) holds. A no-op in a single process."""
    import torch.distributed as dist

    if world_size() == 1:
        return
    for b in module.buffers():
        dist.broadcast(b, src=0)


def replicas_identical(module: nn.Module) -> bool:
    """Whether every process holds exactly the same parameters and buffers (weights, alphas and,
    after :func:`broadcast_buffers`, BN statistics). True in one process."""
    import hashlib

    import torch.distributed as dist

    if world_size() == 1:
        return True
    h = hashlib.sha256()
    for _, p in sorted([*module.named_parameters(), *module.named_buffers()]):
        h.update(p.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    digests: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(digests, h.hexdigest())
    return len(set(digests)) == 1


def script_main(
    script: str,
    run_root: str,
    argv: list[str] | None,
    prepare: Callable[[list[str]], tuple[BaseConfig, Callable[[], Any]]],
) -> int:
    """The command-line frame of search.py and augment.py: ``prepare(argv)`` parses and checks
    the input and returns the config and the job. Bad input: one line, exit status 2. Several
    GPUs: one process each. SIGTERM / Ctrl-C: one line saying how to resume, exit 128 + signal."""
    from genotypes import GenotypeError
    from preproc import DataError

    name = os.path.basename(script)
    argv = sys.argv[1:] if argv is None else argv
    cfg: BaseConfig | None = None
    try:
        cfg, job = prepare(argv)
        launched = self_launch(script, cfg, argv)  # --gpus 0,1,...: one process each
        if launched is not None:
            return launched
        with interruptible():
            job()
    except (ConfigError, DataError, GenotypeError, NonFiniteLossError) as e:
        print(f"{name}: error: {e}", file=sys.stderr)
        return 2
    except Interrupted as e:
        assert cfg is not None  # signals are only turned into Interrupted inside the job
        hint = resume_hint(name, os.path.join(run_root, cfg.name), argv)
        print(f"{name}: interrupted by {e}: {hint}", file=sys.stderr)
        return 128 + e.signum
    finally:
        cleanup_distributed()
    return 0
