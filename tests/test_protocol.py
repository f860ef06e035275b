"""scripts/protocol.py: the paper's protocol (DARTS.md, section 8) end to end on the digits at
tiny sizes, its resume after SIGTERM and after SIGKILL, submitit's local executor, a failed run,
the selection rules and the checks of its input."""

import argparse
import contextlib
import json
import os
import re
import shutil
import signal
import statistics
import subprocess
import sys
import time

import pytest
import torch
from conftest import ROOT, load_script

import augment
from config import METADATA_KEYS, AugmentConfig

SEARCH = "--epochs 2 --layers 3 --init_channels 4 --nodes 2 --batch_size 128 --workers 0"
SEARCH += " --first_order"
AUGMENT = "--layers 3 --init_channels 4 --batch_size 128 --workers 0 --cutout_length 4 --epochs 2"
ARGS = ["--name", "t", "--dataset", "digits", "--searches", "2", "--select_epochs", "2"]
ARGS += ["--final_runs", "2", "--search_args", SEARCH, "--augment_args", AUGMENT]
SCRIPT = os.path.join(ROOT, "scripts", "protocol.py")
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}  # two processes at a time on two cores


def load_protocol():
    return load_script("scripts/protocol.py")


def start(cwd, *extra):
    cmd = [sys.executable, SCRIPT, *ARGS, *extra]
    return subprocess.Popen(
        cmd, cwd=cwd, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )


def run(cwd, *extra):
    proc = start(cwd, *extra)
    out, err = proc.communicate(timeout=1800)  # a hang guard (~60 s for the tiny protocol)
    return proc.returncode, out, err


def report(cwd):
    with open(os.path.join(cwd, "protocols", "t", "report.json")) as f:
        return json.load(f)


def without_time(rep):
    return {k: v for k, v in rep.items() if k != "time"}


def final_line(cwd, log, what):
    """The value of the run's own ``Final <what> = ...`` line, from its log."""
    with open(os.path.join(cwd, "protocols", "t", log)) as f:
        lines = re.findall(rf"^Final {what} = (.*)$", f.read(), re.M)
    assert len(lines) == 1, lines
    return lines[0]


def wait_for(condition, what, poll=0.05):
    """Poll ``condition`` every ``poll`` seconds. A hang guard that counts polls (about 300 s
    of sleeps), not the clock: a busy machine makes each poll take longer, not the test fail."""
    for _ in range(round(300 / poll)):
        if condition():
            return
        time.sleep(poll)
    raise AssertionError(f"{what}: not there after {round(300 / poll)} polls")


def child_pid(parent, name):
    """The pid of the child process of ``parent`` whose command line holds ``name`` (Linux's
    /proc), or None."""
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{pid}/stat") as f:
                ppid = int(f.read().rsplit(")", 1)[1].split()[1])
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                args = f.read().split(b"\0")
        except (OSError, ValueError, IndexError):
            continue  # ended meanwhile
        if ppid == parent and name.encode() in args:
            return int(pid)
    return None


def sigterm_pending(pid):
    """Whether SIGTERM is pending for (stopped) process ``pid``: /proc's pending-signal masks."""
    with open(f"/proc/{pid}/status") as f:
        masks = [ln.split()[1] for ln in f if ln.startswith(("SigPnd:", "ShdPnd:"))]
    return any(int(m, 16) & (1 << (signal.SIGTERM - 1)) for m in masks)


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """One uninterrupted protocol, two runs at a time (--gpus 0,1: on a machine without CUDA,
    two CPU runs pinned to 'GPUs' that do not exist)."""
    cwd = str(tmp_path_factory.mktemp("reference"))
    code, out, err = run(cwd, "--gpus", "0,1")
    assert code == 0, out + err
    return cwd, out


