"""The paper's protocol in one command (DARTS.md, section 8): K searches, the selection of their
cells on a split held out of the training set, N final runs of the picked cell, mean ± std.

    python scripts/protocol.py --name c10 --dataset cifar10 --searches 4 --select_epochs 100 \
        --final_runs 10                                  # after an interruption: same + --resume
    python scripts/protocol.py ... --gpus 0,1,2,3        # one run per GPU at a time
    python scripts/protocol.py ... --executor slurm --partition gpu   # one SLURM job per run

The protocol decides what runs next and reads what finished. Each run is an ordinary search.py
or augment.py process (a submitit job on SLURM) started in protocols/<name>/, so its folder is
where the script always puts it:

    protocol.json                 the settings (--resume refuses others)
    searchs/search-<k>/           search k, seed k (k = 1..K)
    augments/select-s<k>/         the selection run of the genotype first found by search k:
                                  seed 1, --val_portion, --no_test (the test set is never opened)
    augments/final-s<k>-<i>/      final run i of that genotype, seed i (i = 1..N)
    logs/<run>.out                each run's stdout and stderr
    report.md, report.json, report.png, normal.png, reduce.png (the picked cell), time.json

The run folders are the state: --resume skips finished runs, resumes the others from their
checkpoints and starts the missing ones, so an interrupted protocol ends with the same report.
"""

from __future__ import annotations

import argparse
import json
import os
import queue
import shlex
import shutil
import signal
import statistics
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor, wait
from dataclasses import dataclass, field
from typing import Any, NoReturn

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SELECT_SEED = 1  # every selection run: the same held-out split, the same initial weights' stream
PAPER = {("cifar10", False): "2.76 ± 0.09", ("cifar10", True): "3.00 ± 0.14"}  # test error, %
# Compared on --resume (the other flags may change: they do not change what is computed).
SETTINGS = tuple("dataset searches select_epochs select_val_portion final_runs".split())
SETTINGS += ("search_args", "augment_args")
SET_BY_PROTOCOL = tuple("name dataset seed resume data_path genotype val_portion no_test".split())
STAGES = ("search", "select", "final")


# --------------------------------------------------------------------------------------------
# A run: a command, its folder, its log. start_command and run_command use the standard library
# only: submitit pickles run_command into each job.
# --------------------------------------------------------------------------------------------
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


def _status(code: int | str | None) -> str:
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


# --------------------------------------------------------------------------------------------
# Settings: bad input stops before anything is written, with one line
# --------------------------------------------------------------------------------------------
def _one_line(message: str) -> NoReturn:
    from utils import ConfigError

    raise ConfigError(message)


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter
    )
    p.error = _one_line  # type: ignore[method-assign]
    add = p.add_argument
    add("--name", required=True, help="the protocol's folder: protocols/<name>/")
    add("--dataset", required=True, help="the data set of every run")
    add("--searches", type=int, default=4, help="K: searches, seeds 1..K (4)")
    add("--select_epochs", type=int, default=100, help="epochs of a selection run (100)")
    add("--select_val_portion", type=float, default=0.1, help="held-out split (0.1)")
    add("--final_runs", type=int, default=10, help="N: final runs, seeds 1..N (10)")
    add(
        "--search_args",
        default="",
        help="more search.py flags, one string (a single flag:\n--search_args=--first_order)",
    )
    add("--augment_args", default="", help="more augment.py flags (selection and final runs)")
    add("--data_path", default="./data/", help="where the data set lives (./data/)")
    add("--resume", action="store_true", help="continue protocols/<name>/")
    add(
        "--executor",
        default="local",
        choices=("local", "slurm", "submitit_local"),
        help="local: processes on this machine (default); slurm: a job per run (submitit);\n"
        "submitit_local: submitit's local executor, the SLURM code path on this machine",
    )
    add("--gpus", default="", help="local: one run per listed GPU at a time (0,1,2,3 | all)")
    add("--partition", default="", help="slurm: the partition")
    add("--time_min", type=int, default=4320, help="slurm: the time limit of a job, minutes")
    add("--gpus_per_run", type=int, default=1, help="slurm: GPUs of a job (> 1: DDP, 0: CPU)")
    add("--cpus_per_run", type=int, default=8, help="slurm: CPUs of a job")
    return p


def select_flags(args: argparse.Namespace) -> list[str]:
    """What makes an augment run a selection run."""
    e, p = args.select_epochs, args.select_val_portion
    return f"--epochs {e} --val_portion {p} --no_test --seed {SELECT_SEED}".split()


