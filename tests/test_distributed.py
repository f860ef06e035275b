"""DDP on the CPU (gloo): torchrun and the --gpus self-launch, for search and augment."""

import json
import os
import subprocess
import sys

import pytest
import torch
from conftest import ROOT, run_script

import search
from config import SearchConfig
from distributed import DistInfo

TINY_SEARCH = [
    "--dataset",
    "digits",
    "--epochs",
    "1",
    "--layers",
    "3",
    "--init_channels",
    "4",
    "--nodes",
    "2",
    "--batch_size",
    "64",
    "--workers",
    "0",
]
TINY_AUGMENT = [
    "--dataset",
    "digits",
    "--genotype",
    "DARTS_V2",
    "--epochs",
    "1",
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
# One thread per process: two processes of two OpenMP threads each on two cores spin-wait.
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}


def torchrun(script, *args, cwd):
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc_per_node=2",
        os.path.join(ROOT, script),
        *args,
    ]
    return subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, timeout=600, env=ENV)


def test_each_process_gets_its_own_equal_shard():
    cfg = SearchConfig(name="x", dataset="digits", batch_size=16, workers=0, select_portion=0.1)
    shards = []
    for rank in range(2):
        trn, val, sel, _ = search.make_loaders(cfg, pin=False, dist_info=DistInfo(rank, 2, rank))
        shards.append(
            (set(trn.sampler.indices), set(val.sampler.indices), set(sel.dataset.indices))
        )
        assert len(trn) == len(shards[0][0]) // 16 + (len(shards[0][0]) % 16 > 0)
    (t0, v0, s0), (t1, v1, s1) = shards
    assert not t0 & t1 and not v0 & v1 and not s0 & s1  # disjoint across processes
    assert len(t0) == len(t1) and len(v0) == len(v1)  # same number of steps everywhere
    assert not (t0 | t1) & (v0 | v1)  # weights and alphas never share an image
    single, *_ = search.make_loaders(cfg, pin=False)
    assert t0 | t1 <= set(single.sampler.indices)


@pytest.mark.slow
def test_two_process_search_with_torchrun(tmp_path):
    res = torchrun("search.py", "--name", "ddp", *TINY_SEARCH, "--first_order", cwd=tmp_path)
    assert res.returncode == 0, res.stderr[-3000:]
    assert res.stdout.count("Final genotype = Genotype(") == 1  # only the first process prints
    log = (tmp_path / "searchs" / "ddp" / "search.log").read_text()
    assert "DDP: weights, alphas and BN statistics are identical on the 2 processes" in log
    assert (tmp_path / "searchs" / "ddp" / "genotype.txt").exists()


@pytest.mark.slow
def test_two_process_second_order_search_keeps_replicas_identical(tmp_path):
    res = torchrun("search.py", "--name", "ddp2", *TINY_SEARCH, "--batch_size", "128", cwd=tmp_path)
    assert res.returncode == 0, res.stderr[-3000:]
    log = (tmp_path / "searchs" / "ddp2" / "search.log").read_text()
    assert "DDP: weights, alphas and BN statistics are identical on the 2 processes" in log


@pytest.mark.slow
@pytest.mark.parametrize("launch", ["torchrun", "gpus-flag"])
def test_two_process_augment_tests_every_image_once(launch, tmp_path):
    if launch == "torchrun":
        res = torchrun("augment.py", "--name", "ddp", *TINY_AUGMENT, cwd=tmp_path)
    else:  # the --gpus self-launch; --device cpu makes it start CPU processes
        res = subprocess.run(
            [
                sys.executable,
                os.path.join(ROOT, "augment.py"),
                "--name",
                "ddp",
                *TINY_AUGMENT,
                "--device",
                "cpu",
                "--gpus",
                "0,1",
            ],
            cwd=tmp_path,
            capture_output=True,
            text=True,
            timeout=600,
            env=ENV,
        )
    assert res.returncode == 0, res.stderr[-3000:]
    run = tmp_path / "augments" / "ddp"
    rows = [json.loads(ln) for ln in (run / "metrics.jsonl").read_text().splitlines()]
    from preproc import get_dataset

    n_test = len(get_dataset("digits", "", train=False))
    assert rows[-1]["test_count"] == n_test  # every test image counted once
    log = (run / "augment.log").read_text()
    assert "DDP: weights and BN statistics are identical on the 2 processes" in log
    # the accuracy over the shards equals one process evaluating the whole test set
    res = run_script(
        "evaluate.py", "--checkpoint", str(run / "best.pth.tar"), "--workers", "0", cwd=tmp_path
    )
    assert res.returncode == 0, res.stderr
    top1 = float(res.stdout.split("top1 ")[1].split("%")[0]) / 100
    assert top1 == pytest.approx(rows[-1]["test_top1"], abs=5e-5)
    state = torch.load(run / "checkpoint.pth.tar", weights_only=True)
    assert state["epoch"] == 1


@pytest.mark.slow
def test_two_process_augment_on_an_image_folder(tmp_path):
    """DDP with an image folder, loader workers and pinned memory asked for (a no-op on the CPU):
    every val image counted once, and evaluate.py agrees with the sharded figure."""
    from datasets_fakes import write_image_folder

    root = str(tmp_path / "images")
    write_image_folder(root)
    args = ["--name", "f", "--dataset", "folder", "--data_path", root, "--image_size", "16"]
    args += ["--genotype", "DARTS_V2", "--epochs", "1", "--layers", "3", "--init_channels", "4"]
    args += ["--batch_size", "4", "--workers", "2", "--cutout_length", "4"]
    res = torchrun("augment.py", *args, cwd=tmp_path)
    assert res.returncode == 0, res.stderr[-3000:]
    run = tmp_path / "augments" / "f"
    rows = [json.loads(ln) for ln in (run / "metrics.jsonl").read_text().splitlines()]
    assert rows[-1]["test_count"] == 6  # 3 classes x 2 val images, each counted once
    log = (run / "augment.log").read_text()
    assert "DDP: weights and BN statistics are identical on the 2 processes" in log
    res = run_script("evaluate.py", "--checkpoint", str(run / "checkpoint.pth.tar"), cwd=tmp_path)
    assert res.returncode == 0, res.stderr
    top1 = float(res.stdout.split("top1 ")[1].split("%")[0]) / 100
    assert top1 == pytest.approx(rows[-1]["test_top1"], abs=5e-5)


def test_all_reduce_mean_averages_every_tensor_through_one_flat_buffer(monkeypatch):
    """In-process: the collective is patched to add a second process's values. Every tensor
    (of any shape, channels-last included) becomes the mean, through one all_reduce call."""
    import distributed

    torch.manual_seed(0)
    mine = [
        torch.randn(3, 2),
        torch.randn(5),
        torch.randn(2, 3, 4, 4).to(memory_format=torch.channels_last),
    ]
    other = [torch.randn_like(t) for t in mine]
    expected = [(a + b) / 2 for a, b in zip(mine, other)]
    calls = []

    def all_reduce(flat):
        calls.append(flat.numel())
        flat += torch.cat([t.reshape(-1) for t in other])

    monkeypatch.setattr(distributed, "world_size", lambda: 2)
    monkeypatch.setattr(distributed.dist, "all_reduce", all_reduce)
    monkeypatch.setattr(distributed.dist, "get_world_size", lambda: 2)
    tensors = [t.clone() for t in mine]
    distributed.all_reduce_mean(tensors)
    assert calls == [sum(t.numel() for t in mine)]
    for t, e in zip(tensors, expected):
        assert t.shape == e.shape
        torch.testing.assert_close(t, e, rtol=0, atol=1e-7)
