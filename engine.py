"""The training machinery every stage shares (in the spirit of DeiT's engine.py).

A stage (search.py, augment.py) owns its model, its loaders, its step function and its log
lines; everything around them lives here, once:

* :class:`Run`: the run's set-up (device and process group, run folder and its lock, logger,
  tensorboard writer, resume state) and its end-of-epoch bookkeeping (tensorboard, JSON lines,
  atomic checkpoint);
* :func:`train_one_epoch`: the epoch loop around a step function, its metrics kept on the
  device and read every ``--print_freq`` steps, with the non-finite stop;
* :func:`evaluate`: loss, top-1 and top-5 over a loader, summed over the DDP shards;
* :func:`data_loader`: a DataLoader whose workers leave SIGTERM / SIGINT to the main process;
* :func:`script_main`: the command-line frame (one-line errors, exit statuses, ``--gpus``).

A run, as the stages use it::

    with Run.open(cfg, "searchs", "search") as run:  # reads only: device, resume check
        loaders = make_loaders(cfg, run)             # data checks, before anything is written
        run.start("Search")                          # folder, lock, log, config.json, seed
        run.track(model=model, w_optim=w_optim,      # the checkpoint's keys, one literal;
                  extra={"best_top1": -1.0})         # restored here on --resume
        for epoch in run.epochs():                   # resumes after the last saved epoch
            train = train_one_epoch(run, step, loader, epoch)
            run.end_epoch(record, ...)               # tensorboard, metrics.jsonl, checkpoint

The checkpoint is what ``track()`` names plus :data:`RUN_KEYS`. Out of this order (``run.extra``
assigned, ``track()`` twice or before ``start()``, ``run.model`` or ``run.epochs()`` before
``track()``), Run raises :class:`RunOrderError`: a bug in the stage, with its traceback.
"""

from __future__ import annotations

import dataclasses
import multiprocessing
import os
import re
import signal
import sys
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from typing import Any, Protocol, TypeVar

import torch
import torch.nn as nn
from torch.utils.data import DataLoader, Dataset

import distributed
from checkpoint import (
    CHECKPOINT,
    Interrupted,
    RunLock,
    check_resume,
    ignore_stop_signals,
    interruptible,
    last_checkpoint,
    resume_hint,
    rng_state,
    save_checkpoint,
    set_rng_state,
    stop_signals_held,
)
from models.kernels import set_kernels
from utils import (
    ConfigError,
    Meters,
    NullWriter,
    UserError,
    get_logger,
    keep_freed_memory,
    memory_format,
    progress,
    set_seed,
    write_jsonl,
)

M = TypeVar("M", bound=nn.Module)


class NonFiniteLossError(UserError):
    """The loss became NaN or infinite; the message names the epoch, step and last checkpoint."""


class RunOrderError(RuntimeError):
    """A stage used :class:`Run` against its contract (``extra`` assigned, ``track()`` twice,
    ``model`` read before ``track()`` ...): a bug in the stage, never the user's input, so it
    ends with its traceback, not with a one-line error."""


# What Run itself adds to every checkpoint, next to the tracked objects' state_dicts and the
# stage's counters (Run.track's ``extra``): neither may use these keys.
# code_version is written by checkpoint.save_checkpoint, through which every checkpoint goes.
RUN_KEYS = ("epoch", "global_step", "history", "config", "code_version", "rng")


class StageConfig(Protocol):
    """What the engine reads of a stage's config (config.BaseConfig has it all)."""

    name: str
    device: str
    seed: int
    epochs: int
    print_freq: int
    no_progress: bool
    resume: bool
    memory_format: str
    allow_tf32: bool
    kernels: str

    def gpu_ids(self) -> list[int] | None: ...
    def to_dict(self) -> dict[str, Any]: ...
    def save(self, path: str) -> None: ...


# --------------------------------------------------------------------------------------------
# Data
# --------------------------------------------------------------------------------------------
def data_loader(dataset: Dataset, batch_size: int, workers: int, pin: bool, **kw: Any) -> Any:
    """A DataLoader whose worker processes ignore SIGTERM and SIGINT: a signal to the whole
    process group stops the run the same way as a signal to the main process alone."""
    return DataLoader(
        dataset,
        batch_size=batch_size,
        num_workers=workers,
        pin_memory=pin,
        worker_init_fn=ignore_stop_signals if workers > 0 else None,
        **kw,
    )