@pytest.mark.slow
def test_the_report_holds_the_runs_own_numbers_and_the_best_cell(reference):
    cwd, out = reference
    rep, folder = report(cwd), os.path.join(cwd, "protocols", "t")
    assert "search-1: started on GPU 0" in out and "search-2: started on GPU 1" in out
    for r in rep["searches"]:
        assert r["ok"] and r["genotype"] == final_line(cwd, r["log"], "genotype")
    for r in rep["selection"]:
        assert r["ok"] and f"{r['val_top1']:.2%}" == final_line(cwd, r["log"], "val top1")
        assert r["searches"] == [
            k for k, s in enumerate(rep["searches"], 1) if s["genotype"] == r["genotype"]
        ]
    best = max(rep["selection"], key=lambda r: (r["val_top1"], -r["searches"][0]))
    assert rep["picked"]["run"] == best["run"] and rep["picked"]["genotype"] == best["genotype"]
    errors = []
    for i, r in enumerate(rep["final"], 1):
        assert r["ok"] and r["seed"] == i and r["run"] == f"final-s{best['searches'][0]}-{i}"
        assert f"{r['test_top1']:.2%}" == final_line(cwd, r["log"], "test top1")
        with open(os.path.join(folder, "augments", r["run"], "config.json")) as f:
            cfg = json.load(f)
        assert cfg["genotype"] == best["genotype"] and cfg["seed"] == i and not cfg["no_test"]
        assert cfg["val_portion"] == 0 and cfg["epochs"] == 2  # the full augment setting
        errors.append(r["test_error"])
        assert r["test_error"] == pytest.approx(100 * (1 - r["test_top1"]))
    s = rep["summary"]
    assert s["n"] == 2 and not s["partial"]
    assert s["mean_error"] == pytest.approx(statistics.mean(errors))
    assert s["std_error"] == pytest.approx(statistics.stdev(errors))  # sample std
    line = f"Test error = {s['mean_error']:.2f} ± {s['std_error']:.2f} % over 2 runs "
    assert s["line"] == line + "(no paper figure for digits)"
    assert out.strip().splitlines()[-1] == s["line"]
    with open(os.path.join(folder, "report.md")) as f:
        md = f.read()
    assert md.strip().splitlines()[-1] == s["line"] and best["genotype"] in md
    assert os.path.getsize(os.path.join(folder, "report.png")) > 0
    if shutil.which("dot"):
        assert os.path.exists(os.path.join(folder, "normal.png"))
    assert set(rep["time"]) == {"search", "select", "final"}


@pytest.mark.slow
def test_the_selection_never_reads_the_test_set(reference):
    cwd, _ = reference
    folder = os.path.join(cwd, "protocols", "t", "augments")
    for r in report(cwd)["selection"]:
        with open(os.path.join(folder, r["run"], "config.json")) as f:
            cfg = json.load(f)
        assert cfg["no_test"] and cfg["val_portion"] == 0.1 and cfg["seed"] == 1
        assert cfg["epochs"] == 2 and cfg["genotype"] == r["genotype"]
        state = torch.load(os.path.join(folder, r["run"], "checkpoint.pth.tar"), weights_only=True)
        assert len(state["history"]) == 2
        assert not [k for h in state["history"] for k in h if k.startswith("test_")]
        assert state["history"][-1]["val_top1"] == r["val_top1"]
        # The images the run trained and was scored on: its own config rebuilds its loaders
        # (config.json also records the code version, which is not a setting).
        assert set(cfg) - set(AugmentConfig.__dataclass_fields__) == set(METADATA_KEYS)
        settings = {k: v for k, v in cfg.items() if k not in METADATA_KEYS}
        train, val, test, _ = augment.make_loaders(AugmentConfig(**settings), pin=False)
        train_idx, val_idx = set(train.dataset.indices), set(val.dataset.indices)
        assert test is None and val_idx and not train_idx & val_idx
        assert len(train_idx | val_idx) == len(train.dataset.dataset)  # all of the training set


def process_state(pid):
    """The state letter of process ``pid`` in /proc (R, S, T: stopped, Z: ended, not reaped)."""
    with open(f"/proc/{pid}/stat") as f:
        return f.read().rsplit(")", 1)[1].split()[0]