def script_config(cls: Any, what: str, base: list[str], args: list[str], more: list[str]) -> Any:
    """The config the script builds from ``base + args + more``; a ConfigError naming ``what``
    if it cannot work or if ``args`` set what the protocol sets."""
    from utils import ConfigError

    p = cls.parser("")
    p.error = lambda message: _one_line(f"{what}: {message}")
    # The flags ``args`` give, whatever their values and spelling (--name x, --name=x, and the
    # prefixes argparse takes, --nam x): parsed without defaults, the namespace holds only them.
    flags = cls.parser("")
    flags.error = p.error
    for action in flags._actions:
        action.default, action.required = argparse.SUPPRESS, False
    given = vars(flags.parse_known_args(args)[0])
    for key in SET_BY_PROTOCOL:
        if key in given:
            raise ConfigError(f"{what} may not set --{key}: the protocol sets it")
    cfg = cls(**vars(p.parse_args(base + args + more)))
    try:
        cfg.check()
    except ConfigError as e:
        raise ConfigError(f"{what}: {e}") from None
    return cfg


def check(args: argparse.Namespace) -> tuple[bool, list[str]]:
    """Checks the settings; returns (whether the search is first order, the GPU ids)."""
    from config import AugmentConfig, SearchConfig
    from utils import ConfigError

    try:
        args.search_args = shlex.split(args.search_args)
        args.augment_args = shlex.split(args.augment_args)
    except ValueError as e:
        raise ConfigError(f"--search_args / --augment_args: {e}") from None
    if not args.name or os.sep in args.name or args.name in (".", ".."):
        raise ConfigError(f"--name must be a plain folder name, got {args.name!r}")
    for key in ("searches", "select_epochs", "final_runs", "time_min", "cpus_per_run"):
        if getattr(args, key) < 1:
            raise ConfigError(f"--{key} must be positive, got {getattr(args, key)}")
    if args.gpus_per_run < 0:
        raise ConfigError(f"--gpus_per_run must be >= 0, got {args.gpus_per_run}")
    if not 0.0 < args.select_val_portion < 1.0:
        raise ConfigError(f"--select_val_portion must be in (0, 1), got {args.select_val_portion}")
    base = ["--name", "x", "--dataset", args.dataset]
    search = script_config(SearchConfig, "--search_args", base, args.search_args, [])
    base += ["--genotype", "DARTS_V2"]
    script_config(AugmentConfig, "--augment_args", base, args.augment_args, [])
    script_config(AugmentConfig, "selection runs", base, args.augment_args, select_flags(args))
    gpus = [g.strip() for g in args.gpus.split(",")] if args.gpus else []
    if args.gpus == "all":
        import torch

        gpus = [str(i) for i in range(torch.cuda.device_count())] or _one_line("--gpus all: no GPU")
    if any(not g.isdigit() for g in gpus) or len(set(gpus)) != len(gpus):
        raise ConfigError(f"--gpus must be distinct GPU ids (0,1,2,3) or all, got {args.gpus!r}")
    if gpus and args.executor != "local":
        raise ConfigError("--gpus is for --executor local; a SLURM job gets --gpus_per_run GPUs")
    if args.executor == "slurm" and shutil.which("sbatch") is None:
        raise ConfigError("--executor slurm: no sbatch here (submitit_local tries it locally)")
    return search.first_order, gpus


def check_settings(root: str, args: argparse.Namespace) -> dict[str, Any]:
    """The settings to keep in protocol.json; with --resume, the ones kept there."""
    from checkpoint import changed_setting
    from utils import ConfigError

    path = os.path.join(root, "protocol.json")
    wanted = {k: getattr(args, k) for k in SETTINGS}
    if not args.resume:
        if os.path.exists(path):
            raise ConfigError(
                f"{root} already holds a protocol: add --resume to continue it, "
                f"or choose a new --name"
            )
        return wanted
    if not os.path.exists(path):
        raise ConfigError(f"--resume: there is no protocol to resume at {path}")
    with open(path) as f:
        saved = json.load(f)
    show = lambda v: repr(shlex.join(v)) if isinstance(v, list) else v  # noqa: E731
    k = changed_setting(saved, wanted)
    if k is not None:
        raise ConfigError(
            f"{root} was made with --{k} {show(saved.get(k))}, this run asks "
            f"for --{k} {show(wanted.get(k))}: resume with the protocol's settings"
        )
    return wanted


