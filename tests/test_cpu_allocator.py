"""utils.keep_freed_memory: a CPU run keeps freed memory for reuse instead of glibc's fresh
mmap (and page faults) for every large temporary, unless the user set glibc's settings."""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys

import pytest
from conftest import ROOT

from utils import ALLOCATOR_ENV, MALLOC_ENV

pytestmark = pytest.mark.skipif(
    sys.platform != "linux" or platform.libc_ver()[0] != "glibc",
    reason="keep_freed_memory acts on glibc's allocator only (this is not Linux with glibc)",
)

# In a fresh interpreter: what keep_freed_memory did, then how a 64 MiB tensor was allocated,
# from glibc's own accounts (mallinfo2: hblkhd, the bytes in mmapped blocks).
PROBE = """
import ctypes, json, sys
import torch
import utils

class MallInfo2(ctypes.Structure):
    _fields_ = [(n, ctypes.c_size_t) for n in
                ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks",
                 "uordblks", "fordblks", "keepcost")]

libc = ctypes.CDLL(None)
libc.mallinfo2.restype = MallInfo2
done = utils.keep_freed_memory() if sys.argv[1] == "keep" else None
before = libc.mallinfo2().hblkhd
x = torch.ones(16 * 2**20)  # 64 MiB, above glibc's largest mmap threshold
print(json.dumps({"done": done, "mmapped": libc.mallinfo2().hblkhd - before}))
"""


def probe(mode: str, **env: str) -> dict:
    clean = {k: v for k, v in os.environ.items() if k not in (*MALLOC_ENV, ALLOCATOR_ENV)}
    res = subprocess.run(
        [sys.executable, "-c", PROBE, mode],
        cwd=ROOT,
        env={**clean, "OMP_NUM_THREADS": "1", **env},
        capture_output=True,
        text=True,
        timeout=300,  # a hang guard
    )
    assert res.returncode == 0, res.stderr[-2000:]
    return json.loads(res.stdout.strip().splitlines()[-1])


def test_freed_memory_is_kept_unless_the_user_chose_otherwise():
    mib64 = 64 * 2**20
    # glibc's default: the large tensor is a fresh mmap (handed back on free)
    assert probe("default")["mmapped"] >= mib64
    kept = probe("keep")
    assert kept["done"] and "kept for reuse" in kept["done"]
    assert kept["mmapped"] == 0  # from the heap, which keeps what is freed
    # the user's choice wins: DARTS_CPU_ALLOCATOR=glibc, or a setting of glibc's own
    for env in ({ALLOCATOR_ENV: "glibc"}, {"MALLOC_MMAP_MAX_": "65536"}):
        left = probe("keep", **env)
        assert left["done"] is None and left["mmapped"] >= mib64, env


def test_an_unknown_allocator_choice_is_refused_in_one_line(tmp_path):
    env = {**os.environ, ALLOCATOR_ENV: "jemalloc", "OMP_NUM_THREADS": "1"}
    res = subprocess.run(
        [sys.executable, os.path.join(ROOT, "search.py"), "--name", "a", "--dataset", "digits"],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,  # a hang guard
    )
    assert res.returncode == 2
    assert res.stderr.count("\n") == 1
    assert "DARTS_CPU_ALLOCATOR must be keep or glibc, got 'jemalloc'" in res.stderr
    assert not (tmp_path / "searchs").exists()  # refused before anything is written
