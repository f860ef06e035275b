"""Nothing lost: bit-exact resume after kill -9 and SIGTERM, atomic checkpoints, clear errors,
and evaluate.py agreeing with augment.py."""

import os
import shutil
import signal
import subprocess
import sys
import time

import pytest
import torch
from conftest import ROOT, run_script

import checkpoint

SEARCH = [
    "search.py",
    "--name",
    "r",
    "--dataset",
    "digits",
    "--epochs",
    "2",
    "--layers",
    "3",
    "--init_channels",
    "4",
    "--nodes",
    "2",
    "--batch_size",
    "128",
    "--workers",
    "0",
    "--first_order",
]
AUGMENT = [
    "augment.py",
    "--name",
    "r",
    "--dataset",
    "digits",
    "--genotype",
    "DARTS_V2",
    "--epochs",
    "3",
    "--layers",
    "3",
    "--init_channels",
    "4",
    "--batch_size",
    "128",
    "--workers",
    "0",
    "--cutout_length",
    "4",
]


def run_dir(cwd, script):
    return cwd / ("searchs" if script == "search.py" else "augments") / "r"


def start(cmd, cwd, **kw):
    return subprocess.Popen(
        [sys.executable, os.path.join(ROOT, cmd[0]), *cmd[1:]],
        cwd=cwd,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        **kw,
    )


def wait_for_first_epoch(proc, cwd, script, log=None):
    if log is None:
        log = run_dir(cwd, script) / ("search.log" if script == "search.py" else "augment.log")
    polls = 15_000  # a hang guard that counts polls (about 300 s of sleeps), not the clock
    for _ in range(polls):
        if log.exists() and "Epoch 1 done" in log.read_text():
            return
        assert proc.poll() is None, proc.communicate()
        time.sleep(0.02)
    raise AssertionError(f"epoch 1 did not end within {polls} polls")


def interrupt_after_first_epoch(cmd, cwd, sig, group=False):
    """Start a run, wait until epoch 1 is saved, then send ``sig`` while epoch 2 runs: to the
    main process, or with ``group`` to its whole process group (loader workers included), as
    SLURM, ``timeout`` and Ctrl-C in a terminal do."""
    proc = start(cmd, cwd, start_new_session=group)
    wait_for_first_epoch(proc, cwd, cmd[0])
    assert proc.poll() is None, "the run ended before it could be interrupted"
    if group:
        os.killpg(proc.pid, sig)
    else:
        proc.send_signal(sig)
    out, err = proc.communicate(timeout=120)
    return proc.returncode, out, err


def final_state(cwd, script):
    return torch.load(run_dir(cwd, script) / "checkpoint.pth.tar", weights_only=True)


def assert_same_run(a, b):
    assert a["epoch"] == b["epoch"]
    assert a["model"].keys() == b["model"].keys()
    for k in a["model"]:
        assert torch.equal(a["model"][k], b["model"][k]), k
    for ha, hb in zip(a["history"], b["history"], strict=True):
        ha, hb = dict(ha), dict(hb)
        ha.pop("time"), hb.pop("time")
        assert ha == hb  # losses, accuracies, genotypes, alphas: all equal to the last bit
    assert a["best_top1"] == b["best_top1"]


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    """Each script run once from start to end, as the reference: the final states by script,
    and the folder the runs are in (``"cwd"``), which the tests only read or copy."""
    cwd = tmp_path_factory.mktemp("reference")
    states = {"cwd": cwd}
    for cmd in (SEARCH, AUGMENT):
        res = run_script(*cmd, cwd=cwd)
        assert res.returncode == 0, res.stderr
        states[cmd[0]] = final_state(cwd, cmd[0])
    return states


def copy_of_reference_augment(uninterrupted, cwd):
    """The reference augment run's folder, copied to ``cwd``: a finished run of AUGMENT."""
    shutil.copytree(run_dir(uninterrupted["cwd"], "augment.py"), run_dir(cwd, "augment.py"))


@pytest.mark.slow
@pytest.mark.parametrize("cmd", [SEARCH, AUGMENT], ids=["search", "augment"])
@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGTERM], ids=["kill-9", "sigterm"])
def test_resume_is_bit_exact(cmd, sig, uninterrupted, tmp_path):
    code, _, err = interrupt_after_first_epoch(cmd, tmp_path, sig)
    if sig == signal.SIGTERM:
        assert code == 128 + signal.SIGTERM
        assert "interrupted by SIGTERM" in err and "--resume" in err
        assert err.count("\n") == 1
    else:
        assert code == -signal.SIGKILL
    assert final_state(tmp_path, cmd[0])["epoch"] == 1

    # without --resume nothing is overwritten
    res = run_script(*cmd, cwd=tmp_path)
    assert res.returncode == 2 and "add --resume" in res.stderr and "new --name" in res.stderr

    res = run_script(*cmd, "--resume", cwd=tmp_path)
    assert res.returncode == 0, res.stderr
    resumed = final_state(tmp_path, cmd[0])
    assert_same_run(resumed, uninterrupted[cmd[0]])
    if cmd[0] == "search.py":
        lines = (run_dir(tmp_path, "search.py") / "genotypes.txt").read_text().splitlines()
        assert [ln.split(":")[0] for ln in lines] == ["epoch 1", "epoch 2"]