# --------------------------------------------------------------------------------------------
# The protocol
# --------------------------------------------------------------------------------------------
@dataclass
class Protocol:
    args: argparse.Namespace
    root: str
    gpus: list[str]
    wall: dict[str, float]  # wall time of each stage, summed over the invocations (time.json)
    run_s: dict[str, float] = field(default_factory=dict)  # the stage's runs' epoch times

    def path(self, *parts: str) -> str:
        return os.path.join(self.root, *parts)

    def checkpoint(self, job: Job) -> tuple[bool, dict[str, Any] | None]:
        """(finished, its checkpoint or None), from the run's folder alone."""
        from checkpoint import CHECKPOINT, load_checkpoint
        from utils import UserError

        if not os.path.exists(self.path(job.folder, CHECKPOINT)):
            return False, None
        try:
            ckpt = load_checkpoint(self.path(job.folder, CHECKPOINT))
        except UserError:  # the run, resumed, will say what is wrong with it
            return False, None
        done = ckpt["epoch"] >= ckpt["config"]["epochs"]
        if job.script == "search":
            done = done and os.path.exists(self.path(job.folder, "genotype.txt"))
        return done, ckpt

    def command(self, job: Job) -> list[str]:
        cmd = [sys.executable, os.path.join(ROOT, job.script + ".py"), "--name", job.name]
        cmd += ["--dataset", self.args.dataset, "--data_path", os.path.abspath(self.args.data_path)]
        cmd += job.args
        if self.args.executor != "local" and self.args.gpus_per_run > 1:
            cmd += ["--gpus", "all"]  # DDP over the job's GPUs
        resume = os.path.exists(self.path(job.folder, "checkpoint.pth.tar"))  # else: afresh
        return cmd + (["--resume"] if resume else [])

    def stage(self, stage: str, jobs: list[Job]) -> list[dict[str, Any]]:
        """Run what is not finished of ``jobs``, then read every one: its report row."""
        print(f"--- {stage}: {len(jobs)} runs", flush=True)
        t0, todo = time.time(), []
        try:
            for job in jobs:
                wait_for_run(self.path(job.folder))
                if self.checkpoint(job)[0]:
                    print(f"{job.name}: finished before", flush=True)
                else:
                    todo.append(job)
            os.makedirs(self.path("logs"), exist_ok=True)
            local = self.args.executor == "local"
            codes = self.run_processes(todo) if local else self.run_jobs(todo)
        finally:
            self.wall[stage] = self.wall.get(stage, 0.0) + time.time() - t0
        rows = [self.read(job, codes.get(job.name)) for job in jobs]
        self.run_s[stage] = sum(row.pop("run_s", 0.0) for row in rows)
        return rows

    def read(self, job: Job, code: int | str | None) -> dict[str, Any]:
        """A run's report row: its result (``job.result``) or why there is none."""
        import genotypes as gt

        row: dict[str, Any] = {"run": job.name, **job.info, "ok": False, "log": job.log}
        done, ckpt = self.checkpoint(job)
        if not done or ckpt is None:
            lines = []
            if os.path.exists(self.path(job.log)):
                with open(self.path(job.log), errors="replace") as f:
                    lines = [ln.strip() for ln in f if ln.strip() and not ln.startswith("===")]
            why = _status(code) if code is not None else "not finished"
            last = f": {lines[-1][:300]}" if lines else ""  # the run's own one-line error
            return {**row, "error": f"failed ({why}){last}; see {job.log}"}
        row["run_s"] = sum(h.get("time", 0.0) for h in ckpt["history"])
        if job.script == "augment":
            return {**row, "ok": True, job.result: ckpt["history"][-1][job.result]}
        try:  # a malformed genotype.txt fails here, not in every run that would read it
            genotype = gt.to_str(gt.load(self.path(job.folder, "genotype.txt")))
        except gt.GenotypeError as e:
            why = str(e).replace(self.root + os.sep, "")  # the same report in any folder
            return {**row, "error": f"unreadable genotype: {why}"}
        return {**row, "ok": True, "genotype": genotype}

    def run_processes(self, jobs: list[Job]) -> dict[str, int | str]:
        """One run at a time, or one per GPU of --gpus (pinned with CUDA_VISIBLE_DEVICES)."""
        slots: queue.Queue[str | None] = queue.Queue()
        for gpu in self.gpus or [None]:  # type: ignore[list-item]
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
                    proc = start_command(self.command(job), self.root, job.log, env)
                    live.add(proc)
                code = proc.wait()
                print(f"{job.name}: ended, {_status(code)}", flush=True)
                return code
            finally:
                slots.put(gpu)

        with ThreadPoolExecutor(max(1, len(self.gpus))) as pool:
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

    def run_jobs(self, jobs: list[Job]) -> dict[str, int | str]:
        """SLURM, or submitit's local executor: one job per run, a stage's jobs all at once."""
        import cloudpickle
        import submitit

        if __name__ != "__main__":  # imported: pickle run_command by value, not by module name
            cloudpickle.register_pickle_by_value(sys.modules[__name__])
        slurm = self.args.executor == "slurm"
        ex = submitit.AutoExecutor(self.path("submitit"), cluster="slurm" if slurm else "local")
        ex.update_parameters(timeout_min=self.args.time_min, gpus_per_node=self.args.gpus_per_run)
        if slurm:
            ex.update_parameters(cpus_per_task=self.args.cpus_per_run, tasks_per_node=1)
            if self.args.partition:
                ex.update_parameters(slurm_partition=self.args.partition)
        submitted: dict[str, Any] = {}
        codes: dict[str, int | str] = {}
        try:
            for job in jobs:
                ex.update_parameters(name=f"{self.args.name}-{job.name}")
                submitted[job.name] = ex.submit(run_command, self.command(job), self.root, job.log)
                print(f"{job.name}: submitted as job {submitted[job.name].job_id}", flush=True)
            for name, sub in submitted.items():
                try:
                    codes[name] = sub.result()
                except Exception as e:  # the job failed around the run (time limit, node, ...)
                    codes[name] = f"job {sub.job_id}: {(str(e).strip() or repr(e)).splitlines()[0]}"
                print(f"{name}: ended, {_status(codes[name])}", flush=True)
        except BaseException:
            for sub in submitted.values():
                sub.cancel(check=False)
            raise
        return codes

    def run(self, first_order: bool) -> dict[str, Any]:
        """The stages; returns the report."""
        a = self.args
        searches = self.stage("search", [self.search(k) for k in range(1, a.searches + 1)])
        groups: dict[str, list[int]] = {}  # a genotype: the seeds of the searches that found it
        for r in searches:
            if r["ok"]:
                groups.setdefault(r["genotype"], []).append(r["seed"])
        selection = self.stage("select", [self.select(g, ks) for g, ks in groups.items()])
        for r in searches:  # each search's selection run and accuracy
            s = next((s for s in selection if s["genotype"] == r.get("genotype")), {})
            r.update(selection=s.get("run"), val_top1=s.get("val_top1"))
        scored = [s for s in selection if s["ok"]]
        best = max(scored, key=lambda s: (s["val_top1"], -s["searches"][0]), default=None)
        picked, final = None, []
        if best is not None:
            picked = {k: best[k] for k in ("run", "searches", "genotype", "val_top1")}
            ties = [s["run"] for s in scored if s["val_top1"] == best["val_top1"]]
            picked.update(tied_with=ties[1:], among=f"{len(scored)} of {len(selection)} candidates")
            finals = [self.final(best, i) for i in range(1, a.final_runs + 1)]
            final = self.stage("final", finals)
        for r in final:
            r["test_error"] = 100.0 * (1.0 - r["test_top1"]) if r["ok"] else None
        errors = [r["test_error"] for r in final if r["ok"]]
        paper = PAPER.get((a.dataset, first_order))
        return {
            "protocol": {"name": a.name, **{k: getattr(a, k) for k in SETTINGS}},
            "searches": searches,
            "selection": selection,
            "picked": picked,
            "final": final,
            "summary": summary(errors, a.final_runs, paper, a.dataset),
            "time": {
                st: {"wall_s": self.wall.get(st, 0.0), "runs_s": self.run_s.get(st, 0.0)}
                for st in STAGES
            },
        }

    def search(self, k: int) -> Job:
        args = [*self.args.search_args, "--seed", str(k)]
        return Job(f"search-{k}", "search", args, "genotype", {"seed": k})

    def select(self, genotype: str, seeds: list[int]) -> Job:
        args = [*self.args.augment_args, "--genotype", genotype, *select_flags(self.args)]
        info = {"searches": seeds, "genotype": genotype}
        return Job(f"select-s{seeds[0]}", "augment", args, "val_top1", info)

    def final(self, picked: dict[str, Any], i: int) -> Job:
        args = [*self.args.augment_args, "--genotype", picked["genotype"], "--seed", str(i)]
        return Job(f"final-s{picked['searches'][0]}-{i}", "augment", args, "test_top1", {"seed": i})