class Paired:
    """Two loaders stepped together (the search's weight and alpha halves); as long as the
    shorter one."""

    def __init__(self, a: Any, b: Any) -> None:
        self.a, self.b = a, b

    def __len__(self) -> int:
        return min(len(self.a), len(self.b))

    def __iter__(self) -> Iterator[tuple[Any, Any]]:
        return zip(self.a, self.b)


def _to(batch: Any, device: torch.device) -> Any:
    """A batch (a tensor, or tuples of them) on ``device``."""
    if isinstance(batch, torch.Tensor):
        return batch.to(device, non_blocking=True)
    return type(batch)(_to(b, device) for b in batch)


def _batches(loader: Iterable) -> Iterator:
    """Iterate ``loader``, its worker processes forked with SIGTERM / SIGINT blocked
    (:func:`checkpoint.stop_signals_held`)."""
    with stop_signals_held():
        it = iter(loader)
    return it


# --------------------------------------------------------------------------------------------
# The run
# --------------------------------------------------------------------------------------------
@dataclasses.dataclass
class Run:
    """One run of a stage in ``<root>/<name>/``. Only the first process under DDP writes."""

    cfg: StageConfig
    stage: str  # "search", "augment": names the log file and the logger
    dir: str
    dist: distributed.DistInfo
    device: torch.device
    resumed: dict[str, Any] | None
    allocator: str | None = None  # what utils.keep_freed_memory did (CPU runs), for the log
    logger: Any = None
    writer: Any = None
    lock: RunLock | None = None
    # Set once, by track(): the checkpointed objects, and the stage's counters (best ...).
    _tracked: dict[str, Any] | None = None
    _extra: dict[str, Any] | None = None
    history: list[dict[str, Any]] = dataclasses.field(default_factory=list)
    global_step: int = 0
    data_gen: torch.Generator = dataclasses.field(default_factory=torch.Generator)
    _epoch_t0: float = 0.0

    @classmethod
    def open(cls, cfg: StageConfig, root: str, stage: str) -> Run:
        """Join the process group, pick the device and check the run folder against
        ``--resume``. Writes nothing: bad input stops before the folder exists."""
        set_kernels(cfg.kernels)  # the models' formulations, for the whole process
        info, device = distributed.init_distributed(cfg.device, cfg.gpu_ids())
        allocator = keep_freed_memory() if device.type == "cpu" else None
        run_dir = os.path.join(root, cfg.name)
        defaults = type(cfg)().to_dict()  # type: ignore[call-arg]
        resumed = check_resume(run_dir, cfg.to_dict(), cfg.resume, defaults)
        gen = torch.Generator().manual_seed(cfg.seed)  # batch order and loader-worker seeds
        return cls(cfg, stage, run_dir, info, device, resumed, allocator, data_gen=gen)

    @property
    def is_main(self) -> bool:
        return self.dist.is_main

    @property
    def pin_memory(self) -> bool:
        return self.device.type == "cuda"

    def path(self, *parts: str) -> str:
        return os.path.join(self.dir, *parts)

    def start(self, title: str) -> None:
        """Make the run folder and take its lock (first process only), open the log and write
        the config, then seed every RNG. ``title`` heads the log ("Search", "Augment")."""
        if self.is_main:
            try:
                os.makedirs(self.dir, exist_ok=True)
                self.lock = RunLock(self.dir)
            except OSError as e:
                raise ConfigError(
                    f"cannot write to the output folder {self.dir}: {e.strerror}"
                ) from None
            if self.resumed is None:  # a run that ended while this one started
                check_resume(self.dir, {}, resume=False)
        self.logger = get_logger(
            self.path(f"{self.stage}.log"), f"darts.{self.stage}", self.is_main
        )
        self.logger.info(
            f"{title} on {self.device} (PyTorch {torch.__version__}) with config:\n{self.cfg}"
        )
        if self.is_main:
            self.cfg.save(self.path("config.json"))
        # The same seed in every process: the same initial weights (and alphas), and RNG streams
        # that the checkpoint of the first process restores for all of them.
        set_seed(self.cfg.seed)
        distributed.set_tf32(self.cfg.allow_tf32)
        if self.device.type == "cuda":
            torch.backends.cudnn.benchmark = True
            self.logger.info(distributed.tf32_summary())
        if self.allocator:
            self.logger.info(f"CPU allocator: {self.allocator}")

    def place(self, model: M) -> M:
        """``model`` on the run's device, in the memory format of ``--memory_format``."""
        return model.to(self.device).to(memory_format=memory_format(self.cfg.memory_format))

    def track(
        self, *, model: nn.Module, extra: dict[str, Any] | None = None, **objects: Any
    ) -> None:
        """Name what the checkpoint holds, once, after :meth:`start`: ``model`` and the other
        ``objects`` (optimizers, scheduler, scaler; None for one the run does not use) by
        their ``state_dict`` under their keyword, and ``extra``, the stage's own counters with
        their initial values (``{"best_top1": -1.0}``), saved as they are. With ``--resume``
        all of it is restored here from the checkpoint: the states, the values of ``extra``'s
        keys, the history, the global step and every RNG. Run adds :data:`RUN_KEYS` itself.
        Raises :class:`RunOrderError` when called before :meth:`start`, twice, or with a key
        that two of these share."""
        if self._tracked is not None:
            raise RunOrderError("Run.track() called twice: a run names its checkpoint once")
        if self.logger is None:
            raise RunOrderError("Run.track() called before Run.start()")
        objects = {"model": model, **{k: v for k, v in objects.items() if v is not None}}
        extra = dict(extra or {})
        keys, own = set(objects), set(RUN_KEYS)
        clash = sorted((keys & own) | (set(extra) & (keys | own)))
        if clash:
            raise RunOrderError(
                f"Run.track(): the checkpoint key(s) {', '.join(clash)} would be written twice"
            )
        upgrade = getattr(model, "upgrade_checkpoint", None)
        if self.resumed is not None and upgrade is not None:
            self.resumed = upgrade(self.resumed)  # a checkpoint of an older layout, converted
        if self.resumed is not None:
            for key, obj in objects.items():
                obj.load_state_dict(self.resumed[key])
            set_rng_state(self.resumed["rng"], self.data_gen)
            self.history = self.resumed["history"]
            self.global_step = self.resumed["global_step"]
            extra = {k: self.resumed[k] for k in extra}
            self.logger.info(
                f"Resumed from {self.path(CHECKPOINT)} after epoch {self.resumed['epoch']}"
            )
        self._tracked, self._extra = objects, extra
        if self.is_main:
            from tensorboardX import SummaryWriter  # a heavy import, only needed by a run

            # purge_step drops what an interrupted run logged after its last checkpoint.
            purge = self.global_step + 1 if self.resumed is not None else None
            self.writer = SummaryWriter(log_dir=self.path("tb"), purge_step=purge)
        else:
            self.writer = NullWriter()

    def _checked_tracked(self, what: str) -> dict[str, Any]:
        if self._tracked is None:
            raise RunOrderError(
                f"{what} before Run.track(model=..., extra=...): nothing is tracked yet, and a "
                f"resumed run has not restored its state"
            )
        return self._tracked

    @property
    def model(self) -> nn.Module:
        """The model given to :meth:`track` (not wrapped in DDP)."""
        return self._checked_tracked("Run.model read")["model"]

    @property
    def extra(self) -> dict[str, Any]:
        """The stage's counters saved with every checkpoint (:meth:`track`'s ``extra``, restored
        on --resume); update its values in place. A key added later is saved too, but only
        ``extra``'s keys are restored: the stage reads any other in :attr:`resumed`."""
        self._checked_tracked("Run.extra read")
        assert self._extra is not None
        return self._extra

    @extra.setter
    def extra(self, value: dict[str, Any]) -> None:
        raise RunOrderError(
            "Run.extra assigned: give the counters to Run.track(extra={...}), which restores "
            "them on --resume, and update their values in place"
        )

    def epochs(self) -> Iterator[int]:
        """The epochs still to run (1-based), timing each."""
        self._checked_tracked("Run.epochs()")
        start = self.resumed["epoch"] + 1 if self.resumed is not None else 1
        for epoch in range(start, self.cfg.epochs + 1):
            self._epoch_t0 = time.time()
            yield epoch

    def end_epoch(
        self,
        record: dict[str, Any],
        detail: dict[str, Any] | None = None,
        is_best: bool = False,
        write_files: Callable[[], None] | None = None,
    ) -> None:
        """Close an epoch: ``record`` (the epoch's numbers; ``epoch`` first) goes to tensorboard,
        the history and metrics.jsonl, ``detail`` (bulky per-epoch values such as the alphas)
        to the history only. Then the checkpoint (and ``best.pth.tar`` when ``is_best``) and
        ``write_files()``, all rebuilt from the history, so a resumed run has every epoch once.
        """
        tracked = self._checked_tracked("Run.end_epoch()")
        epoch = record["epoch"]
        record["time"] = time.time() - self._epoch_t0
        for k, v in record.items():
            if k != "epoch" and isinstance(v, (int, float)):
                self.writer.add_scalar(k.replace("_", "/", 1), v, epoch)
        detail = detail or {}
        self.history.append({**record, **detail})
        if not self.is_main:
            return
        state = {key: obj.state_dict() for key, obj in tracked.items()}
        state.update(
            epoch=epoch,
            global_step=self.global_step,
            history=self.history,
            config=self.cfg.to_dict(),
            rng=rng_state(self.data_gen),
            **self.extra,
        )
        save_checkpoint(state, self.path(CHECKPOINT))
        if is_best:
            save_checkpoint(state, self.path("best.pth.tar"))
        t_files = time.time()
        rows = [{k: v for k, v in h.items() if k not in detail} for h in self.history]
        write_jsonl(self.path("metrics.jsonl"), rows)
        if write_files is not None:
            write_files()
        self.logger.info(
            f"Epoch {epoch} done in {time.time() - self._epoch_t0:.1f}s "
            f"(files and plots {time.time() - t_files:.1f}s)"
        )

    def __enter__(self) -> Run:
        return self

    def __exit__(self, *exc: Any) -> None:
        """Close the writer and the log, release the run folder's lock (the process ending
        would release it too)."""
        if self.writer is not None:
            self.writer.close()
        if self.logger is not None:
            for h in list(self.logger.handlers):
                self.logger.removeHandler(h)
                h.close()
        if self.lock is not None:
            self.lock.release()

    def check_replicas(self, what: str) -> None:
        """Under DDP, log whether the replicas ended identical. ``what`` names what must be
        identical ("weights, alphas and BN statistics")."""
        if self.dist.enabled:
            same = distributed.replicas_identical(self.model)
            self.logger.info(
                f"DDP: {what} are {'identical' if same else 'DIFFERENT'} on the "
                f"{self.dist.world_size} processes"
            )


