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

This file holds the settings, the stages and the command line. Its two parts, next to it:
protocol_exec.py runs the runs (processes on this machine, or submitit jobs), and
protocol_report.py writes the report.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import shutil
import sys
import time
from dataclasses import dataclass, field
from typing import Any, NoReturn

HERE = os.path.dirname(os.path.abspath(__file__))
if HERE not in sys.path:  # its parts, also when this file is imported by path (the tests)
    sys.path.insert(0, HERE)
from protocol_exec import Job, exit_status, run_local, run_submitit, wait_for_run  # noqa: E402
from protocol_report import summary, write_report, write_text  # noqa: E402

ROOT = os.path.dirname(HERE)
SELECT_SEED = 1  # every selection run: the same held-out split, the same initial weights' stream
PAPER = {("cifar10", False): "2.76 ± 0.09", ("cifar10", True): "3.00 ± 0.14"}  # test error, %
# Compared on --resume (the other flags may change: they do not change what is computed).
SETTINGS = tuple("dataset searches select_epochs select_val_portion final_runs".split())
SETTINGS += ("search_args", "augment_args")
SET_BY_PROTOCOL = tuple("name dataset seed resume data_path genotype val_portion no_test".split())
STAGES = ("search", "select", "final")


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
            codes = self.execute(todo)
        finally:
            self.wall[stage] = self.wall.get(stage, 0.0) + time.time() - t0
        rows = [self.read(job, codes.get(job.name)) for job in jobs]
        self.run_s[stage] = sum(row.pop("run_s", 0.0) for row in rows)
        return rows

    def execute(self, jobs: list[Job]) -> dict[str, int | str]:
        """Run ``jobs`` with the executor of --executor; every run's exit status (protocol_exec)."""
        a = self.args
        if a.executor == "local":
            return run_local(jobs, self.command, self.root, self.gpus)
        return run_submitit(
            jobs,
            self.command,
            self.root,
            slurm=a.executor == "slurm",
            prefix=a.name,
            time_min=a.time_min,
            gpus_per_run=a.gpus_per_run,
            cpus_per_run=a.cpus_per_run,
            partition=a.partition,
        )

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
            why = exit_status(code) if code is not None else "not finished"
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
        write_text(os.path.join(root, "protocol.json"), json.dumps(kept, indent=2) + "\n")
        wall = {}
        if os.path.exists(os.path.join(root, "time.json")):
            with open(os.path.join(root, "time.json")) as f:
                wall = json.load(f)
        protocol = Protocol(args, root, gpus, wall)
        try:
            with interruptible():
                rep = protocol.run(first_order)
        finally:
            write_text(os.path.join(root, "time.json"), json.dumps(protocol.wall) + "\n")
        write_report(root, rep, SELECT_SEED)
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
