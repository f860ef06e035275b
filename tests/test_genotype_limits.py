"""No genotype string or file can exhaust memory or time, or give a traceback.

Every hostile input must be refused with a one-line GenotypeError under 100 MB: in-process
(measured with tracemalloc), and through augment.py and visualize.py (exit status 2, one line on
stderr, no traceback). Time is bounded by construction, not measured (a busy machine would
fail a timed test): text outside a genotype's literal tokens, or nested deeper than
``MAX_DEPTH``, is refused before ``ast.parse`` sees it, and sizes are bounded before anything is
built. Each hostile input runs under an address-space cap, so that a regression fails with a
MemoryError instead of driving the machine into swap.
"""

from __future__ import annotations

import contextlib
import os
import resource
import subprocess
import sys
import tracemalloc
from collections.abc import Callable, Iterator

import pytest
from conftest import ROOT

import genotypes as gt

MB = 1 << 20
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
    # Once MemoryError (unary chain) and RecursionError (binary chain) in the parser's stack;
    # now refused by the token scan before it.
    "unary chain": (genotype(normal="-" * 19_000 + "1"), "unexpected '-------"),
    "binary chain": (genotype(normal_concat="1" + "+1" * 9_000), "unexpected '+1+1"),
    # f-strings cost ast.parse the most (superlinear): 1.1 s for this one before the scan.
    "f-string": ("f'" + "{1}" * ((gt.MAX_CHARS - 3) // 3) + "'", "unexpected \"f'{1}"),
    "call chain": (genotype(normal="x" + "()" * 9_000), "unexpected '()()"),
    "deep brackets": (genotype(normal="[" * 9_000 + "]" * 9_000), "nested deeper than 8"),
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


def peak_memory(fn: Callable[[], object]) -> int:
    """Peak of traced memory of ``fn()``, under an address-space cap. ``fn`` must raise
    GenotypeError."""
    with address_space_cap(1 << 30):
        tracemalloc.start()
        try:
            with pytest.raises(gt.GenotypeError):
                fn()
            return tracemalloc.get_traced_memory()[1]
        finally:
            tracemalloc.stop()


@pytest.mark.parametrize("case", list(HOSTILE))
def test_hostile_genotype_is_refused_in_one_line(case, tmp_path):
    arg = materialize(case, str(tmp_path))
    peak = peak_memory(lambda: gt.load(arg))
    assert peak < MAX_BYTES, f"{peak / MB:.0f} MB"
    with pytest.raises(gt.GenotypeError) as e:
        gt.load(arg)
    assert HOSTILE[case][1] in str(e.value)
    assert "\n" not in str(e.value) and len(str(e.value)) < 300


@pytest.mark.parametrize(
    "text",
    [
        HOSTILE["f-string"][0],
        HOSTILE["unary chain"][0],
        HOSTILE["binary chain"][0],
        HOSTILE["call chain"][0],
        HOSTILE["deep brackets"][0],
        genotype(normal="x[0]" + "[0]" * 100),
        genotype(normal="lambda: 0"),
        genotype(normal="x.y"),
        genotype(normal="[[('skip_connect\\n', 0)]]"),  # an escape
        genotype(normal="[[(b'skip_connect', 0)]]"),  # a prefixed string
        genotype(normal="[[('skip_connect', 0 if 1 else 2)]]"),
        genotype(normal="not " * 4_000 + "1"),
    ],
)
def test_text_outside_the_literal_grammar_never_reaches_the_parser(text, monkeypatch):
    """The parse's cost is bounded by construction: what could make ``ast.parse`` superlinear
    or recursive is refused by a linear scan first."""

    parsed = []
    real_parse = gt.ast.parse  # the ast module's: pytest's own calls must still go through
    monkeypatch.setattr(
        gt.ast, "parse", lambda s, *a, **k: parsed.append(s) or real_parse(s, *a, **k)
    )
    with pytest.raises(gt.GenotypeError, match="not a genotype"):
        gt.from_str(text)
    assert text.strip() not in parsed


def test_the_parser_sees_only_shallow_literal_text(monkeypatch):
    """What the scan lets through nests at most MAX_DEPTH brackets, which bounds the tree walk."""
    seen = []
    real_parse = gt.ast.parse
    monkeypatch.setattr(
        gt.ast, "parse", lambda s, *a, **k: seen.append(s) or real_parse(s, *a, **k)
    )
    assert gt.from_str(gt.to_str(gt.DARTS_V2)) == gt.DARTS_V2
    (text,) = seen
    depth = deepest = 0
    for char in text:
        depth += (char in "([") - (char in ")]")
        deepest = max(deepest, depth)
    assert deepest == 4 <= gt.MAX_DEPTH
    with pytest.raises(gt.GenotypeError, match="nested deeper"):
        gt.from_str(genotype(normal="[" * (gt.MAX_DEPTH + 1) + "]" * (gt.MAX_DEPTH + 1)))


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
# then run as __main__; it reports the peak-RSS growth of the run proper.
CHILD = r"""
import importlib, os, resource, runpy, sys
script, report = sys.argv[1], sys.argv[2]
sys.path.insert(0, os.path.dirname(script))
importlib.import_module(os.path.basename(script)[:-3])
with open("/proc/self/status") as f:
    vm = next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmSize:"))
hard = resource.getrlimit(resource.RLIMIT_AS)[1]
cap = vm + (1 << 30) if hard == resource.RLIM_INFINITY else min(vm + (1 << 30), hard)
resource.setrlimit(resource.RLIMIT_AS, (cap, hard))
rss0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
sys.argv = [script, *sys.argv[3:]]
try:
    runpy.run_path(script, run_name="__main__")
finally:
    rss = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - rss0) * 1024
    with open(report, "w") as f:
        f.write(str(rss))
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
        timeout=300,  # a hang guard: the refusal takes ~3 s, most of it imports
        env=env,
    )
    err = r.stderr.strip().splitlines()
    assert r.returncode == 2, r.stderr[-2000:]
    assert len(err) == 1 and err[0].startswith(f"{script}: error: "), r.stderr[-2000:]
    assert HOSTILE[case][1] in err[0]
    rss = report.read_text()
    assert int(rss) < MAX_BYTES, f"{int(rss) / MB:.0f} MB"
    assert not (tmp_path / "augments").exists() and not (tmp_path / "plots").exists()
