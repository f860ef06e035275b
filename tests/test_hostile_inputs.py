"""Bad and unusual inputs, as a careful user or an attacker would give them to the scripts:
each gets one clear line (exit status 2, nothing written) or, for a bad file in a good image
folder, one warning naming it while the run goes on."""

from __future__ import annotations

import os

import pytest
from conftest import run_script
from datasets_fakes import write_image_folder

import augment
import search

DIGITS = ["--dataset", "digits", "--epochs", "1", "--workers", "0"]
TINY = ["--layers", "3", "--init_channels", "4"]
AUG = [*DIGITS, *TINY, "--genotype", "DARTS_V2"]


def folder_args(root, *extra):
    """A tiny run on the image folder at ``root``: 8x8 images, batches of 4, no workers."""
    args = ["--dataset", "folder", "--data_path", str(root), "--image_size", "8"]
    return [*args, "--epochs", "1", "--batch_size", "4", "--workers", "0", *TINY, *extra]


def refused(main, argv, tmp_path, capsys, message):
    """``main(argv)`` run in ``tmp_path`` exits 2 with one line holding ``message`` and writes
    nothing there. Returns the line."""
    before = set(os.listdir(tmp_path))
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and ": error: " in err and message in err, err
    assert set(os.listdir(tmp_path)) == before  # no run folder, no log, no lock
    return err


