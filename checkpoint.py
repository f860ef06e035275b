"""Nothing lost: atomic checkpoints loaded with ``weights_only``, the check of a run folder
against ``--resume``, the lock that gives a run folder to one process, every RNG state, and the
clean stop on SIGTERM / SIGINT."""

from __future__ import annotations

import contextlib
import fcntl
import os
import pickle
import random
import re
import shlex
import signal
import threading
import warnings
from collections.abc import Collection, Iterator
from typing import Any

import numpy as np
import torch

from utils import ConfigError, atomic_write, code_version

CHECKPOINT = "checkpoint.pth.tar"
LOCK = ".lock"

# Settings that may change when a run is resumed: they do not change what is computed.
RESUMABLE_CHANGES = {
    "resume",
    "memory_format",
    "allow_tf32",
    "kernels",
    "workers",
    "print_freq",
    "device",
    "gpus",
    "data_path",
    "no_progress",
}


# --------------------------------------------------------------------------------------------
# Checkpoint files
# --------------------------------------------------------------------------------------------
def save_checkpoint(state: dict[str, Any], path: str) -> None:
    """Write ``state`` with the version of the code that wrote it (``code_version``:
    :func:`utils.code_version`), atomically (:func:`utils.atomic_write`), flushed to the disk
    before the rename."""
    state = {**state, "code_version": code_version()}

    def write(tmp: str) -> None:
        with open(tmp, "wb") as f:
            torch.save(state, f)
            f.flush()
            os.fsync(f.fileno())

    atomic_write(path, write)


def safe_load(path: str, map_location: str | torch.device = "cpu", what: str = "") -> Any:
    """``torch.load(path, weights_only=True)``, quietly (torch's warning about an unusual
    pickle protocol is not the user's business); ConfigError with one line if it fails: a file
    that holds pickled code (or a pickle the tensor-only reader cannot follow) says so and is
    refused, without torch's advice to turn that safety off; a damaged file says that (``what``
    names the kind of file: "checkpoint ")."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Detected pickle protocol", category=UserWarning)
        try:
            return torch.load(path, map_location=map_location, weights_only=True)
        except Exception as e:  # torch raises many kinds for a damaged file
            error = e
    text = str(error)
    with open(path, "rb") as f:
        pickled = f.read(1) == b"\x80"  # pickle's PROTO opcode (protocol 2+); text is not
    if not isinstance(error, pickle.UnpicklingError) or "Weights only load failed" not in text:
        first = text.strip().splitlines()[0][:200] if text.strip() else type(error).__name__
        raise ConfigError(f"cannot read {what}{path}: {first} (a truncated or damaged file?)")
    code = re.search(r"GLOBAL\s+([\w.]+)", text)
    if code:
        raise ConfigError(
            f"{path} holds pickled code ({code.group(1)}): refused, only tensors are read"
        )
    if not pickled:  # the unpickler read random bytes as opcodes
        raise ConfigError(
            f"cannot read {what}{path}: not a torch.save file (a truncated or damaged file?)"
        )
    # e.g. a plain pickle.dump of protocol 4 ("Unsupported operand 149")
    lines = [ln.strip() for ln in text.split("WeightsUnpickler error:")[-1].splitlines()]
    reason = next((ln for ln in lines if ln), "unsupported content")[:80]
    raise ConfigError(
        f"{path} is a pickle that the tensor-only reader cannot follow ({reason}; not a "
        f"torch.save file of tensors): refused, it may hold code"
    )


def load_checkpoint(path: str, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """Load a checkpoint dict with ``weights_only=True``; ConfigError with one line if it is
    missing, truncated, corrupt, holds pickled code or is not one of ours."""
    if not os.path.isfile(path):
        raise ConfigError(f"no checkpoint at {path}")
    state = safe_load(path, map_location, "checkpoint ")
    if not isinstance(state, dict) or "model" not in state or "config" not in state:
        raise ConfigError(f"{path} is not a checkpoint of this project")
    return state


def check_resume(
    run_dir: str,
    config: dict[str, Any],
    resume: bool,
    defaults: dict[str, Any] | None = None,
) -> dict[str, Any] | None:
    """Check the run folder against ``--resume`` before anything is written.

    Returns the checkpoint to resume from (None for a fresh run). A fresh run never
    overwrites a checkpoint; a resumed run must have the configuration (``config``, the
    run's settings as a dict) it was started with, but for :data:`RESUMABLE_CHANGES`. A
    setting the run's checkpoint predates is no change when it has its value of ``defaults``
    (a run started before a flag existed resumes as long as the flag is left alone).
    """
    path = os.path.join(run_dir, CHECKPOINT)
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
    saved = state["config"]
    key = changed_setting(saved, config, RESUMABLE_CHANGES, defaults)
    if key is not None:
        raise ConfigError(
            f"{path} was made with --{key} {saved.get(key)}, this run asks for "
            f"--{key} {config.get(key)}: resume with the settings of the run"
        )
    return state


def changed_setting(
    saved: dict[str, Any],
    wanted: dict[str, Any],
    may_change: Collection[str] = (),
    defaults: dict[str, Any] | None = None,
) -> str | None:
    """The first setting (in name order) that ``wanted`` changes from ``saved``, or None. Those in
    ``may_change`` may; one that ``saved`` predates is no change while it has its value in
    ``defaults``."""
    for key in sorted(set(saved) | set(wanted)):
        if key in may_change:
            continue
        if key not in saved and defaults is not None and wanted.get(key) == defaults.get(key):
            continue
        if saved.get(key) != wanted.get(key):
            return key
    return None


def last_checkpoint(run_dir: str) -> str:
    path = os.path.join(run_dir, CHECKPOINT)
    return path if os.path.exists(path) else "none yet"


# --------------------------------------------------------------------------------------------
# One process per run folder
# --------------------------------------------------------------------------------------------
class RunLock:
    """An exclusive ``flock`` on ``<run_dir>/.lock`` for the life of the process.

    The kernel releases it when the process ends, however it ends (``kill -9`` too), so there
    is never a stale lock to clean up. The file holds the holder's process id, for the message
    a second process gets: ConfigError "... is in use by process N"."""

    def __init__(self, run_dir: str) -> None:
        self.path = os.path.join(run_dir, LOCK)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        holder = _try_lock(fd)
        if holder is not None:
            os.close(fd)
            raise ConfigError(
                f"{run_dir} is in use by process {holder}: another run is writing there; wait "
                f"for it to end (or stop it), or choose a new --name"
            )
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())
        self.fd: int | None = fd

    def release(self) -> None:
        if self.fd is not None:
            os.close(self.fd)  # closing the descriptor releases the flock
            self.fd = None


def _try_lock(fd: int) -> str | None:
    """Take the flock on ``fd``; if another process holds it, the process id it wrote."""
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return os.read(fd, 32).decode(errors="replace").strip() or "unknown"
    return None


def lock_holder(run_dir: str) -> str | None:
    """The process id of the live process that holds ``run_dir``'s lock, or None when the folder
    is free (or has no lock file). Takes nothing: the probe's lock ends with its descriptor."""
    try:
        fd = os.open(os.path.join(run_dir, LOCK), os.O_RDWR)
    except FileNotFoundError:
        return None
    try:
        return _try_lock(fd)
    finally:
        os.close(fd)


# --------------------------------------------------------------------------------------------
# RNG state
# --------------------------------------------------------------------------------------------
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
        # This process's own GPU only (each DDP process restores it on its own GPU): a run may
        # resume with fewer GPUs visible (--gpus, CUDA_VISIBLE_DEVICES) than it started with.
        "cuda": _cuda_rng_state(),
        "data": generator.get_state(),
    }


