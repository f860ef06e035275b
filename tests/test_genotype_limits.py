"""Issue 13, item 3: no genotype string or file can exhaust memory or time, or give a traceback.

Every hostile input must be refused with a one-line GenotypeError in well under a second and
under 100 MB: in-process (measured with thread_time and tracemalloc), and through augment.py
and visualize.py (exit status 2, one line on stderr, no traceback). Each hostile input runs
under an address-space cap, so that a regression fails with a MemoryError instead of driving
the machine into swap.
"""

from __future__ import annotations

import contextlib
import os
import resource
import subprocess
import sys
import time
import tracemalloc
from collections.abc import Callable, Iterator

import pytest
from conftest import ROOT

import genotypes as gt

MB = 1 << 20
MAX_SECONDS = 0.5  # in-process; "well under a second"
MAX_BYTES = 100 * MB

PAIR = "('skip_connect', 0)"
CELL = f"[{PAIR}, ('skip_connect', 1)]"  # one node, the flat form


def genotype(normal: str = CELL, normal_concat: str = "[2]", reduce: str = CELL) -> str:
    return (
        f"Genotype(normal={normal}, normal_concat={normal_concat}, reduce={reduce}, "
        "reduce_concat=[2])"
    )


# name: (the text, "FILE:" + text for a file, "BYTES:" for a binary file; a part of the error)
HOSTILE: dict[str, tuple[str, str]] = {
    # A billion-element list before any bound was checked: MemoryError, or swap without a limit.
    "huge range": (genotype(normal_concat="range(2, 1000000000)"), "has 999999998 elements"),
    # 200,000 pairs, written out (4 MB): too long for the command line, so it comes as a file.
    "200k pairs": ("FILE:" + genotype(normal="[" + f"{PAIR}, " * 200_000 + "]"), "characters"),
    # Refused before the fix too (the parser's nesting limit of 200); now by its length first.
    "100k brackets": ("[" * 100_000, "not a genotype"),
    # The parser's own stack: MemoryError (unary chain), RecursionError (binary chain).
    "unary chain": (genotype(normal="-" * 19_000 + "1"), "nested too deeply"),
    "binary chain": (genotype(normal_concat="1" + "+1" * 9_000), "nested too deeply"),
    # Printing it in the error message raised ValueError (Python's 4300-digit limit).
    "huge integer": (genotype(normal=f"[[('skip_connect', 0x{'f' * 5_000})]]"), "too large"),
    # Within the length limit, but more nodes or inputs than any cell has.
    "500 nodes": (genotype(normal="[" + f"[{PAIR}], " * 500 + "]"), "at most 64 nodes"),
    "500 inputs": (genotype(normal="[[" + f"{PAIR}, " * 500 + "]]"), "at most 64 inputs"),
    # Bytes that are not UTF-8: a lone surrogate on the command line, a binary file.
    "not utf-8": ("\udcff", "not valid text"),
    "binary file": ("BYTES:", "not a text file"),
}
# The ones the issue names, run through both scripts (the rest run in-process only).
SCRIPT_CASES = ["huge range", "200k pairs", "100k brackets", "unary chain"]


def materialize(case: str, folder: str) -> str:
    """The ``--genotype`` argument for ``case``: the text, or the path of a file holding it."""
    text, _ = HOSTILE[case]
    path = os.path.join(folder, "genotype.txt")
    if text.startswith("FILE:"):
        with open(path, "w") as f:
            f.write(text[len("FILE:") :])
        return path
    if text.startswith("BYTES:"):
        with open(path, "wb") as f:
            f.write(b"Genotype(normal=\xff\xfe\x00" * 1000)
        return path
    return text


def _vm_size() -> int | None:
    try:
        with open("/proc/self/status") as f:
            return next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmSize:"))
    except (OSError, StopIteration):
        return None


@contextlib.contextmanager
def address_space_cap(extra: int) -> Iterator[None]:
    """Lower the soft RLIMIT_AS to the present size + ``extra`` (Linux), restore it on exit."""
    vm = _vm_size()
    soft, hard = resource.getrlimit(resource.RLIMIT_AS)
    cap = None if vm is None else vm + extra
    if cap is not None and hard != resource.RLIM_INFINITY:
        cap = min(cap, hard)
    if cap is not None and soft != resource.RLIM_INFINITY:
        cap = min(cap, soft)
    if cap is not None:
        resource.setrlimit(resource.RLIMIT_AS, (cap, hard))
    try:
        yield
    finally:
        if cap is not None:
            resource.setrlimit(resource.RLIMIT_AS, (soft, hard))


def cost(fn: Callable[[], object]) -> tuple[float, int]:
    """CPU seconds of ``fn()`` in this thread (wall time would measure the load of a shared
    machine, and the process's CPU time the spinning of torch's idle OpenMP threads) and its
    peak of traced memory, each in its own run (tracemalloc slows Python down), under an
    address-space cap. ``fn`` must raise GenotypeError."""
    with address_space_cap(1 << 30):
        t0 = time.thread_time()
        with pytest.raises(gt.GenotypeError):
            fn()
        seconds = time.thread_time() - t0
        tracemalloc.start()
        try:
            with pytest.raises(gt.GenotypeError):
                fn()
            peak = tracemalloc.get_traced_memory()[1]
        finally:
            tracemalloc.stop()
    return seconds, peak