@pytest.mark.parametrize("name", [" ", "   ", "", "\t"])
@pytest.mark.parametrize("main", [search.main, augment.main], ids=["search", "augment"])
def test_a_name_of_only_spaces_is_refused(name, main, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    argv = ["--name", name, *AUG] if main is augment.main else ["--name", name, *DIGITS, *TINY]
    refused(main, argv, tmp_path, capsys, "--name must be a plain folder name")


def test_batch_size_1_with_the_auxiliary_head_is_refused(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    argv = ["--name", "b", *AUG, "--batch_size", "1"]
    refused(augment.main, argv, tmp_path, capsys, "--batch_size 1 cannot train the auxiliary")


def test_fp16_on_a_cpu_is_refused_before_the_run_folder_is_written(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    argv = ["--name", "a", *AUG, "--amp", "fp16", "--device", "cpu"]
    refused(augment.main, argv, tmp_path, capsys, "--amp fp16 needs a CUDA device")


@pytest.mark.parametrize("main", [search.main, augment.main], ids=["search", "augment"])
def test_one_class_is_refused_before_anything_is_written(main, tmp_path, monkeypatch, capsys):
    write_image_folder(str(tmp_path / "one"), n_classes=1, per_class=2)
    monkeypatch.chdir(tmp_path)
    extra = ["--genotype", "DARTS_V2"] if main is augment.main else []
    argv = ["--name", "c", *folder_args(tmp_path / "one", *extra)]
    refused(main, argv, tmp_path, capsys, "holds one class folder (class_0)")


# --------------------------------------------------------------------------------------------
# Weights files: pickled code, a raw pickle, weights that are not finite
# --------------------------------------------------------------------------------------------
class _Code:
    def __reduce__(self):
        return (os.system, ("touch PWNED",))


def _tiny_checkpoint(path, nan=False):
    """An augment checkpoint of this project for the tiny digits network."""
    import torch

    import genotypes as gt
    from config import AugmentConfig
    from models.augment_cnn import AugmentCNN

    model = AugmentCNN(8, 1, 4, 10, 3, False, gt.DARTS_V2)
    sd = model.state_dict()
    if nan:
        sd["linear.weight"][0, 0] = float("nan")
    cfg = AugmentConfig(name="n", dataset="digits", genotype="DARTS_V2", init_channels=4)
    cfg.layers, cfg.aux_weight, cfg.workers = 3, 0.0, 0
    state = {"model": sd, "config": cfg.to_dict(), "genotype": gt.to_str(gt.DARTS_V2)}
    torch.save(state, path)


def _write_code(kind, path):
    import pickle

    import torch

    if kind == "torch.save":
        torch.save({"model": _Code(), "config": {}}, path)
    else:  # a plain pickle.dump, protocol 4 (not torch.save's format)
        with open(path, "wb") as f:
            pickle.dump({"model": _Code(), "config": {}}, f, protocol=4)


@pytest.mark.parametrize("kind", ["torch.save", "raw pickle"])
@pytest.mark.parametrize("script", ["evaluate --checkpoint", "evaluate --official", "init_from"])
def test_pickled_code_is_refused_in_one_line_without_advice(
    kind, script, tmp_path, monkeypatch, capsys
):
    import warnings

    import evaluate

    monkeypatch.chdir(tmp_path)
    _write_code(kind, "evil.pt")
    argv = {
        "evaluate --checkpoint": ["--checkpoint", "evil.pt"],
        "evaluate --official": ["--official", "evil.pt", "--genotype", "DARTS_V2"],
        "init_from": ["--name", "e", *AUG, "--init_from", "evil.pt"],
    }[script]
    main = augment.main if script == "init_from" else evaluate.main
    if script == "evaluate --official":
        argv += ["--dataset", "digits"]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        line = refused(main, argv, tmp_path, capsys, "evil.pt")
    assert not caught, [str(w.message) for w in caught]  # torch's protocol warning: not shown
    assert "weights_only" not in line and "()" not in line and "damaged" not in line
    if kind == "torch.save":
        assert "evil.pt holds pickled code (posix.system): refused" in line
    else:
        assert "evil.pt is a pickle that the tensor-only reader cannot follow" in line
    assert "refused" in line and not os.path.exists("PWNED")


@pytest.mark.parametrize("how", ["--checkpoint", "--official"])
def test_evaluating_weights_that_are_not_finite_warns_once(how, tmp_path, monkeypatch, capsys):
    import evaluate

    monkeypatch.chdir(tmp_path)
    _tiny_checkpoint("nan.pt", nan=True)
    argv = ["--checkpoint", "nan.pt"]
    if how == "--official":
        import torch

        torch.save(torch.load("nan.pt", weights_only=True)["model"], "nan_sd.pt")
        argv = ["--official", "nan_sd.pt", "--genotype", "DARTS_V2", "--dataset", "digits"]
        argv += ["--init_channels", "4", "--layers", "3"]
    assert evaluate.main([*argv, "--workers", "0"]) == 0
    captured = capsys.readouterr()
    assert "loss nan" in captured.out
    warning = [ln for ln in captured.err.splitlines() if "WARNING" in ln]
    assert len(warning) == 1 and "are not finite" in warning[0] and "linear.weight" in warning[0]
    _tiny_checkpoint("ok.pt")
    assert evaluate.main(["--checkpoint", "ok.pt", "--workers", "0"]) == 0
    assert "WARNING" not in capsys.readouterr().err


def test_init_from_weights_that_are_not_finite_warns(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    _tiny_checkpoint("nan.pt", nan=True)
    argv = ["--name", "n", *AUG, "--init_from", "nan.pt", "--aux_weight", "0"]
    augment.main(argv)  # the NaN loss then stops it at its first step, as it should
    err = capsys.readouterr().err
    warning = [ln for ln in err.splitlines() if "WARNING" in ln]
    assert len(warning) == 1 and "nan.pt are not finite" in warning[0], err


# --------------------------------------------------------------------------------------------
# Image modes beyond 8 bits
# --------------------------------------------------------------------------------------------
GRADIENT = [0, 8550, 17100, 25650, 34200, 42750, 51300, 59850]  # one 8-pixel row, 0..59,850

# mode: (file suffix, pixel values, the 8-bit values they become)
STRETCHED = [0, 36, 73, 109, 146, 182, 219, 255]  # a linear ramp's min..max over 0..255
# (F in [0, 1]: 234.7 is 59,850 / 255)
WIDE_MODES = {
    "I;16": (".png", GRADIENT, [round(v / 257) for v in GRADIENT]),
    "I": (".tif", GRADIENT, [round(v / 257) for v in GRADIENT]),
    "I beyond 16 bits": (".tif", [v * 100 - 10**6 for v in GRADIENT], STRETCHED),
    "F in [0, 1]": (".tif", [v / 59850 for v in GRADIENT], [round(v / 234.7) for v in GRADIENT]),
    "F": (".tif", [v / 10 - 100 for v in GRADIENT], STRETCHED),
}  # fmt: skip


def write_mode_folder(root, mode):
    """Two classes of two 8x8 images each (train and val), every row the mode's gradient."""
    import numpy as np
    from PIL import Image

    suffix, values, _ = WIDE_MODES[mode]
    dtype = {"I;16": np.uint16, "I": np.int32, "F": np.float32}[mode.split()[0]]
    pixels = np.tile(np.array(values, dtype=dtype), (8, 1))
    for split in ("train", "val"):
        for c in range(2):
            folder = root / split / f"class_{c}"
            folder.mkdir(parents=True)
            for i in range(2):
                img = Image.fromarray(pixels)
                assert img.mode == mode.split()[0]
                img.save(folder / f"img_{i}{suffix}")


@pytest.mark.parametrize("mode", list(WIDE_MODES))
def test_wide_image_modes_are_scaled_to_8_bits(mode, tmp_path, monkeypatch, capsys):
    """The mean that --normalize auto computes from such images, in the run's config, is that of
    the scaled values (PIL's conversion alone clipped 16-bit images to white, floats to black)."""
    import json

    write_mode_folder(tmp_path / "wide", mode)
    monkeypatch.chdir(tmp_path)
    argv = ["--name", "m", *folder_args(tmp_path / "wide", "--first_order", "--nodes", "2")]
    assert search.main(argv) == 0, capsys.readouterr().err
    assert "WARNING" not in capsys.readouterr().err
    config = json.loads((tmp_path / "searchs" / "m" / "config.json").read_text())
    mean = [float(v) for v in config["normalize"].split("/")[0].split(",")]
    expected = sum(WIDE_MODES[mode][2]) / 8 / 255
    assert mean == pytest.approx([expected] * 3, abs=1e-4)


# --------------------------------------------------------------------------------------------
# Unreadable files
# --------------------------------------------------------------------------------------------
@pytest.mark.slow
def test_each_bad_file_is_named_once_per_run(tmp_path):
    """The --normalize auto pass, training (a new worker every epoch) and the held-out split
    all meet the truncated JPEG and notes.txt: each is named once; the log's counts stay."""
    bad = write_image_folder(str(tmp_path / "img"), per_class=3)
    argv = ["--name", "w", *folder_args(tmp_path / "img", "--genotype", "DARTS_V2")]  # last wins:
    res = run_script(
        "augment.py", *argv, "--epochs", "2", "--workers", "1", "--val_portion", "0.3",
        cwd=tmp_path, timeout=300,
    )  # fmt: skip
    assert res.returncode == 0, res.stderr
    for path in (bad["truncated"], bad["not_image"]):
        assert res.stderr.count(f"WARNING: skipped {path}") == 1, res.stderr
    log = (tmp_path / "augments" / "w" / "augment.log").read_text()
    counts = [ln.split("so far: ")[1] for ln in log.splitlines() if "skipped so far" in ln]
    assert counts[0].startswith("1 not images, 1 unreadable reads")  # epoch 1, training
    assert counts[2].startswith("1 not images, 2 unreadable reads")  # epoch 2: counted again


# --------------------------------------------------------------------------------------------
# Decompression bombs, and loader workers that die
# --------------------------------------------------------------------------------------------
def write_png_header(path, w, h):
    """A PNG that says it is ``w`` x ``h`` (1-bit grayscale) and holds almost no data: PIL
    meets it as it meets ``Image.new('1', (w, h)).save(path)``, at its header, without the
    memory that writing a real one takes."""
    import struct
    import zlib

    def chunk(kind, data):
        return (
            struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
        )

    ihdr = struct.pack(">IIBBBBB", w, h, 1, 0, 0, 0, 0)
    body = chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 16)) + chunk(b"IEND", b"")
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + body)


def bomb_folder(tmp_path):
    root = tmp_path / "img"
    write_image_folder(str(root), per_class=3)
    bomb, big = root / "train" / "class_1" / "bomb.png", root / "train" / "class_2" / "big.png"
    write_png_header(bomb, 30000, 30000)  # over twice PIL's limit: PIL raises
    write_png_header(big, 10000, 10000)  # over the limit, under twice it: PIL only warns
    return root, bomb, big


def assert_bombs_named_once(err, bomb, big):
    for path, size in ((bomb, "30000x30000 = 900,000,000 pixels"), (big, "10000x10000")):
        lines = [ln for ln in err.splitlines() if str(path) in ln]
        assert len(lines) == 1 and lines[0].startswith("WARNING: skipped "), err
        assert size in lines[0] and "decompression bombs" in lines[0]
    assert "Traceback" not in err


@pytest.mark.parametrize("normalize", ["auto", "imagenet"])
def test_a_decompression_bomb_is_skipped_with_a_warning(normalize, tmp_path, monkeypatch, capsys):
    import torch

    root, bomb, big = bomb_folder(tmp_path)
    monkeypatch.chdir(tmp_path)
    argv = ["--name", "b", *folder_args(root, "--genotype", "DARTS_V2", "--normalize", normalize)]
    assert augment.main(argv) == 0
    assert_bombs_named_once(capsys.readouterr().err, bomb, big)
    state = torch.load(tmp_path / "augments" / "b" / "checkpoint.pth.tar", weights_only=True)
    assert state["epoch"] == 1


@pytest.mark.slow
def test_a_decompression_bomb_with_loader_workers_is_skipped(tmp_path):
    root, bomb, big = bomb_folder(tmp_path)
    argv = ["--name", "s", *folder_args(root, "--first_order", "--nodes", "2", "--workers", "1")]
    res = run_script("search.py", *argv, cwd=tmp_path, timeout=300)  # a hang guard (run: ~7 s)
    assert res.returncode == 0, res.stderr
    assert_bombs_named_once(res.stderr, bomb, big)
    assert (tmp_path / "searchs" / "s" / "checkpoint.pth.tar").is_file()


def _children(pid):
    with open(f"/proc/{pid}/task/{pid}/children") as f:
        return {int(c) for c in f.read().split()}


@pytest.mark.slow
@pytest.mark.skipif(not os.path.exists("/proc/self/task"), reason="needs Linux's /proc")
def test_a_loader_worker_that_dies_ends_the_run_with_one_line(tmp_path):
    """A training worker killed (as the out-of-memory killer does) while epoch 2 runs: the run
    ends with one line and exit status 1, and epoch 1's checkpoint is intact. It used to print
    torch's traceback and then wait forever on the other worker at exit."""
    import signal
    import subprocess
    import sys
    import time

    import torch
    from conftest import ROOT

    argv = ["--name", "k", *AUG, "--epochs", "30", "--batch_size", "32", "--workers", "2"]
    proc = subprocess.Popen(
        [sys.executable, os.path.join(ROOT, "augment.py"), *argv],
        cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )  # fmt: skip
    try:
        log = tmp_path / "augments" / "k" / "augment.log"
        while not (log.exists() and "Epoch 1 done" in log.read_text()):
            assert proc.poll() is None, proc.communicate()
            time.sleep(0.02)
        # The main process frozen while its children are listed: those of epoch 1's evaluation
        # stay (persistent); a new one is a training worker of epoch 2.
        proc.send_signal(signal.SIGSTOP)
        evaluation = _children(proc.pid)
        proc.send_signal(signal.SIGCONT)
        killed = None
        while killed is None:
            assert proc.poll() is None, proc.communicate()
            proc.send_signal(signal.SIGSTOP)
            new = _children(proc.pid) - evaluation
            if new:
                killed = min(new)
                os.kill(killed, signal.SIGKILL)
            proc.send_signal(signal.SIGCONT)
            time.sleep(0.01)
        out, err = proc.communicate(timeout=600)  # a hang guard only (the run: ~17 s)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    assert proc.returncode == 1, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("augment.py: error: a data-loader worker died")
    assert f"pid(s) {killed}" in lines[0] or f"pid {killed}" in lines[0]
    assert "checkpoint.pth.tar; continue with: python augment.py" in lines[0]
    state = torch.load(tmp_path / "augments" / "k" / "checkpoint.pth.tar", weights_only=True)
    assert state["epoch"] >= 1 and all(torch.isfinite(v).all() for v in state["model"].values())


@pytest.mark.parametrize("limit", ["1000", "0"])
def test_max_image_pixels_sets_the_limit(limit, tmp_path, monkeypatch, capsys):
    """--max_image_pixels 1000 skips a 40x40 image, naming the flag; the default reads it."""
    from PIL import Image

    import preproc

    write_mode_folder(tmp_path / "img", "I;16")
    big = tmp_path / "img" / "train" / "class_0" / "big.png"
    Image.new("L", (40, 40), 128).save(big)
    monkeypatch.chdir(tmp_path)
    argv = ["--name", "p", *folder_args(tmp_path / "img", "--genotype", "DARTS_V2")]
    try:
        assert augment.main([*argv, "--max_image_pixels", limit]) == 0
    finally:
        preproc.set_max_image_pixels(0)  # PIL's own limit for the tests that follow
    err = capsys.readouterr().err
    lines = [ln for ln in err.splitlines() if "WARNING: skipped" in ln]
    if limit == "0":
        assert not lines, err
    else:
        assert len(lines) == 1 and str(big) in lines[0] and "40x40 = 1,600 pixels" in lines[0]
        assert "more than the 1,000 read" in lines[0] and "--max_image_pixels" in lines[0]


def test_a_last_batch_of_one_image_is_dropped(tmp_path, monkeypatch, capsys):
    """9 training images in batches of 4: the last batch, of one image, would fail in the
    auxiliary head's BatchNorm; it is dropped (2 steps), the run ends well."""
    write_image_folder(str(tmp_path / "img"), per_class=3)  # 9 images and a truncated JPEG
    (tmp_path / "img" / "train" / "class_0" / "truncated.jpg").unlink()
    monkeypatch.chdir(tmp_path)
    argv = ["--name", "o", *folder_args(tmp_path / "img", "--genotype", "DARTS_V2")]
    assert augment.main([*argv, "--print_freq", "1"]) == 0, capsys.readouterr().err
    log = (tmp_path / "augments" / "o" / "augment.log").read_text()
    assert "step 001/001" in log and "step 002" not in log