def interrupt_in_search_2s_last_epoch(cwd):
    """Start the protocol in ``cwd`` and SIGTERM it while search-2 is in its second (last)
    epoch, after its first epoch's checkpoint. Returns the protocol's process, or None when
    search-2 ended before it could be held (its last epoch is a few tiny steps: a test process
    starved of CPU for that long misses it); the caller then tries again elsewhere."""
    folder = os.path.join(cwd, "protocols", "t", "searchs")
    proc = start(cwd)  # one run at a time
    wait_for(lambda: os.path.exists(os.path.join(folder, "search-1", "genotype.txt")), "search-1")
    ckpt = os.path.join(folder, "search-2", "checkpoint.pth.tar")
    wait_for(lambda: child_pid(proc.pid, "search-2") is not None, "search-2's process")
    search_2 = child_pid(proc.pid, "search-2")
    wait_for(lambda: os.path.exists(ckpt), "search-2's first epoch", poll=0.005)
    # Held stopped until the protocol's SIGTERM is pending, so that it is cut in the middle.
    try:
        os.kill(search_2, signal.SIGSTOP)
        wait_for(lambda: process_state(search_2) in ("T", "Z"), "search-2 to stop")
        too_late = process_state(search_2) == "Z"
    except (ProcessLookupError, FileNotFoundError):  # ended and reaped
        too_late = True
    if too_late or torch.load(ckpt, weights_only=True)["epoch"] != 1:  # ended, or ending
        with contextlib.suppress(ProcessLookupError):
            os.kill(search_2, signal.SIGKILL)
        proc.kill()
        proc.communicate()
        return None
    try:
        proc.send_signal(signal.SIGTERM)  # the protocol stops search-2, which saves its epoch
        wait_for(lambda: sigterm_pending(search_2), "the protocol's SIGTERM to search-2")
    finally:
        os.kill(search_2, signal.SIGCONT)
    return proc


@pytest.mark.slow
def test_interrupted_after_the_first_search_and_resumed_gives_the_same_report(tmp_path, reference):
    for attempt in range(3):
        cwd = str(tmp_path / f"attempt-{attempt}")
        os.makedirs(cwd)
        proc = interrupt_in_search_2s_last_epoch(cwd)
        if proc is not None:
            break
    assert proc is not None, "search-2 ended before it could be interrupted, three times"
    ckpt = os.path.join(cwd, "protocols", "t", "searchs", "search-2", "checkpoint.pth.tar")
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 128 + signal.SIGTERM, out + err
    assert "interrupted by SIGTERM" in err and err.strip().endswith("--resume")
    assert torch.load(ckpt, weights_only=True)["epoch"] == 1  # search-2 was cut in the middle
    code, out, err = run(cwd, "--resume", "--gpus", "0,1")  # how it runs may change
    assert code == 0, out + err
    assert "search-1: finished before" in out and "search-2: started on GPU 0" in out
    with open(os.path.join(cwd, "protocols", "t", "logs", "search-2.out")) as f:
        headers = [ln for ln in f if ln.startswith("===")]
    assert len(headers) == 2 and headers[1].strip().endswith("--resume")  # from its checkpoint
    assert without_time(report(cwd)) == without_time(report(reference[0]))


@pytest.mark.slow
def test_a_run_left_by_a_protocol_killed_with_sigkill_is_waited_for(tmp_path, reference):
    cwd = str(tmp_path)
    shutil.copytree(os.path.join(reference[0], "protocols"), os.path.join(cwd, "protocols"))
    last = report(cwd)["final"][-1]
    run_dir = os.path.join(cwd, "protocols", "t", "augments", last["run"])
    shutil.rmtree(run_dir)
    os.remove(os.path.join(cwd, "protocols", "t", last["log"]))
    proc = start(cwd, "--resume")
    wait_for(lambda: os.path.exists(os.path.join(run_dir, "config.json")), "the last final run")
    proc.kill()  # SIGKILL: the run goes on without its protocol
    proc.communicate(timeout=60)
    with open(os.path.join(run_dir, ".lock")) as f:
        orphan = int(f.read())
    os.kill(orphan, signal.SIGSTOP)  # hold it, so that the next protocol finds it running
    try:
        again = start(cwd, "--resume")
        wait_for(lambda: "waiting for process" in again.stdout.readline(), "the wait")
    finally:
        os.kill(orphan, signal.SIGCONT)
    out, err = again.communicate(timeout=300)
    assert again.returncode == 0, out + err
    assert without_time(report(cwd)) == without_time(report(reference[0]))


@pytest.mark.slow
def test_submitit_local_executor_gives_the_same_report(tmp_path, reference):
    cwd = str(tmp_path)
    code, out, err = run(cwd, "--executor", "submitit_local")
    assert code == 0, out + err
    assert "search-1: submitted as job" in out and "final-s" in out
    assert os.listdir(os.path.join(cwd, "protocols", "t", "submitit"))  # submitit's own files
    assert without_time(report(cwd)) == without_time(report(reference[0]))