# --------------------------------------------------------------------------------------------
# The loops
# --------------------------------------------------------------------------------------------
StepFn = Callable[[Any], tuple[torch.Tensor, torch.Tensor, torch.Tensor]]

# StepMeters.window's slots: sums over the window's samples, and the count of steps whose loss
# was not finite. The sample count is known on the host.
_LOSS, _TOP1, _TOP5, _NONFINITE = range(4)


class StepMeters:
    """Training loss, top-1 and top-5 of the steps, kept on the device between reads.

    A step only adds to :attr:`window` (a float64 device tensor, see the slots above): no
    ``.item()``, ``float()`` or tensor ``if``, so the host never waits for the device inside
    a step (STYLE.md, item 16). :meth:`read` brings the window to the host in one copy, summed
    over the DDP processes (the non-finite count with it, so that every process sees the same
    count and all stop at the same read), adds it to the epoch's totals and starts a new window.
    """

    def __init__(self, device: torch.device) -> None:
        self.window = torch.zeros(4, dtype=torch.float64, device=device)
        self.window_count = 0  # samples in the window (host)
        self.loss = self.top1 = self.top5 = self.count = 0.0  # the epoch's sums, on the host

    def update(self, loss: torch.Tensor, logits: torch.Tensor, y: torch.Tensor) -> None:
        """Add a step: ``loss`` (0-d, the batch mean), ``logits`` (N, n_classes), ``y`` (N,)."""
        n = y.size(0)
        maxk = min(5, logits.size(1))  # k larger than the class count counts every sample
        # (N, maxk): at most one hit per row, the top-k indices being distinct.
        hits = logits.detach().topk(maxk, dim=1).indices.eq(y.view(-1, 1))
        loss = loss.detach().double()
        nonfinite = torch.isfinite(loss).logical_not().double()
        self.window += torch.stack(
            [loss * n, hits[:, 0].sum().double(), hits.sum().double(), nonfinite]
        )
        self.window_count += n

    def read(self) -> dict[str, float]:
        """The window's sums (over all processes), added to the epoch's; the window restarts.
        Returns the window's mean ``loss``, its sample ``count`` and ``nonfinite`` steps."""
        values = distributed.all_reduce_sum(
            [*self.window.tolist(), float(self.window_count)], self.window.device
        )
        self.window.zero_()
        self.window_count = 0
        count = values[-1]
        self.loss += values[_LOSS]
        self.top1 += values[_TOP1]
        self.top5 += values[_TOP5]
        self.count += count
        return {
            "loss": values[_LOSS] / max(count, 1.0),
            "count": count,
            "nonfinite": values[_NONFINITE],
        }

    def summary(self) -> dict[str, float]:
        """The epoch's means so far (the steps read)."""
        n = max(self.count, 1.0)
        return {"loss": self.loss / n, "top1": self.top1 / n, "top5": self.top5 / n}

    def __str__(self) -> str:
        m = self.summary()
        return f"loss {m['loss']:.3f} top1 {m['top1']:.2%} top5 {m['top5']:.2%}"