@pytest.mark.slow
@pytest.mark.parametrize(
    "cmd, sig",
    [(SEARCH, signal.SIGTERM), (AUGMENT, signal.SIGINT)],
    ids=["search-sigterm", "augment-sigint"],
)
def test_a_signal_to_the_process_group_stops_cleanly(cmd, sig, tmp_path):
    """With loader workers, a signal to the whole group (SLURM's preemption, `timeout`, Ctrl-C)
    reaches the workers too: the stop must still be the documented one-line one."""
    cmd = [*cmd, "--workers", "2"]
    code, _, err = interrupt_after_first_epoch(cmd, tmp_path, sig, group=True)
    assert code == 128 + sig, err
    assert err.startswith(f"{cmd[0]}: interrupted by {signal.Signals(sig).name}: ")
    assert "--resume" in err and err.count("\n") == 1  # one line, no traceback
    assert final_state(tmp_path, cmd[0])["epoch"] == 1  # intact ...
    res = run_script(*cmd, "--resume", cwd=tmp_path)  # ... and resumable
    assert res.returncode == 0, res.stderr
    epochs = int(cmd[cmd.index("--epochs") + 1])
    assert final_state(tmp_path, cmd[0])["epoch"] == epochs


@pytest.mark.slow
def test_a_signal_to_the_process_group_stops_a_ddp_run_cleanly(tmp_path):
    """The same under DDP (--gpus self-launch, two CPU processes, 2 loader workers each): the
    launcher, the two processes and their workers all get SIGTERM; one line, exit 143."""
    cmd = [*AUGMENT, "--workers", "2", "--device", "cpu", "--gpus", "0,1"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = start(cmd, tmp_path, start_new_session=True, env=env)
    wait_for_first_epoch(proc, tmp_path, "augment.py")
    os.killpg(proc.pid, signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 128 + signal.SIGTERM, err
    assert err.startswith("augment.py: interrupted by SIGTERM: ") and err.count("\n") == 1
    assert final_state(tmp_path, "augment.py")["epoch"] == 1


@pytest.mark.slow
def test_a_run_folder_belongs_to_one_process(tmp_path):
    """A second process on a live run's folder is refused, fresh or --resume; once the holder is
    gone, even by kill -9, --resume takes the folder at once (the kernel drops the lock)."""
    holder = start(SEARCH, tmp_path)
    wait_for_first_epoch(holder, tmp_path, "search.py")
    holder.send_signal(signal.SIGSTOP)  # alive, holding its lock, for as long as the test needs
    for extra in ([], ["--resume"]):
        res = run_script(*SEARCH, *extra, cwd=tmp_path)
        assert res.returncode == 2
        if extra:
            assert f"is in use by process {holder.pid}" in res.stderr
        assert res.stderr.count("\n") == 1
    holder.kill()
    holder.wait()
    res = run_script(*SEARCH, "--resume", cwd=tmp_path)
    assert res.returncode == 0, res.stderr
    assert final_state(tmp_path, "search.py")["epoch"] == 2


def test_run_lock_refuses_a_second_holder_and_frees_on_release(tmp_path, monkeypatch, capsys):
    import search

    run = tmp_path / "searchs" / "x"
    run.mkdir(parents=True)
    lock = checkpoint.RunLock(str(run))
    monkeypatch.chdir(tmp_path)
    code = search.main(["--name", "x", "--dataset", "digits", "--epochs", "1", *SEARCH[7:]])
    err = capsys.readouterr().err
    assert code == 2 and f"searchs/x is in use by process {os.getpid()}" in err
    assert err.count("\n") == 1
    with pytest.raises(checkpoint.ConfigError, match="in use"):
        checkpoint.RunLock(str(run))
    lock.release()
    checkpoint.RunLock(str(run)).release()  # free again


def test_interrupted_before_any_epoch_says_nothing_to_resume(tmp_path):
    assert "nothing to resume" in checkpoint.resume_hint("search.py", str(tmp_path), [])


KILL_HALF_WAY = """
import os, signal, sys, torch
sys.path.insert(0, {root!r})
import checkpoint
path = {path!r}
checkpoint.save_checkpoint({{"model": {{"w": torch.ones(3)}}, "config": {{"a": 1}}}}, path)
real_save = torch.save
def half_save(obj, f, *a, **k):
    f.write(b"PK\\x03\\x04 half a checkpoint")
    f.flush()
    os.kill(os.getpid(), signal.SIGKILL)
torch.save = half_save
checkpoint.save_checkpoint({{"model": {{"w": torch.zeros(3)}}, "config": {{"a": 2}}}}, path)
"""


def test_checkpoint_write_killed_half_way_keeps_the_previous_one(tmp_path):
    path = tmp_path / "checkpoint.pth.tar"
    code = KILL_HALF_WAY.format(root=ROOT, path=str(path))
    res = subprocess.run([sys.executable, "-c", code], capture_output=True)
    assert res.returncode == -signal.SIGKILL
    state = checkpoint.load_checkpoint(str(path))
    assert torch.equal(state["model"]["w"], torch.ones(3)) and state["config"] == {"a": 1}


@pytest.mark.parametrize(
    "damage, message",
    [
        (lambda p: p.write_bytes(b"not a checkpoint at all"), "cannot read checkpoint"),
        (
            lambda p: p.write_bytes(p.read_bytes()[: len(p.read_bytes()) // 2]),
            "cannot read checkpoint",
        ),
        (
            lambda p: torch.save({"weights": torch.ones(1)}, p),
            "is not a checkpoint of this project",
        ),
    ],
)
def test_damaged_or_foreign_checkpoint_gives_one_line(damage, message, tmp_path):
    run = tmp_path / "augments" / "r"
    run.mkdir(parents=True)
    ckpt = run / "checkpoint.pth.tar"
    checkpoint.save_checkpoint({"model": {"w": torch.ones(1000)}, "config": {}}, str(ckpt))
    damage(ckpt)
    res = run_script(*AUGMENT, "--resume", cwd=tmp_path)
    assert res.returncode == 2
    assert message in res.stderr and res.stderr.count("\n") == 1


@pytest.mark.slow
def test_resume_with_another_configuration_is_refused(uninterrupted, tmp_path):
    copy_of_reference_augment(uninterrupted, tmp_path)
    res = run_script(*AUGMENT, "--layers", "6", "--resume", cwd=tmp_path)
    assert res.returncode == 2
    assert "was made with --layers 3, this run asks for --layers 6" in res.stderr
    res = run_script(*AUGMENT, "--resume", "--workers", "1", cwd=tmp_path)
    assert res.returncode == 0, res.stderr  # workers do not change what is computed


def test_resume_without_a_checkpoint(tmp_path):
    res = run_script(*AUGMENT, "--resume", cwd=tmp_path)
    assert res.returncode == 2 and "no checkpoint to resume" in res.stderr


@pytest.mark.slow
def test_non_finite_loss_stops_with_epoch_steps_and_checkpoint(tmp_path):
    res = run_script(*AUGMENT, "--lr", "1e30", "--grad_clip", "1e30", cwd=tmp_path)
    assert res.returncode == 2
    # read every --print_freq steps: the line names the window of steps and the epoch
    assert "non-finite training loss in step" in res.stderr and " of epoch 1;" in res.stderr
    assert "last good checkpoint" in res.stderr and res.stderr.count("\n") == 1


@pytest.mark.slow
def test_evaluate_agrees_with_augment(uninterrupted, tmp_path):
    best = run_dir(uninterrupted["cwd"], "augment.py") / "best.pth.tar"
    logged = torch.load(best, weights_only=True)
    res = run_script("evaluate.py", "--checkpoint", str(best), "--workers", "0", cwd=tmp_path)
    assert res.returncode == 0, res.stderr
    top1 = float(res.stdout.split("top1 ")[1].split("%")[0]) / 100
    assert top1 == pytest.approx(logged["best_top1"], abs=5e-5)  # printed with 2 decimals
    assert top1 == pytest.approx(logged["history"][logged["best_epoch"] - 1]["test_top1"], abs=5e-5)
    res = run_script("evaluate.py", "--checkpoint", str(tmp_path / "nope.pth.tar"), cwd=tmp_path)
    assert res.returncode == 2 and "no checkpoint at" in res.stderr


def test_a_run_from_before_a_new_flag_resumes_while_the_flag_keeps_its_default(tmp_path):
    from config import AugmentConfig

    cfg = AugmentConfig(name="r", dataset="digits", genotype="DARTS_V2", resume=True)
    old = {k: v for k, v in cfg.to_dict().items() if k != "val_portion"}  # saved before it
    checkpoint.save_checkpoint({"model": {}, "config": old}, str(tmp_path / checkpoint.CHECKPOINT))
    defaults = AugmentConfig().to_dict()
    assert checkpoint.check_resume(str(tmp_path), cfg.to_dict(), True, defaults) is not None
    cfg.val_portion = 0.1
    with pytest.raises(checkpoint.ConfigError, match="was made with --val_portion None"):
        checkpoint.check_resume(str(tmp_path), cfg.to_dict(), True, defaults)
