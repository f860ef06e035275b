"""How the protocol's runs are run: its executors, apart from what it runs (DeiT keeps
``run_with_submitit.py`` apart from training the same way).

- :class:`Job`: a run, its folder and its log; :func:`wait_for_run` waits for a run that a
  killed protocol left behind.
- :func:`run_local`: processes on this machine, one at a time or one per GPU, each stopped
  with SIGTERM (it saves its epoch) when the protocol is interrupted.
- :func:`run_submitit`: one submitit job per run, on SLURM or submitit's local executor;
  interrupted, it cancels them.

Called by scripts/protocol.py (``Protocol.stage``), which decides what runs and reads what
finished. A run's command comes from the caller; each executor returns every run's exit status
(an int; a negative one is a signal, as Popen gives it) or why there is none (a string).
``start_command`` and ``run_command`` use the standard library only: submitit pickles
``run_command`` into each job.
"""

from __future__ import annotations

import os
import queue
import shlex
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor, wait
from dataclasses import dataclass, field
from typing import Any


@dataclass
class Job:
    name: str  # search-1, select-s1, final-s1-3
    script: str  # search | augment
    args: list[str]  # besides --name, --dataset, --data_path and --resume
    result: str  # what it gives the report: genotype, val_top1 (selection), test_top1 (final)
    info: dict[str, Any] = field(default_factory=dict)  # more of its report row (seed, ...)

    @property
    def folder(self) -> str:
        return os.path.join("searchs" if self.script == "search" else "augments", self.name)

    @property
    def log(self) -> str:
        return os.path.join("logs", self.name + ".out")


Command = Callable[[Job], list[str]]  # a run's command line, made when the run starts


def start_command(cmd: list[str], cwd: str, log: str, env: dict[str, str] | None = None) -> Any:
    """Start ``cmd`` in ``cwd``, stdout and stderr appended to ``log``, in a session of its own:
    a terminal's Ctrl-C reaches the protocol only, which stops its runs once."""
    with open(os.path.join(cwd, log), "a") as out:
        out.write(f"=== {time.strftime('%Y-%m-%d %H:%M:%S')}: {shlex.join(cmd)}\n")
        out.flush()
        return subprocess.Popen(
            cmd, cwd=cwd, stdout=out, stderr=subprocess.STDOUT, env=env, start_new_session=True
        )


def run_command(cmd: list[str], cwd: str, log: str) -> int:
    """A submitit job: run ``cmd``, return its exit status."""
    proc = start_command(cmd, cwd, log)
    try:
        return proc.wait()
    except BaseException:  # the job is cancelled or preempted: the run saves its epoch, stops
        proc.send_signal(signal.SIGTERM)
        proc.wait()
        raise


def exit_status(code: int | str | None) -> str:
    """What a run's exit status says, in words: "exit status 1", "killed by SIGKILL"."""
    if isinstance(code, int) and code < 0:  # Popen's way of saying "killed by a signal"
        return f"killed by {signal.Signals(-code).name}"
    return f"exit status {code}" if isinstance(code, int) else str(code)


def wait_for_run(folder: str) -> None:
    """Wait while a process holds the run folder's lock: a run that a protocol killed with
    SIGKILL left behind goes on by itself and is read when it ends."""
    from checkpoint import lock_holder

    said = False
    while (holder := lock_holder(folder)) is not None:
        if not said:
            print(f"waiting for process {holder}, which still runs {folder}", flush=True)
            said = True
        time.sleep(1.0)


def run_local(jobs: list[Job], command: Command, cwd: str, gpus: list[str]) -> dict[str, int | str]:
    """One run at a time, or one per GPU of ``gpus`` (pinned with CUDA_VISIBLE_DEVICES)."""
    slots: queue.Queue[str | None] = queue.Queue()
    for gpu in gpus or [None]:  # type: ignore[list-item]
        slots.put(gpu)
    live: set[subprocess.Popen] = set()
    lock, stopping = threading.Lock(), threading.Event()

    def one(job: Job) -> int | str:
        gpu = slots.get()
        try:
            env = None if gpu is None else {**os.environ, "CUDA_VISIBLE_DEVICES": gpu}
            with lock:
                if stopping.is_set():
                    return "not started"
                where = "" if gpu is None else f" on GPU {gpu}"
                print(f"{job.name}: started{where}", flush=True)
                proc = start_command(command(job), cwd, job.log, env)
                live.add(proc)
            code = proc.wait()
            print(f"{job.name}: ended, {exit_status(code)}", flush=True)
            return code
        finally:
            slots.put(gpu)

    with ThreadPoolExecutor(max(1, len(gpus))) as pool:
        futures = {job.name: pool.submit(one, job) for job in jobs}
        try:
            pending = set(futures.values())
            while pending:  # short waits: the main thread also takes the signals that
                pending = wait(pending, timeout=0.5).not_done  # reached a waiting thread
            return {name: f.result() for name, f in futures.items()}
        except BaseException:  # interrupted: every run saves its last epoch and stops
            with lock:
                stopping.set()
                for proc in live:
                    if proc.poll() is None:
                        proc.send_signal(signal.SIGTERM)
            raise


def run_submitit(
    jobs: list[Job],
    command: Command,
    cwd: str,
    *,
    slurm: bool,
    prefix: str,
    time_min: int,
    gpus_per_run: int,
    cpus_per_run: int,
    partition: str,
) -> dict[str, int | str]:
    """SLURM (``slurm``), or submitit's local executor: one job per run, all of ``jobs`` at once,
    named ``<prefix>-<run>``, submitit's files in ``<cwd>/submitit``. ``cpus_per_run`` and
    ``partition`` (none when empty) are for SLURM only."""
    import cloudpickle
    import submitit

    # This module is imported by name, which a job's interpreter does not know: run_command
    # (and start_command, which it calls) travel by value, not as a reference to this module.
    cloudpickle.register_pickle_by_value(sys.modules[__name__])
    ex = submitit.AutoExecutor(os.path.join(cwd, "submitit"), cluster="slurm" if slurm else "local")
    ex.update_parameters(timeout_min=time_min, gpus_per_node=gpus_per_run)
    if slurm:
        ex.update_parameters(cpus_per_task=cpus_per_run, tasks_per_node=1)
        if partition:
            ex.update_parameters(slurm_partition=partition)
    submitted: dict[str, Any] = {}
    codes: dict[str, int | str] = {}
    try:
        for job in jobs:
            ex.update_parameters(name=f"{prefix}-{job.name}")
            submitted[job.name] = ex.submit(run_command, command(job), cwd, job.log)
            print(f"{job.name}: submitted as job {submitted[job.name].job_id}", flush=True)
        for name, sub in submitted.items():
            try:
                codes[name] = sub.result()
            except Exception as e:  # the job failed around the run (time limit, node, ...)
                codes[name] = f"job {sub.job_id}: {(str(e).strip() or repr(e)).splitlines()[0]}"
            print(f"{name}: ended, {exit_status(codes[name])}", flush=True)
    except BaseException:
        for sub in submitted.values():
            sub.cancel(check=False)
        raise
    return codes