def train_one_epoch(run: Run, step: StepFn, loader: Any, epoch: int) -> dict[str, float]:
    """One epoch of ``step(batch) -> (loss, logits, target)`` over ``loader``, batches on the
    run's device. The metrics stay on the device (:class:`StepMeters`) and are read every
    ``print_freq`` steps and at the epoch's end: the log line, the progress bar, the training
    loss to tensorboard (the window's mean, at the global step of the read), and the check
    that every loss of the window was finite, which stops the run with
    :class:`NonFiniteLossError` naming the window's steps, before any checkpoint is written.
    At the end every process holds the first process's BN statistics
    (:func:`distributed.broadcast_buffers`), so evaluations and the checkpoint see one network.
    Returns the epoch's loss, top1 and top5 (under DDP, over every process's samples)."""
    cfg = run.cfg
    run.model.train()
    meters = StepMeters(run.device)
    n_steps = len(loader)
    steps = progress(_batches(loader), n_steps, f"Epoch {epoch}", not cfg.no_progress)
    first = 0  # the first step of the window
    for i, batch in enumerate(steps):
        loss, logits, target = step(_to(batch, run.device))
        meters.update(loss, logits, target)
        run.global_step += 1
        if i % cfg.print_freq == 0 or i == n_steps - 1:
            window = meters.read()
            if window["nonfinite"]:
                where = f"step {i}" if first == i else f"steps {first}-{i}"
                raise NonFiniteLossError(
                    f"non-finite training loss in {where} of epoch {epoch}; the last good "
                    f"checkpoint is {last_checkpoint(run.dir)}"
                )
            first = i + 1
            run.writer.add_scalar("train/loss", window["loss"], run.global_step)
            if hasattr(steps, "set_postfix"):
                m = meters.summary()
                steps.set_postfix(loss=f"{m['loss']:.3f}", top1=f"{m['top1']:.1%}")
            run.logger.info(
                f"Train: [{epoch:3d}/{cfg.epochs}] step {i:03d}/{n_steps - 1:03d} {meters}"
            )
    distributed.broadcast_buffers(distributed.unwrap(run.model))
    return meters.summary()