def summary(errors: list[float], n_runs: int, paper: str | None, dataset: str) -> dict[str, Any]:
    """Mean and sample std (n - 1) of the final runs' test errors, and the line that says it."""
    n = len(errors)
    mean = statistics.mean(errors) if n else None
    std = statistics.stdev(errors) if n > 1 else None
    ref = f"paper: {paper}" if paper else f"no paper figure for {dataset}"
    if n == 0:
        line = f"Test error: no final run finished, 0 of {n_runs} ({ref})"
    elif n == 1:
        line = f"Test error = {mean:.2f} % over 1 run, std undefined with one run ({ref})"
    else:
        line = f"Test error = {mean:.2f} ± {std:.2f} % over {n} runs ({ref})"
    if 0 < n < n_runs:
        line += f" -- PARTIAL: {n_runs - n} of the {n_runs} final runs failed"
    result = {"n": n, "n_runs": n_runs, "partial": n < n_runs, "mean_error": mean}
    return {**result, "std_error": std, "paper": paper, "line": line}


# --------------------------------------------------------------------------------------------
# The report
# --------------------------------------------------------------------------------------------
def _write(path: str, text: str) -> None:
    with open(path + ".tmp", "w") as f:
        f.write(text)
    os.replace(path + ".tmp", path)


def _pct(v: float | None) -> str:
    return "-" if v is None else f"{v:.2%}"


