"""Devices and data parallelism: which device a process uses, the process group (torchrun, or
``--gpus 0,1,...`` which launches the processes itself), DDP wrapping and the collectives the
stages need. Every function is a no-op, or the identity, in a single process."""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import logging
import os
import sys
from collections.abc import Iterable, Iterator
from typing import Any, cast

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


DEFAULT_GPUS = [0]  # --gpus left at its default: under torchrun, local rank r takes GPU r


def init_distributed(device: str, gpu_ids: list[int] | None) -> tuple[DistInfo, torch.device]:
    """Join the process group torchrun set up (NCCL on CUDA, gloo on the CPU) and pick this
    process's device: GPU ``gpu_ids[local_rank]``, or visible GPU ``local_rank`` when ``--gpus``
    is left at its default (``torchrun --nproc_per_node=4 search.py ...``) or is ``all``.
    Without torchrun: one process. A CUDA device becomes the current one (``set_device``), so
    that what follows (the RNG state in the checkpoint, NCCL) is this process's own device."""
    if not launched_by_torchrun() or int(os.environ["WORLD_SIZE"]) == 1:
        dev = resolve_device(device, gpu_ids)
        if dev.type == "cuda":
            torch.cuda.set_device(dev)
        return DistInfo(), dev
    info = DistInfo(
        int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"]), int(os.environ["LOCAL_RANK"])
    )
    torchrun_default = gpu_ids is None or gpu_ids == DEFAULT_GPUS
    dev = resolve_device(device, None if torchrun_default else gpu_ids)
    if dev.type == "cuda":
        n_gpu = torch.cuda.device_count()
        ids = list(range(n_gpu)) if torchrun_default else cast(list[int], gpu_ids)
        if info.local_rank >= len(ids):
            n_proc = os.environ.get("LOCAL_WORLD_SIZE", str(info.local_rank + 1))
            what = f"{n_gpu} GPUs are visible" if torchrun_default else f"--gpus lists {len(ids)}"
            raise ConfigError(f"{n_proc} processes on this node but {what}: one GPU per process")
        dev = torch.device("cuda", ids[info.local_rank])
        torch.cuda.set_device(dev)
    if not dist.is_initialized():
        dist.init_process_group(backend(dev))
    return info, dev


BACKEND_ENV = "DARTS_DIST_BACKEND"  # gloo on CUDA: several processes on one GPU (a check)


def backend(dev: torch.device) -> str:
    """NCCL on CUDA, gloo on the CPU; ``DARTS_DIST_BACKEND=gloo`` takes gloo on CUDA too, which
    (unlike NCCL) lets two processes share one GPU, as ``scripts/gpu_check.py`` does."""
    chosen = os.environ.get(BACKEND_ENV, "")
    if chosen not in ("", "nccl", "gloo") or (chosen == "nccl" and dev.type != "cuda"):
        raise ConfigError(f"{BACKEND_ENV} must be gloo, or nccl on CUDA, got {chosen!r}")
    return chosen or ("nccl" if dev.type == "cuda" else "gloo")


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
    # The processes inherit the environment. As torchrun does: one OpenMP thread per process
    # unless OMP_NUM_THREADS is set (n processes of all-cores threads each would spin-wait).
    child_env = {SELF_LAUNCHED: "1"}
    if "OMP_NUM_THREADS" not in os.environ:
        child_env["OMP_NUM_THREADS"] = "1"
    os.environ.update(child_env)
    try:
        elastic_launch(config, sys.executable)(os.path.abspath(script), *argv)
    finally:
        for key in child_env:
            del os.environ[key]
    return True


# --------------------------------------------------------------------------------------------
# TF32
# --------------------------------------------------------------------------------------------
# PyTorch 2.9 added per-backend precision settings ("ieee", "tf32", or "none": the parent's),
# and reading the old allow_tf32 flags raises once both kinds were set; the floor (2.5) has the
# old flags only. So each function uses the new settings where they exist, the old ones where not.
def _new_tf32_api() -> bool:
    return hasattr(torch.backends.cuda.matmul, "fp32_precision") and hasattr(
        getattr(torch.backends.cudnn, "conv", None), "fp32_precision"
    )