@torch.no_grad()
def evaluate(
    model: nn.Module,
    loader: Iterable,
    device: torch.device,
    criterion: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    amp_dtype: torch.dtype | None = None,
) -> dict[str, float]:
    """Loss, top-1 and top-5 of ``model`` over ``loader`` in eval mode (the forward under
    autocast to ``amp_dtype`` if given); under DDP the sums of every process's shard, so each
    image counts once."""
    was_training = model.training
    model.eval()
    meters = Meters()
    for X, y in _batches(loader):
        X, y = _to(X, device), _to(y, device)
        with torch.autocast(device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
            out = model(X)
        logits = (out[0] if isinstance(out, tuple) else out).float()
        meters.update(criterion(logits, y), logits, y)
    model.train(was_training)
    loss, top1, top5, n = distributed.all_reduce_sum(
        [meters.loss.sum, meters.top1.sum, meters.top5.sum, float(meters.loss.count)], device
    )
    return {"loss": loss / n, "top1": top1 / n, "top5": top5 / n, "count": n}


def log_skipped_files(run: Run, *data: Any) -> None:
    """Log how many image files the datasets (or the loaders') skipped so far, if any
    (preproc.ImageFolderDataset: files that are not images, files that cannot be decoded)."""
    from preproc import skipped_files

    for d in data:
        if d is None:
            continue
        rejected, unreadable = skipped_files(getattr(d, "dataset", d))
        if rejected or unreadable:
            run.logger.warning(
                f"WARNING: image files skipped so far: {rejected} not images, {unreadable} "
                f"unreadable reads (each file is named on stderr)"
            )


def log_eval(run: Run, split: str, epoch: int, result: dict[str, float], note: str = "") -> None:
    """One log line for an evaluation: ``<split>: [epoch/epochs] loss .. top1 .. top5 ..``."""
    run.logger.info(
        f"{split}: [{epoch:3d}/{run.cfg.epochs}] loss {result['loss']:.3f} "
        f"top1 {result['top1']:.2%} top5 {result['top5']:.2%}{note}"
    )


# --------------------------------------------------------------------------------------------
# The command-line frame
# --------------------------------------------------------------------------------------------
# torch's words for a loader worker that ended without a word (SIGKILL, a crash)
_LOADER_WORKER_DIED = re.compile(r"DataLoader worker \(pids?")


def end_loader_workers() -> None:
    """Kill this process's data-loader workers (daemonic children) that are still alive. They
    ignore SIGTERM (:func:`checkpoint.ignore_stop_signals`), so on an error that leaves their
    iterator behind, Python's exit, which terminates its daemonic children with SIGTERM and
    then joins them, would wait for them forever. torch's SIGCHLD handler, which raises when
    one of its workers ends, is set aside meanwhile."""
    workers = [p for p in multiprocessing.active_children() if p.daemon]
    if not workers:
        return
    main = threading.current_thread() is threading.main_thread()
    old = signal.signal(signal.SIGCHLD, signal.SIG_DFL) if main else None
    try:
        for p in workers:
            p.kill()
            p.join(5.0)
    finally:
        if main:
            signal.signal(signal.SIGCHLD, old)


def script_main(
    script: str,
    run_root: str,
    argv: list[str] | None,
    prepare: Callable[[list[str]], tuple[Any, Callable[[], Any]]],
) -> int:
    """The command-line frame of search.py and augment.py: ``prepare(argv)`` parses and checks
    the input and returns the config and the job. Bad input (any :class:`utils.UserError`): one
    line, exit status 2. Several GPUs: one process each. SIGTERM / Ctrl-C: one line saying how
    to resume, exit status 128 + signal."""
    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError

    name = os.path.basename(script)
    argv = sys.argv[1:] if argv is None else argv
    cfg: Any = None
    try:
        cfg, job = prepare(argv)
        with interruptible():
            if not distributed.self_launch(script, argv, cfg.device, cfg.gpu_ids()):
                job()
    except UserError as e:
        # A non-finite loss stops every DDP process at the same read, with the same message:
        # the first process says it.
        if not isinstance(e, NonFiniteLossError) or os.environ.get("RANK", "0") == "0":
            print(f"{name}: error: {e}", file=sys.stderr)
        return 2
    except (Interrupted, SignalException) as e:
        signum = e.signum if isinstance(e, Interrupted) else int(e.sigval)
        # One line per run: from the launcher, or from the first process of torchrun.
        if not distributed.launched_by_self() and os.environ.get("RANK", "0") == "0":
            hint = resume_hint(name, os.path.join(run_root, cfg.name), argv)
            print(f"{name}: interrupted by {Interrupted(signum)}: {hint}", file=sys.stderr)
        return 128 + signum
    except ChildFailedError as e:  # the failing process has printed its own error
        if all(f.exitcode == 2 for f in e.failures.values()):
            return 2  # bad input or a non-finite loss, said in one line by a process
        print(f"{name}: error: a worker process failed ({type(e).__name__})", file=sys.stderr)
        return 1
    except RuntimeError as e:
        end_loader_workers()
        if cfg is None or not _LOADER_WORKER_DIED.match(str(e)):
            raise
        # Killed (out of memory?) or crashed: the epoch is lost, its checkpoint is not.
        hint = resume_hint(name, os.path.join(run_root, cfg.name), argv)
        died = " ".join(str(e).split())
        print(f"{name}: error: a data-loader worker died ({died}); {hint}", file=sys.stderr)
        return 1
    except BaseException:  # a bug: its traceback follows, and the process must still end
        end_loader_workers()
        raise
    finally:
        distributed.cleanup_distributed()
    return 0