@pytest.mark.slow
def test_a_failed_run_is_reported_and_the_rest_completes(tmp_path, reference):
    cwd = str(tmp_path)
    shutil.copytree(os.path.join(reference[0], "protocols"), os.path.join(cwd, "protocols"))
    folder, ref = os.path.join(cwd, "protocols", "t"), report(cwd)
    other = next(r for r in ref["searches"] if r["genotype"] != ref["picked"]["genotype"])
    with open(os.path.join(folder, "searchs", other["run"], "genotype.txt"), "w") as f:
        f.write(re.sub(r"\('\w+'", "('no_such_op'", other["genotype"], count=1))  # injected
    last = ref["final"][-1]
    with open(os.path.join(folder, "augments", last["run"], "checkpoint.pth.tar"), "wb") as f:
        f.write(b"not a checkpoint")  # and a final run that cannot go on
    code, out, err = run(cwd, "--resume")
    assert code == 1, out + err
    rep = report(cwd)
    bad = next(r for r in rep["searches"] if r["run"] == other["run"])
    assert not bad["ok"] and bad["error"].startswith(f"unreadable genotype: searchs/{bad['run']}/")
    assert "no_such_op" in bad["error"]
    assert [r["run"] for r in rep["selection"]] == [ref["picked"]["run"]]
    assert (
        rep["picked"]["run"] == ref["picked"]["run"]
        and rep["picked"]["among"] == "1 of 1 candidates"
    )
    failed = rep["final"][-1]
    assert not failed["ok"] and "cannot read checkpoint" in failed["error"]
    assert failed["log"] in failed["error"] and failed["run"] in err
    assert rep["final"][0] == ref["final"][0]  # the other final run is there, as it was
    s = rep["summary"]
    assert s["n"] == 1 and s["partial"] and s["std_error"] is None
    assert "std undefined" in s["line"] and "PARTIAL: 1 of the 2 final runs failed" in s["line"]
    with open(os.path.join(folder, "report.md")) as f:
        md = f.read()
    assert "cannot read checkpoint" in md and "unreadable genotype" in md


# --------------------------------------------------------------------------------------------
# Without runs: the selection rules and the input checks
# --------------------------------------------------------------------------------------------
def test_identical_genotypes_are_trained_once_and_a_tie_goes_to_the_lowest_seed(monkeypatch):
    protocol = load_protocol()
    genotypes, accuracy = {1: "A", 2: "B", 3: "A", 4: "C"}, {"select-s1": 0.5, "select-s2": 0.5}
    accuracy["select-s4"] = 0.25
    staged = {}

    def stage(self, name, jobs):  # what the runs would give
        staged[name] = jobs
        rows = [{"run": j.name, **j.info, "ok": True, "log": j.log} for j in jobs]
        for r in rows:
            if name == "search":
                r["genotype"] = genotypes[r["seed"]]
            else:
                r[{"select": "val_top1", "final": "test_top1"}[name]] = accuracy.get(r["run"], 0.9)
        return rows

    monkeypatch.setattr(protocol.Protocol, "stage", stage)
    args = protocol.parser().parse_args([*ARGS, "--searches", "4", "--final_runs", "3"])
    protocol.check(args)
    rep = protocol.Protocol(args, "/nowhere", [], {}).run(first_order=True)
    assert [j.name for j in staged["select"]] == ["select-s1", "select-s2", "select-s4"]
    assert rep["selection"][0]["searches"] == [1, 3]  # A: trained once, for both searches
    assert rep["searches"][2]["selection"] == "select-s1" and rep["searches"][2]["val_top1"] == 0.5
    assert rep["picked"]["run"] == "select-s1" and rep["picked"]["tied_with"] == ["select-s2"]
    select = staged["select"][0].args
    assert select[-7:] == ["--epochs", "2", "--val_portion", "0.1", "--no_test", "--seed", "1"]
    assert select[select.index("--genotype") + 1] == "A"
    finals = staged["final"]
    assert [j.name for j in finals] == ["final-s1-1", "final-s1-2", "final-s1-3"]
    assert all(
        j.args[-2:] == ["--seed", str(i)] and "--no_test" not in j.args
        for i, j in enumerate(finals, 1)
    )
    assert rep["summary"]["line"].startswith("Test error = 10.00 ± 0.00 % over 3 runs")


