"""Devices and data parallelism: which device a process uses, the process group (torchrun, or
``--gpus 0,1,...`` which launches the processes itself), DDP wrapping and the collectives the
stages need. Every function is a no-op, or the identity, in a single process."""

from __future__ import annotations

import dataclasses
import hashlib
import logging
import os
import sys
from collections.abc import Iterable
from typing import Any

import torch
import torch.distributed as dist
import torch.nn as nn

from utils import ConfigError


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


def parse_gpus(gpus: str) -> list[int] | None:
    """The ids of ``--gpus`` (a comma list), or None for 'all'."""
    if gpus.strip() == "all":
        return None
    try:
        ids = [int(g) for g in gpus.split(",")]
    except ValueError:
        raise ConfigError(
            f"--gpus must be a comma list of GPU ids or 'all', got {gpus!r}"
        ) from None
    if any(i < 0 for i in ids):
        raise ConfigError(f"--gpus ids must be >= 0, got {gpus!r}")
    return ids


def resolve_device(device: str, gpu_ids: list[int] | None) -> torch.device:
    """``--device auto`` picks CUDA (the first of ``--gpus``) when there is one, else the CPU."""
    n_gpu = torch.cuda.device_count()
    if device == "cpu":
        return torch.device("cpu")
    if device == "auto" and n_gpu == 0:
        if gpu_ids and max(gpu_ids) > 0:  # the default --gpus 0 falls back to the CPU, 3 does not
            raise ConfigError(f"GPU {max(gpu_ids)} does not exist (no CUDA GPU is visible)")
        return torch.device("cpu")
    if n_gpu == 0:
        raise ConfigError(f"--device {device} asks for CUDA, but no CUDA GPU is visible")
    index = int(device[5:]) if device.startswith("cuda:") else (gpu_ids[0] if gpu_ids else 0)
    for i in [index] + (gpu_ids or []):
        if i >= n_gpu:
            raise ConfigError(f"GPU {i} does not exist (this machine has {n_gpu}: 0..{n_gpu - 1})")
    return torch.device("cuda", index)


def launched_by_torchrun() -> bool:
    return "LOCAL_RANK" in os.environ and "WORLD_SIZE" in os.environ


SELF_LAUNCHED = "DARTS_SELF_LAUNCHED"  # set in the processes :func:`self_launch` starts


def launched_by_self() -> bool:
    """Whether this process is one of those a ``--gpus`` self-launch started."""
    return os.environ.get(SELF_LAUNCHED) == "1"


def init_distributed(device: str, gpu_ids: list[int] | None) -> tuple[DistInfo, torch.device]:
    """Join the process group torchrun set up (NCCL on CUDA, gloo on the CPU) and pick this
    process's device: GPU ``gpu_ids[local_rank]``. Without torchrun: one process."""
    if not launched_by_torchrun() or int(os.environ["WORLD_SIZE"]) == 1:
        return DistInfo(), resolve_device(device, gpu_ids)
    info = DistInfo(
        int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"]), int(os.environ["LOCAL_RANK"])
    )
    dev = resolve_device(device, gpu_ids)
    if dev.type == "cuda":
        ids = gpu_ids or list(range(torch.cuda.device_count()))
        if info.local_rank >= len(ids):
            raise ConfigError(
                f"{info.local_rank + 1} processes on this node but --gpus lists {len(ids)} GPUs"
            )
        dev = torch.device("cuda", ids[info.local_rank])
        torch.cuda.set_device(dev)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if dev.type == "cuda" else "gloo")
    return info, dev


def cleanup_distributed() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def self_launch(script: str, argv: list[str], device: str, gpu_ids: list[int] | None) -> bool:
    """``--gpus 0,1,...`` without torchrun: start one process per listed GPU with PyTorch's
    launcher (the API behind torchrun) and wait for them. Returns False, launching nothing,
    when there is nothing to launch (one GPU, or already under torchrun). A failed worker raises
    the launcher's ChildFailedError, a signal to this process its SignalException."""
    if launched_by_torchrun() or device == "cpu" and not gpu_ids:
        return False
    n = len(gpu_ids) if gpu_ids is not None else torch.cuda.device_count()
    if n <= 1:
        return False
    if device != "cpu":
        resolve_device(device, gpu_ids)  # every listed GPU must exist
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
    # The launcher's own warnings (a worker's exit, its shutdown) would repeat, in torch's
    # format, what the processes and the script say in one line. Its modules' loggers carry
    # their own level, so each is set.
    for name in list(logging.root.manager.loggerDict):
        if name.startswith("torch.distributed.elastic"):
            logging.getLogger(name).setLevel(logging.ERROR)
    os.environ[SELF_LAUNCHED] = "1"  # the processes inherit it
    try:
        elastic_launch(config, sys.executable)(os.path.abspath(script), *argv)
    finally:
        del os.environ[SELF_LAUNCHED]
    return True


# --------------------------------------------------------------------------------------------
# Collectives
# --------------------------------------------------------------------------------------------
def world_size() -> int:
    """Processes in the default process group; 1 when there is none."""
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def all_reduce_mean(tensors: Iterable[torch.Tensor]) -> None:
    """Average tensors in place across processes (no-op in a single process)."""
    if world_size() == 1:
        return
    tensors = list(tensors)
    # One flat buffer, one collective, one copy back (torch._foreach_copy_) for all tensors.
    flat = torch.cat([t.reshape(-1) for t in tensors])
    dist.all_reduce(flat)
    flat /= dist.get_world_size()
    parts = flat.split([t.numel() for t in tensors])
    torch._foreach_copy_(tensors, [p.view_as(t) for p, t in zip(parts, tensors)])


def all_reduce_sum(values: list[float], device: torch.device) -> list[float]:
    """Sum scalars across processes (identity in a single process)."""
    if world_size() == 1:
        return values
    t = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return t.tolist()


def broadcast_buffers(module: nn.Module) -> None:
    """Give every process the first process's buffers (BN running statistics), in place.

    Each process updates its BN statistics with its own batches, so after a training epoch they
    differ between processes. Evaluated with them, each shard of the test set would be scored
    by a slightly different network, none of them the one the checkpoint (written by the first
    process) holds."""
    if world_size() == 1:
        return
    for b in module.buffers():
        dist.broadcast(b, src=0)


def replicas_identical(module: nn.Module) -> bool:
    """Whether every process holds exactly the same parameters and buffers (weights, alphas and,
    after :func:`broadcast_buffers`, BN statistics). True in one process."""
    if world_size() == 1:
        return True
    h = hashlib.sha256()
    for _, p in sorted([*module.named_parameters(), *module.named_buffers()]):
        h.update(p.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    digests: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(digests, h.hexdigest())
    return len(set(digests)) == 1


# --------------------------------------------------------------------------------------------
# Models
# --------------------------------------------------------------------------------------------
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


def unwrap(model: nn.Module) -> nn.Module:
    """The model inside a DDP wrapper (the model itself when it is not wrapped)."""
    from torch.nn.parallel import DistributedDataParallel

    return model.module if isinstance(model, DistributedDataParallel) else model
