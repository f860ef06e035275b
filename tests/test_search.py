"""search.py end to end: what a user runs and what it promises to write."""

import io
import json
import os
import platform
import struct
import sys

import numpy as np
import pytest
import torch
from conftest import needs_dot, run_script
from PIL import Image

import genotypes as gt
import search
import utils
import visualize
from models.search_cnn import SearchCNNController

TINY = ["--layers", "3", "--init_channels", "4", "--workers", "0"]


@pytest.mark.slow
@needs_dot
def test_search_cli_on_digits_writes_everything(tmp_path):
    res = run_script(
        "search.py",
        "--name",
        "demo",
        "--dataset",
        "digits",
        "--epochs",
        "2",
        "--batch_size",
        "128",
        "--print_freq",
        "2",
        "--select_portion",
        "0.1",  # the held-out split that ranks the epochs (the default 0 is the paper's)
        *TINY,
        cwd=tmp_path,
    )
    assert res.returncode == 0, res.stderr
    run = tmp_path / "searchs" / "demo"
    final = [ln for ln in res.stdout.splitlines() if ln.startswith("Final genotype = ")]
    best = [ln for ln in res.stdout.splitlines() if ln.startswith("Best genotype = ")]
    assert len(final) == 1 and len(best) == 1
    g_final = gt.from_str(final[0].split(" = ", 1)[1])
    assert gt.from_str(best[0].split(" = ", 1)[1]).normal  # parses
    assert gt.load(str(run / "genotype.txt")) == g_final

    log = (run / "search.log").read_text()
    assert "Held-out selection split" in log and "Train: [  2/2]" in log
    # a CPU run keeps freed memory for reuse (docs/scale.md), unless the user set glibc's own
    glibc = sys.platform == "linux" and platform.libc_ver()[0] == "glibc"
    chosen = any(name in os.environ for name in utils.MALLOC_ENV)
    chosen |= os.environ.get(utils.ALLOCATOR_ENV) == "glibc"
    assert ("CPU allocator: freed memory is kept for reuse" in log) == (glibc and not chosen)
    assert json.loads((run / "config.json").read_text())["epochs"] == 2
    # tensorboard: each epoch's alpha heatmaps, with the pixels of their PNGs
    images = tensorboard_images(run / "tb")
    assert sorted(images) == [(f"alphas/{k}", e) for k in ("normal", "reduce") for e in (1, 2)]
    for (tag, epoch), png in images.items():
        kind = tag.split("/")[1]
        drawn = run / "plots" / f"epoch_{epoch:03d}-alphas-{kind}.png"
        logged = visualize.read_png(io.BytesIO(png))
        assert np.array_equal(logged, visualize.read_png(str(drawn))), (tag, epoch)

    alphas = [json.loads(ln) for ln in (run / "alphas.jsonl").read_text().splitlines()]
    assert [a["epoch"] for a in alphas] == [1, 2]
    for kind in ("normal", "reduce"):
        assert [len(node) for node in alphas[-1][kind]] == [2, 3, 4, 5]
        for node in alphas[-1][kind]:
            for row in node:
                assert abs(sum(row) - 1.0) < 1e-5  # softmaxed
    history = (run / "genotypes.txt").read_text().splitlines()
    assert len(history) == 2 and history[1] == f"epoch 2: {gt.to_str(g_final)}"
    for epoch in (1, 2):
        for kind in ("normal", "reduce"):
            png = run / "plots" / f"epoch_{epoch:03d}-{kind}.png"
            assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    # what a user watches: GIFs (a frame per epoch), heatmaps, op weights, curves, metrics
    for kind in ("normal", "reduce"):
        with Image.open(run / "plots" / f"{kind}.gif") as gif:
            assert gif.n_frames == 2
        with Image.open(run / "plots" / f"epoch_002-alphas-{kind}.png") as img:
            assert len(img.convert("RGB").getcolors(1 << 20)) > 10  # not blank
    for name in ("curves.png", "op_weights.png"):
        with Image.open(run / "plots" / name) as img:
            assert len(img.convert("RGB").getcolors(1 << 20)) > 10
    metrics = [json.loads(ln) for ln in (run / "metrics.jsonl").read_text().splitlines()]
    assert [m["epoch"] for m in metrics] == [1, 2]
    assert metrics[1]["genotype"] == gt.to_str(g_final)
    for key in ("train_loss", "train_top1", "train_top5", "val_loss", "val_top1", "lr", "time"):
        assert isinstance(metrics[1][key], float), key
    assert f"top1 {metrics[1]['val_top1']:.2%}" in log  # the file holds what the log says

    ckpt = torch.load(run / "checkpoint.pth.tar", weights_only=True)
    assert ckpt["epoch"] == 2 and ckpt["history"][-1]["genotype"] == gt.to_str(g_final)
    assert "alpha_normal.0" in ckpt["model"] and "net.stem.0.weight" in ckpt["model"]
    for key in ("w_optim", "alpha_optim", "scheduler", "config", "best_top1", "rng"):
        assert key in ckpt