def test_the_summary_line():
    s = load_protocol().summary
    line = s([2.7, 2.8, 2.9], 3, "2.76 ± 0.09", "cifar10")["line"]
    assert line == "Test error = 2.80 ± 0.10 % over 3 runs (paper: 2.76 ± 0.09)"
    one = s([3.0], 2, None, "mnist")
    assert one["std_error"] is None and one["partial"]
    assert one["line"] == (
        "Test error = 3.00 % over 1 run, std undefined with one run (no paper "
        "figure for mnist) -- PARTIAL: 1 of the 2 final runs failed"
    )
    assert s([], 2, None, "mnist")["line"].startswith("Test error: no final run finished")
    assert load_protocol().PAPER[("cifar10", True)] == "3.00 ± 0.14"  # first order


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--search_args", "--seed 3"], "--search_args may not set --seed"),
        (["--augment_args=--no_test"], "--augment_args may not set --no_test"),
        (["--augment_args", "--genotype DARTS_V1"], "--augment_args may not set --genotype"),
        (["--search_args", "--epochs 1 --name x"], "--search_args may not set --name"),
        (["--search_args=--name=x"], "--search_args may not set --name"),
        (["--search_args", "--nam x"], "--search_args may not set --name"),
        (["--search_args", "--dataset digits"], "--search_args may not set --dataset"),
        (["--search_args", "--seed 2"], "--search_args may not set --seed"),
        (["--augment_args", "--name x"], "--augment_args may not set --name"),
        (["--augment_args=--genotype=DARTS_V2"], "--augment_args may not set --genotype"),
        (["--augment_args", "--data_path ./data/"], "--augment_args may not set --data_path"),
        (["--search_args", "--layers 2"], "--search_args: --layers must be >= 3"),
        (["--search_args", "--bogus 1"], "--search_args: unrecognized arguments: --bogus 1"),
        (["--augment_args", "'unclosed"], "--search_args / --augment_args"),
        (["--select_val_portion", "1"], "--select_val_portion must be in (0, 1)"),
        (["--final_runs", "0"], "--final_runs must be positive"),
        (["--gpus", "0,x"], "--gpus must be distinct GPU ids"),
        (["--gpus", "0", "--executor", "slurm"], "--gpus is for --executor local"),
        (["--executor", "ssh"], "invalid choice: 'ssh'"),
        (["--resume"], "--resume: there is no protocol to resume"),
    ],
)
def test_bad_input_is_one_line_and_exit_status_2(tmp_path, monkeypatch, capsys, extra, message):
    monkeypatch.chdir(tmp_path)
    assert load_protocol().main([*ARGS, *extra]) == 2
    err = capsys.readouterr().err
    assert err.startswith("protocol.py: error: ") and message in err and err.count("\n") == 1
    assert not os.path.exists(tmp_path / "protocols" / "t" / "report.json")


@pytest.mark.skipif(shutil.which("sbatch") is not None, reason="a SLURM machine")
def test_slurm_without_sbatch_is_refused(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    assert load_protocol().main([*ARGS, "--executor", "slurm", "--partition", "gpu"]) == 2
    assert "--executor slurm: no sbatch here" in capsys.readouterr().err


def test_other_settings_on_resume_are_refused(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    protocol = load_protocol()
    args = protocol.parser().parse_args(ARGS)
    protocol.check(args)
    os.makedirs(tmp_path / "protocols" / "t")
    saved = {**protocol.check_settings(str(tmp_path / "protocols" / "t"), args), "searches": 4}
    (tmp_path / "protocols" / "t" / "protocol.json").write_text(json.dumps(saved))
    assert protocol.main([*ARGS, "--resume"]) == 2
    err = capsys.readouterr().err
    assert "was made with --searches 4, this run asks for --searches 2" in err
    assert protocol.main(ARGS) == 2  # and no fresh protocol over it
    assert "already holds a protocol: add --resume" in capsys.readouterr().err


def test_nothing_happens_at_import():
    protocol = load_protocol()
    assert isinstance(protocol.parser(), argparse.ArgumentParser)
