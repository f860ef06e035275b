"""Bad and unusual inputs, as a careful user or an attacker would give them to the scripts:
each gets one clear line (exit status 2, nothing written) or, for a bad file in a good image
folder, one warning naming it while the run goes on."""

from __future__ import annotations

import os

import pytest
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