def tensorboard_images(folder):
    """{(tag, step): PNG bytes} of the image summaries in the tensorboard event files of
    ``folder``, read record by record (TFRecord: length, its CRC, the Event, its CRC)."""
    from tensorboardX.proto import event_pb2

    images = {}
    for name in sorted(os.listdir(folder)):
        data = (folder / name).read_bytes()
        at = 0
        while at < len(data):
            (length,) = struct.unpack("<Q", data[at : at + 8])
            event = event_pb2.Event.FromString(data[at + 12 : at + 12 + length])
            at += 12 + length + 4
            for value in event.summary.value:
                if value.HasField("image"):
                    images[(value.tag, event.step)] = value.image.encoded_image_string
    return images


@pytest.mark.slow
@pytest.mark.parametrize("dataset", ["cifar10", "mnist", "fashionmnist"])
def test_search_runs_on_every_torchvision_dataset(
    dataset, fake_data, tmp_path, monkeypatch, capsys
):
    import visualize

    monkeypatch.chdir(tmp_path)
    # Without graphviz's `dot` the search goes on, with one warning.
    monkeypatch.setattr(visualize, "dot_available", lambda: False)
    code = search.main(
        [
            "--name",
            dataset,
            "--dataset",
            dataset,
            "--data_path",
            fake_data,
            "--epochs",
            "1",
            "--batch_size",
            "8",
            "--first_order",
            *TINY,
        ]
    )
    out = capsys.readouterr().out
    assert code == 0
    assert "plots are skipped" in out
    assert "Final genotype = Genotype(" in out
    # The paper's split (the default --select_portion 0) has no split to pick a "best" epoch.
    assert "Best genotype" not in out and "the final genotype is the result" in out
    assert (tmp_path / "searchs" / dataset / "genotype.txt").exists()
    plots = tmp_path / "searchs" / dataset / "plots"
    assert not (plots / "epoch_001-normal.png").exists() and not (plots / "normal.gif").exists()
    assert (plots / "epoch_001-alphas-normal.png").exists()  # matplotlib needs no `dot`