def _row(*cells: Any) -> str:
    return "| " + " | ".join(map(str, cells)) + " |"


def _table(title: str, *header: str) -> list[str]:
    return ["", f"## {title}", "", _row(*header), _row(*["---"] * len(header))]


def write_report(root: str, rep: dict[str, Any]) -> None:
    """report.json, report.md, report.png and the picked cell (normal.png, reduce.png)."""
    import genotypes as gt
    import visualize

    _write(os.path.join(root, "report.json"), json.dumps(rep, indent=2) + "\n")
    p, pick, s = rep["protocol"], rep["picked"], rep["summary"]
    seeds = lambda ks: ", ".join(f"search-{k}" for k in ks)  # noqa: E731
    failed = lambda r: f"**{r['error']}**"  # noqa: E731
    md = [
        f"# DARTS protocol `{p['name']}` on {p['dataset']}",
        "",
        f"- {p['searches']} searches (seeds 1..{p['searches']}): "
        f"`search.py {shlex.join(p['search_args'])}`",
        f"- selection: each distinct genotype trained from scratch for {p['select_epochs']} "
        f"epochs (seed {SELECT_SEED}), scored by its final top-1 on {p['select_val_portion']:g} "
        f"of the training set held out (`--no_test`: the test set is never opened); a tie goes "
        f"to the lowest search seed",
        f"- {p['final_runs']} final runs (seeds 1..{p['final_runs']}): "
        f"`augment.py {shlex.join(p['augment_args'])}`",
    ]
    md += _table("Searches", "search", "genotype", "selection run", "val top1")
    for r in rep["searches"]:
        cell = f"`{r['genotype']}`" if r["ok"] else failed(r)
        md.append(_row(r["run"], cell, r["selection"] or "-", _pct(r["val_top1"])))
    md += _table("Selection", "run", "found by", "val top1")
    for r in rep["selection"]:
        md.append(
            _row(r["run"], seeds(r["searches"]), _pct(r["val_top1"]) if r["ok"] else failed(r))
        )
    md += [""]
    for r in rep["selection"]:
        if len(r["searches"]) > 1:
            md += [
                f"{seeds(r['searches'])} found the same genotype, trained once ({r['run']}).",
                "",
            ]
    if pick is None:
        md += ["**No cell was picked: no selection run finished.**"]
    else:
        md += [
            f"**Picked:** the cell of {seeds(pick['searches'])} ({pick['run']}, val top1 "
            f"{_pct(pick['val_top1'])}, among {pick['among']}).",
            "",
            f"`{pick['genotype']}`",
            "",
        ]
        if pick["tied_with"]:
            md += [
                f"Tied with {', '.join(pick['tied_with'])}: the lowest search seed is picked.",
                "",
            ]
        if visualize.dot_available():
            visualize.plot_genotype(gt.from_str(pick["genotype"]), root)
            md += ["![normal cell](normal.png) ![reduction cell](reduce.png)"]
        else:
            md += ["(graphviz's `dot` is not installed: the cell is not drawn)"]
    md += _table("Final runs", "run", "seed", "test top1", "test error")
    for r in rep["final"]:
        cells = [_pct(r["test_top1"]), f"{r['test_error']:.2f} %"] if r["ok"] else [failed(r), ""]
        md.append(_row(r["run"], r["seed"], *cells))
    md += _table("Time", "stage", "wall time", "its runs' epoch times, summed")
    for st, t in rep["time"].items():
        md.append(_row(st, f"{t['wall_s']:.0f} s", f"{t['runs_s']:.0f} s"))
    md += ["", "Wall times add up the protocol's invocations (--resume).", ""]
    if plot(rep, os.path.join(root, "report.png")):
        md += ["![selection accuracies and final runs](report.png)", ""]
    _write(os.path.join(root, "report.md"), "\n".join([*md, s["line"]]) + "\n")