def _effective(*levels: str) -> str:
    """The precision that applies: the first level (op, backend, all) that is not "none"."""
    return next((v for v in levels if v != "none"), "ieee")


def tf32_flags() -> dict[str, bool]:
    """Whether TF32 may be used for float32 cuDNN convolutions and CUDA matmuls."""
    b: Any = torch.backends  # the new settings are untyped
    if _new_tf32_api():
        generic = getattr(b, "fp32_precision", "none")
        conv = _effective(b.cudnn.conv.fp32_precision, b.cudnn.fp32_precision, generic)
        matmul = _effective(b.cuda.matmul.fp32_precision, generic)
        return {"cudnn_conv": conv == "tf32", "cuda_matmul": matmul == "tf32"}
    return {"cudnn_conv": bool(b.cudnn.allow_tf32), "cuda_matmul": bool(b.cuda.matmul.allow_tf32)}


def tf32_summary() -> str:
    """One log line: which TF32 flags are on."""
    f = tf32_flags()
    on = lambda b: "on" if b else "off"  # noqa: E731
    return (
        f"TF32: {on(f['cudnn_conv'])} for cuDNN convolutions, {on(f['cuda_matmul'])} for CUDA "
        f"matmuls (--allow_tf32; the Architect's Hessian-vector product never uses it)"
    )


def _set_tf32_raw(conv: Any, matmul: Any) -> None:
    """Set the two settings: precision strings (new API) or booleans / the matmul precision
    name of ``torch.set_float32_matmul_precision`` (old API)."""
    b: Any = torch.backends
    if _new_tf32_api():
        b.cudnn.conv.fp32_precision = conv
        b.cuda.matmul.fp32_precision = matmul
    else:
        torch.backends.cudnn.allow_tf32 = conv
        torch.set_float32_matmul_precision(matmul)  # "high" is TF32, "highest" is not


def _get_tf32_raw() -> tuple[Any, Any]:
    if _new_tf32_api():
        b: Any = torch.backends
        return b.cudnn.conv.fp32_precision, b.cuda.matmul.fp32_precision
    return torch.backends.cudnn.allow_tf32, torch.get_float32_matmul_precision()


def set_tf32(allow: bool) -> None:
    """``--allow_tf32``: TF32 for the float32 convolutions and matmuls, or not. The authors'
    GPUs had none; on Ampere and later cuDNN uses it by default (about 5e-4 relative rounding
    instead of float32's 6e-8)."""
    if _new_tf32_api():
        _set_tf32_raw("tf32" if allow else "ieee", "tf32" if allow else "ieee")
    else:
        _set_tf32_raw(allow, "high" if allow else "highest")


@contextlib.contextmanager
def tf32_disabled() -> Iterator[None]:
    """TF32 off for cuDNN convolutions and CUDA matmuls inside the block; the caller's settings
    are restored after it, also when it raises.

    For differences of nearly equal float32 results: the Architect's finite-difference Hessian
    shifts the weights by about 1e-5 of their size and subtracts two gradients, so TF32's
    rounding (about 5e-4 relative) would be most of the difference."""
    saved = _get_tf32_raw()
    set_tf32(False)
    try:
        yield
    finally:
        _set_tf32_raw(*saved)


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
    """The model wrapped in DistributedDataParallel when there are several processes. Beside
    ``ignore``, DDP leaves alone the buffers a checkpoint does not hold (non-persistent:
    constants derived from the shapes, such as the supernet cells' index tensors), which it
    would otherwise broadcast with the BN statistics at every step."""
    if not dist_info.enabled:
        return model
    from torch.nn.parallel import DistributedDataParallel

    saved = model.state_dict()
    names = list(ignore) + [n for n, _ in model.named_buffers() if n not in saved]
    if names:  # the supported way to keep parameters out of DDP's gradient reduction
        DistributedDataParallel._set_params_and_buffers_to_ignore_for_model(model, names)
    return DistributedDataParallel(
        model, device_ids=[device.index] if device.type == "cuda" else None
    )


def unwrap(model: nn.Module) -> nn.Module:
    """The model inside a DDP wrapper (the model itself when it is not wrapped)."""
    from torch.nn.parallel import DistributedDataParallel

    return model.module if isinstance(model, DistributedDataParallel) else model