def _cuda_rng_state() -> torch.Tensor | None:
    """The CUDA RNG state of this process's (current) GPU; None when this process has not used
    CUDA (a CPU run on a GPU machine: asking would start a CUDA context for nothing)."""
    if not torch.cuda.is_available() or not torch.cuda.is_initialized():
        return None
    return torch.cuda.get_rng_state(torch.cuda.current_device())


def _set_cuda_rng_state(saved: Any) -> None:
    """Restore the state of this process's GPU. ``saved`` is one state (tensor), None / [] (no
    CUDA when saved), or the list of every visible GPU's state that older checkpoints hold:
    then the one of this process's device index if the list has it, else the first."""
    if not torch.cuda.is_available() or saved is None or len(saved) == 0:
        return
    device = torch.cuda.current_device()
    if isinstance(saved, (list, tuple)):
        saved = saved[device] if device < len(saved) else saved[0]
    torch.cuda.set_rng_state(saved, device)


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
    _set_cuda_rng_state(state.get("cuda"))
    generator.set_state(state["data"])


# --------------------------------------------------------------------------------------------
# A clean stop on SIGTERM / SIGINT
# --------------------------------------------------------------------------------------------
STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)


class Interrupted(Exception):
    """SIGTERM (or Ctrl-C) arrived; the last completed epoch's checkpoint is on disk."""

    def __init__(self, signum: int) -> None:
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


_held: list[int] | None = None  # stop signals held back by stop_signals_held(), else None


def _raise_interrupted(signum: int, frame: Any) -> None:
    if _held is not None:
        _held.append(signum)
        return
    raise Interrupted(signum)


@contextlib.contextmanager
def interruptible() -> Iterator[None]:
    """Turn SIGTERM and SIGINT into :class:`Interrupted` inside the block (main thread only)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    old = {s: signal.signal(s, _raise_interrupted) for s in STOP_SIGNALS}
    try:
        yield
    finally:
        for s, h in old.items():
            signal.signal(s, h)


@contextlib.contextmanager
def stop_signals_held() -> Iterator[None]:
    """Hold SIGTERM and SIGINT back inside the block; one that arrived meanwhile raises
    :class:`Interrupted` when the block ends.

    Data-loader workers are forked inside it (``iter(loader)``): they inherit this thread's
    blocked mask, so a signal sent to the whole process group (SLURM's preemption, ``timeout``,
    Ctrl-C in a terminal) leaves them alone, and the main process alone stops the run and shuts
    them down (:func:`ignore_stop_signals` covers workers started any other way). The main
    process itself may take the signal on another of its threads (gloo's, pin-memory's); its
    handler then only notes it, so no iterator is left half-built."""
    global _held
    old_mask = signal.pthread_sigmask(signal.SIG_BLOCK, STOP_SIGNALS)
    _held = []
    try:
        yield
    finally:
        held, _held = _held, None
        signal.pthread_sigmask(signal.SIG_SETMASK, old_mask)
    if held:
        raise Interrupted(held[0])


def ignore_stop_signals(worker_id: int = 0) -> None:
    """``worker_init_fn`` of every data loader: the worker ignores SIGTERM and SIGINT and leaves
    them to the main process (see :func:`stop_signals_held`)."""
    for s in STOP_SIGNALS:
        signal.signal(s, signal.SIG_IGN)


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
