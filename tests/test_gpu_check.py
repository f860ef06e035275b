"""scripts/gpu_check.py: the whole check on the CPU at tiny sizes (so that it cannot rot where
no GPU is), its report, and its refusals."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch
from conftest import ROOT, load_script

SCRIPT = os.path.join(ROOT, "scripts", "gpu_check.py")


def load():
    return load_script("scripts/gpu_check.py")


@pytest.mark.slow
def test_the_tiny_cpu_check_passes_every_step_a_cpu_can_run(tmp_path):
    out = tmp_path / "report"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, SCRIPT, "--device", "cpu", "--tiny", "--out", str(out)]
    # timeout: a hang guard (the check takes ~90 s here)
    res = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=1800)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    report = json.loads((out / "report.json").read_text())
    steps = {s["step"]: s for s in report["steps"]}
    assert list(steps) == list(load().STEPS)  # every step, in order
    for name, s in steps.items():
        assert s["status"] in ("passed", "skipped"), (name, s)
        if s["status"] == "skipped":
            assert s["reason"], name
    # nothing here needs CUDA to run: every step ran
    assert all(s["status"] == "passed" for s in steps.values())
    assert steps["search_resume"]["details"]["bit_exact"] is True  # a CPU resume is exact
    assert steps["alpha_gradient"]["details"]["rows"]
    md = (out / "report.md").read_text()
    for name in steps:
        assert f"| {name} | passed |" in md and f"## {name}: passed" in md
    assert (out / "work" / "searchs" / "stopped" / "checkpoint.pth.tar").exists()


def test_without_cuda_the_cuda_check_is_refused_in_one_line(tmp_path, capsys, monkeypatch):
    gpu_check = load()
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert gpu_check.main(["--out", str(tmp_path / "r")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "no CUDA GPU is visible" in err and "--device cpu" in err
    assert not (tmp_path / "r").exists()  # refused before anything is written
    for argv, message in (
        (["--device", "tpu"], "--device must be cuda, cuda:N or cpu"),
        (["--device", "cpu", "--only", "versions,nope"], "unknown step(s) nope"),
    ):
        assert gpu_check.main([*argv, "--out", str(tmp_path / "r")]) == 2
        assert message in capsys.readouterr().err


def test_a_failing_step_is_reported_with_its_last_lines_and_the_check_goes_on(
    tmp_path, monkeypatch, capsys
):
    gpu_check = load()

    def broken(c):
        c.details["seen"] = 1.5
        raise gpu_check.Failed("it broke", "line 1\nthe last line")

    def skipped(c):
        raise gpu_check.Skip("needs something absent")

    monkeypatch.setitem(gpu_check.STEP_FUNCTIONS, "versions", broken)
    monkeypatch.setitem(gpu_check.STEP_FUNCTIONS, "official_fixture", skipped)
    out = tmp_path / "r"
    code = gpu_check.main(
        ["--device", "cpu", "--out", str(out), "--only", "versions,official_fixture"]
    )
    assert code == 1
    report = json.loads((out / "report.json").read_text())
    failed, skip = report["steps"]
    assert failed["status"] == "failed" and failed["last_lines"].endswith("the last line")
    assert skip == {**skip, "status": "skipped", "reason": "needs something absent"}
    md = (out / "report.md").read_text()
    assert "| versions | failed |" in md and "the last line" in md
    assert "Skipped: needs something absent" in md
    assert "failed: versions" in capsys.readouterr().out


def test_a_step_that_raises_is_a_failed_step(tmp_path):
    gpu_check = load()
    c = gpu_check.Check(torch.device("cpu"), True, str(tmp_path), str(tmp_path), {})

    def bug(c):
        raise KeyError("missing")

    gpu_check.STEP_FUNCTIONS["_bug"] = bug
    try:
        record = gpu_check.run_step(c, "_bug")
    finally:
        del gpu_check.STEP_FUNCTIONS["_bug"]
    assert record["status"] == "failed" and record["summary"] == "KeyError: 'missing'"
    assert "KeyError" in record["last_lines"]