def plot(rep: dict[str, Any], out: str) -> bool:
    """The selection accuracies (the picked one in orange) and the final runs' test errors."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    sel = [r for r in rep["selection"] if r["ok"]]
    errors, s = [r["test_error"] for r in rep["final"] if r["ok"]], rep["summary"]
    if not sel:
        return False
    fig, (a, b) = plt.subplots(1, 2, figsize=(10, 4))
    colors = ["tab:orange" if r["run"] == rep["picked"]["run"] else "tab:blue" for r in sel]
    a.bar([r["run"] for r in sel], [100 * r["val_top1"] for r in sel], color=colors)
    a.set(title="Selection (orange: picked)", ylabel="val top-1 (%)")
    b.plot([0.0] * len(errors), errors, "o", alpha=0.6)
    if s["mean_error"] is not None:
        b.axhline(s["mean_error"], color="k", label=f"mean {s['mean_error']:.2f} %")
    if s["std_error"] is not None:
        m, sd = s["mean_error"], s["std_error"]
        b.axhspan(m - sd, m + sd, color="k", alpha=0.1, label=f"± std {sd:.2f}")
    b.set(title=f"Final runs ({s['n']} of {s['n_runs']})", ylabel="test error (%)", xticks=[])
    if errors:
        b.legend()
    fig.tight_layout()
    fig.savefig(out)
    plt.close(fig)
    return True


# --------------------------------------------------------------------------------------------
def main(argv: list[str] | None = None) -> int:
    if ROOT not in sys.path:  # the scripts and their modules live one folder up
        sys.path.insert(0, ROOT)
    from checkpoint import Interrupted, RunLock, interruptible
    from utils import ConfigError, UserError

    argv = sys.argv[1:] if argv is None else argv
    try:
        args = parser().parse_args(argv)
        first_order, gpus = check(args)
        root = os.path.abspath(os.path.join("protocols", args.name))
        kept = check_settings(root, args)
        try:
            os.makedirs(root, exist_ok=True)
            lock = RunLock(root)  # one protocol at a time in a folder
        except OSError as e:
            raise ConfigError(f"cannot write to {root}: {e.strerror}") from None
        _write(os.path.join(root, "protocol.json"), json.dumps(kept, indent=2) + "\n")
        wall = {}
        if os.path.exists(os.path.join(root, "time.json")):
            with open(os.path.join(root, "time.json")) as f:
                wall = json.load(f)
        protocol = Protocol(args, root, gpus, wall)
        try:
            with interruptible():
                rep = protocol.run(first_order)
        finally:
            _write(os.path.join(root, "time.json"), json.dumps(protocol.wall) + "\n")
        write_report(root, rep)
        lock.release()
    except UserError as e:
        print(f"protocol.py: error: {e}", file=sys.stderr)
        return 2
    except Interrupted as e:
        again = shlex.join(["python", "scripts/protocol.py", *(a for a in argv if a != "--resume")])
        print(
            f"protocol.py: interrupted by {e}: every run saved its last epoch; continue with: "
            f"{again} --resume",
            file=sys.stderr,
        )
        return 128 + e.signum
    failed = [r for part in ("searches", "selection", "final") for r in rep[part] if not r["ok"]]
    for r in failed:
        print(f"{r['run']}: {r['error']}", file=sys.stderr)
    print(f"Report: {os.path.relpath(os.path.join(root, 'report.md'))}")
    print(rep["summary"]["line"])
    return 1 if failed or rep["picked"] is None else 0


if __name__ == "__main__":
    sys.exit(main())
