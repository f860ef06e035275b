"""scripts/protocol_exec.py on its own: the local executor runs the commands it is given, one per
GPU slot, and returns each run's exit status; exit statuses in words. (The protocol's end-to-end
tests in test_protocol.py run both executors on real searches, interrupted and resumed.)"""

import os
import sys

from conftest import load_script


def load_exec():
    return load_script("scripts/protocol_exec.py")


def test_run_local_gives_each_run_its_exit_status_and_a_gpu_slot(tmp_path, capsys):
    ex = load_exec()
    os.makedirs(tmp_path / "logs")
    jobs = [ex.Job(f"final-s1-{i}", "augment", [str(i)], "test_top1") for i in (1, 2, 3)]
    # Each run prints the GPU it was given, then exits with its own number.
    code = "import os, sys; print('gpu', os.environ['CUDA_VISIBLE_DEVICES'])"
    code += "; sys.exit(int(sys.argv[1]))"
    command = lambda job: [sys.executable, "-c", code, *job.args]  # noqa: E731
    codes = ex.run_local(jobs, command, str(tmp_path), ["0", "1"])
    assert codes == {"final-s1-1": 1, "final-s1-2": 2, "final-s1-3": 3}
    for job in jobs:
        lines = (tmp_path / job.log).read_text().splitlines()
        assert lines[0].startswith("=== ") and lines[0].endswith(f" {job.args[0]}")  # the command
        assert lines[1] in ("gpu 0", "gpu 1") and len(lines) == 2
    out = capsys.readouterr().out
    assert out.count("started on GPU") == 3 and "final-s1-3: ended, exit status 3" in out


def test_exit_status_in_words():
    ex = load_exec()
    assert ex.exit_status(-9) == "killed by SIGKILL" and ex.exit_status(-15) == "killed by SIGTERM"
    assert ex.exit_status(0) == "exit status 0" and ex.exit_status("not started") == "not started"