@pytest.mark.parametrize("case", list(HOSTILE))
def test_hostile_genotype_is_refused_fast_in_one_line(case, tmp_path):
    arg = materialize(case, str(tmp_path))
    seconds, peak = cost(lambda: gt.load(arg))
    assert seconds < MAX_SECONDS, f"{seconds:.2f} s"
    assert peak < MAX_BYTES, f"{peak / MB:.0f} MB"
    with pytest.raises(gt.GenotypeError) as e:
        gt.load(arg)
    assert HOSTILE[case][1] in str(e.value)
    assert "\n" not in str(e.value) and len(str(e.value)) < 300


def test_worst_input_within_the_length_limit_parses_fast():
    """Of what fits in MAX_CHARS, f-strings cost ast.parse the most (superlinear)."""
    text = "f'" + "{1}" * ((gt.MAX_CHARS - 3) // 3) + "'"
    assert len(text) <= gt.MAX_CHARS
    seconds, peak = cost(lambda: gt.from_str(text))
    assert seconds < MAX_SECONDS, f"{seconds:.2f} s"
    assert peak < MAX_BYTES, f"{peak / MB:.0f} MB"


def test_the_largest_cells_allowed_still_parse():
    n = gt.MAX_NODES
    nodes = [[("sep_conv_3x3", i), ("dil_conv_5x5", i + 1)] for i in range(n)]
    g = gt.Genotype(nodes, range(2, n + 2), nodes, range(2, n + 2))
    assert gt.from_str(gt.to_str(g)) == gt.validate(g)
    wide = [[("skip_connect", 0)] * gt.MAX_INPUTS]
    g = gt.Genotype(wide, [2], wide, [2])
    assert gt.from_str(gt.to_str(g)) == gt.validate(g)
    for too_big in (
        gt.Genotype(nodes + [nodes[0]], [2], nodes, [2]),
        gt.Genotype(wide, [2], [wide[0] + [("skip_connect", 1)]], [2]),
    ):
        with pytest.raises(gt.GenotypeError, match="at most 64"):
            gt.validate(too_big)


def test_a_genotype_file_over_the_limit_is_refused(tmp_path):
    path = tmp_path / "g.txt"
    path.write_text(gt.to_str(gt.DARTS_V2) + " " * gt.MAX_CHARS + "x")
    with pytest.raises(gt.GenotypeError, match=f"g.txt: not a genotype: over {gt.MAX_CHARS}"):
        gt.load(str(path))


# The script is imported first (torch and the rest), then capped to 1 GiB more address space,
# then run as __main__; it reports the CPU seconds and peak-RSS growth of the run proper.
CHILD = r"""
import importlib, os, resource, runpy, sys, time
script, report = sys.argv[1], sys.argv[2]
sys.path.insert(0, os.path.dirname(script))
importlib.import_module(os.path.basename(script)[:-3])
with open("/proc/self/status") as f:
    vm = next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmSize:"))
hard = resource.getrlimit(resource.RLIMIT_AS)[1]
cap = vm + (1 << 30) if hard == resource.RLIM_INFINITY else min(vm + (1 << 30), hard)
resource.setrlimit(resource.RLIMIT_AS, (cap, hard))
rss0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
t0 = time.thread_time()
sys.argv = [script, *sys.argv[3:]]
try:
    runpy.run_path(script, run_name="__main__")
finally:
    rss = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - rss0) * 1024
    with open(report, "w") as f:
        f.write(f"{time.thread_time() - t0} {rss}")
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/self/status")
# augment.py's imports take ~3 s of a run, visualize.py's ~1.5 s.
@pytest.mark.parametrize(
    "script", [pytest.param("augment.py", marks=pytest.mark.slow), "visualize.py"]
)
@pytest.mark.parametrize("case", SCRIPT_CASES)
def test_scripts_refuse_hostile_genotypes_in_one_line(script, case, tmp_path):
    arg = materialize(case, str(tmp_path))
    if script == "augment.py":
        args = ["--name", "x", "--dataset", "digits", "--device", "cpu", "--genotype", arg]
    else:
        args = [arg, "--out", str(tmp_path / "plots")]
    report = tmp_path / "report.txt"
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": ""}
    r = subprocess.run(
        [sys.executable, "-c", CHILD, os.path.join(ROOT, script), str(report), *args],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=60,
        env=env,
    )
    err = r.stderr.strip().splitlines()
    assert r.returncode == 2, r.stderr[-2000:]
    assert len(err) == 1 and err[0].startswith(f"{script}: error: "), r.stderr[-2000:]
    assert HOSTILE[case][1] in err[0]
    seconds, rss = report.read_text().split()
    assert float(seconds) < 1.0, f"{float(seconds):.2f} s"
    assert int(rss) < MAX_BYTES, f"{int(rss) / MB:.0f} MB"
    assert not (tmp_path / "augments").exists() and not (tmp_path / "plots").exists()