def test_help_prints_every_default(capsys):
    with pytest.raises(SystemExit) as e:
        search.main(["--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    for flag, default in [
        ("--batch_size", "64"),
        ("--w_lr", "0.025"),
        ("--w_lr_min", "0.001"),
        ("--alpha_lr", "0.0003"),
        ("--alpha_weight_decay", "0.001"),
        ("--epochs", "50"),
        ("--init_channels", "16"),
        ("--layers", "8"),
        ("--seed", "2"),
        ("--workers", "4"),
        ("--train_portion", "0.5"),
        ("--data_path", "./data/"),
        ("--device", "auto"),
    ]:
        assert flag in out
        assert (
            f"(default: {default})"
            in out.split(flag, 1)[1].split("--", 1)[0].replace("\n", " ").replace("  ", " ")
            or f"default: {default}" in out
        ), flag


@pytest.mark.parametrize(
    "args, message",
    [
        (["--dataset", "svhn"], "--dataset: invalid choice: 'svhn' (choose from 'cifar10', "),
        (["--dataset", "mnist", "--data_path", "EMPTY"], "MNIST"),
        (["--dataset", "digits", "--train_portion", "1.5"], "--train_portion must be in (0, 1)"),
        (["--dataset", "digits", "--layers", "2"], "--layers must be >= 3"),
        (["--dataset", "digits", "--init_channels", "5"], "--init_channels must be even"),
        (["--dataset", "digits", "--batch_size", "0"], "--batch_size must be positive"),
        (["--dataset", "digits", "--workers", "-1"], "--workers must be >= 0"),
        (["--dataset", "digits", "--gpus", "x"], "--gpus must be a comma list"),
        (["--dataset", "digits", "--device", "tpu"], "--device must be"),
        (
            ["--dataset", "digits", "--hessian", "approx"],
            "--hessian: invalid choice: 'approx' (choose from 'finite', 'exact')",
        ),
        (["--dataset", "digits", "--memory_format", "nhwc"], "--memory_format: invalid choice"),
        (["--dataset", "digits", "--layers", "x"], "--layers: invalid int value: 'x'"),
        (["--dataset", "digits", "--no_such_flag"], "unrecognized arguments: --no_such_flag"),
        (["--dataset", "digits", "--device", "cuda"], "no CUDA GPU is visible"),
        (["--dataset", "digits", "--w_lr", "nan"], "--w_lr must be a finite number, got nan"),
        (["--dataset", "digits", "--alpha_lr", "inf"], "--alpha_lr must be a finite number"),
        (["--dataset", "digits", "--nodes", "65"], "--nodes must be at most 64"),
    ],
)
def test_bad_input_gives_one_line_and_exit_2(args, message, tmp_path, monkeypatch, capsys):
    if "cuda" in args and torch.cuda.is_available():
        pytest.skip("this machine has a CUDA GPU, so --device cuda is valid here")
    monkeypatch.chdir(tmp_path)
    args = [a.replace("EMPTY", str(tmp_path / "empty")) for a in args]
    code = search.main(["--name", "x", "--epochs", "1", *TINY, *args])
    err = capsys.readouterr().err
    assert code == 2
    assert err.startswith("search.py: error: ") and message in err
    assert err.count("\n") == 1
    assert not (tmp_path / "searchs").exists() or "--device" in args


def test_unwritable_output_folder(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "searchs").write_text("a file where the folder should be")
    code = search.main(["--name", "x", "--dataset", "digits", *TINY])
    err = capsys.readouterr().err
    assert code == 2 and "cannot write to the output folder" in err and err.count("\n") == 1


def test_memory_format_changes_the_layout_not_the_search(fake_data, tmp_path, monkeypatch):
    """--memory_format channels_last (the default) runs the network NHWC, contiguous NCHW; the
    weights they train move alike, to float32 rounding. (CIFAR-shaped data: with one input
    channel, as in digits, the stem's weight has the same strides in both layouts.)

    What is compared is the epoch's update of the weights from their common initialisation: the
    float32 gradients of the two layouts differ by ~1e-3 (relative, docs/benchmarks.md; mostly
    ReLU and max-pool masks flipping at ties), so the updates may too, while the weights
    themselves agree to ~1e-5 only because the update is small. The alphas are held still
    (Adam at lr 0): Adam moves an alpha by ~lr whatever the size of its gradient, so a
    rounding-level difference would change the path, not only the last bits;
    tests/test_architect.py compares alpha gradients."""
    monkeypatch.chdir(tmp_path)
    runs = {}
    for fmt in ("channels_last", "contiguous"):
        args = ["--name", fmt, "--dataset", "cifar10", "--data_path", fake_data, "--epochs", "1"]
        args += ["--batch_size", "16", "--no_progress", "--memory_format", fmt]
        args += ["--alpha_lr", "0"]
        assert search.main([*args, *TINY]) == 0
        runs[fmt] = torch.load(
            tmp_path / "searchs" / fmt / "checkpoint.pth.tar", weights_only=True
        )["model"]
    stem = {fmt: state["net.stem.0.weight"] for fmt, state in runs.items()}
    assert stem["channels_last"].is_contiguous(memory_format=torch.channels_last)
    assert not stem["contiguous"].is_contiguous(memory_format=torch.channels_last)
    utils.set_seed(2)  # the runs' seed: their initial weights
    init = SearchCNNController(3, 4, 10, 3, torch.nn.CrossEntropyLoss()).state_dict()
    names = [k for k, v in runs["contiguous"].items() if k.endswith("weight") and "alpha" not in k]
    a, b = (torch.cat([(runs[fmt][k] - init[k]).flatten() for k in names]) for fmt in runs)
    assert b.norm() > 0
    assert (a - b).norm() / b.norm() < 1e-2
