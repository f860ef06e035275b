"""Tests for preproc.py: loading, normalisation, augmentation, Cutout, digits split, errors."""

from __future__ import annotations

import subprocess
import sys
from urllib.error import URLError

import numpy as np
import pytest
import torch
from conftest import ROOT
from datasets_fakes import (
    allow_fake_cifar10,
    fake_cifar10_arrays,
    fake_mnist_arrays,
    write_fake_cifar10,
    write_fake_mnist,
)
from torch.utils.data import DataLoader, Subset

import preproc
from preproc import Cutout, DataError, DatasetInfo, cutout_at, dataset_info, get_dataset

CIFAR_MEAN = np.array([0.4914, 0.4822, 0.4465], dtype=np.float32)
CIFAR_STD = np.array([0.2470, 0.2435, 0.2616], dtype=np.float32)

MNIST_LIKE = [("mnist", "MNIST", 0.1307, 0.3081), ("fashionmnist", "FashionMNIST", 0.2860, 0.3530)]


# ------------------------------------------------------------------------------------ info


def test_dataset_info_values():
    assert dataset_info("cifar10") == DatasetInfo(32, 3, 10)
    assert dataset_info("mnist") == DatasetInfo(28, 1, 10)
    assert dataset_info("fashionmnist") == DatasetInfo(28, 1, 10)
    assert dataset_info("digits") == DatasetInfo(8, 1, 10)
    assert set(preproc.DATASETS) == {
        "cifar10", "mnist", "fashionmnist", "digits", "imagenet", "folder"
    }  # fmt: skip


@pytest.mark.parametrize("call", [dataset_info, lambda n: get_dataset(n, "/nonexistent", True)])
def test_unknown_dataset_raises_one_line_error(call):
    with pytest.raises(DataError) as exc:
        call("foo")
    msg = str(exc.value)
    assert "\n" not in msg
    assert "'foo'" in msg
    assert "cifar10" in msg and "digits" in msg


# ------------------------------------------------------------------------------------ CIFAR-10


@pytest.fixture
def cifar_root(tmp_path, monkeypatch):
    write_fake_cifar10(str(tmp_path), n_train=20, n_test=10, seed=1)
    allow_fake_cifar10(monkeypatch)  # fake files cannot match torchvision's md5 sums
    return tmp_path


@pytest.mark.parametrize("train", [True, False])
def test_cifar_loads_and_normalises(cifar_root, train):
    x_train, y_train, x_test, y_test = fake_cifar10_arrays(20, 10, seed=1)
    raw_x, raw_y = (x_train, y_train) if train else (x_test, y_test)
    ds = get_dataset("cifar10", str(cifar_root), train=train, download=False)
    assert len(ds) == len(raw_y)
    for i in (0, len(ds) - 1):
        img, label = ds[i]
        assert img.shape == (3, 32, 32) and img.dtype == torch.float32
        assert isinstance(label, int) and label == raw_y[i]
        expected = (raw_x[i].astype(np.float32) / 255.0 - CIFAR_MEAN) / CIFAR_STD
        np.testing.assert_allclose(img.numpy(), expected.transpose(2, 0, 1), atol=1e-5)
    assert torch.equal(preproc.get_targets(ds), torch.as_tensor(raw_y))
    assert preproc.get_targets(ds).dtype == torch.long
    assert set(preproc.get_targets(ds).tolist()) <= set(range(10))


def test_cifar_augment_changes_images_keeps_shape(cifar_root):
    plain = get_dataset("cifar10", str(cifar_root), train=True, augment=False)[0][0]
    ds = get_dataset("cifar10", str(cifar_root), train=True, augment=True)
    torch.manual_seed(0)
    draws = [ds[0][0] for _ in range(8)]
    assert all(d.shape == (3, 32, 32) and d.dtype == torch.float32 for d in draws)
    # Random crop/flip: draws differ from each other and most differ from the plain image.
    assert any(not torch.equal(draws[0], d) for d in draws[1:])
    assert sum(not torch.equal(plain, d) for d in draws) >= 6


def test_cifar_cutout_in_pipeline(cifar_root):
    ds = get_dataset("cifar10", str(cifar_root), train=True, augment=True, cutout_length=16)
    torch.manual_seed(3)
    img = ds[0][0]
    zero_cols = (img == 0).all(dim=0)  # pixels zero in all 3 channels: the cut square
    assert 0 < int(zero_cols.sum()) <= 16 * 16
    # Without augment, cutout_length is ignored (evaluation pipeline is normalisation only).
    plain = get_dataset("cifar10", str(cifar_root), train=False, augment=False, cutout_length=16)
    assert int((plain[0][0] == 0).all(dim=0).sum()) == 0


def test_get_targets_of_subset(cifar_root):
    ds = get_dataset("cifar10", str(cifar_root), train=True)
    _, y_train, _, _ = fake_cifar10_arrays(20, 10, seed=1)
    sub = Subset(Subset(ds, [5, 3, 1, 0]), [1, 3])
    assert preproc.get_targets(sub).tolist() == [y_train[3], y_train[0]]


# ------------------------------------------------------------------------------------ MNIST-like


@pytest.mark.parametrize("name,folder,mean,std", MNIST_LIKE)
@pytest.mark.parametrize("train", [True, False])
def test_mnist_like_loads_and_normalises(tmp_path, name, folder, mean, std, train):
    write_fake_mnist(str(tmp_path), n_train=20, n_test=10, seed=2, folder=folder)
    x_train, y_train, x_test, y_test = fake_mnist_arrays(20, 10, seed=2)
    raw_x, raw_y = (x_train, y_train) if train else (x_test, y_test)
    ds = get_dataset(name, str(tmp_path), train=train, download=False)
    assert len(ds) == len(raw_y)
    img, label = ds[4]
    assert img.shape == (1, 28, 28) and img.dtype == torch.float32
    assert label == raw_y[4] and 0 <= label < 10
    expected = (raw_x[4].astype(np.float32) / 255.0 - mean) / std
    np.testing.assert_allclose(img[0].numpy(), expected, atol=1e-5)
    assert torch.equal(preproc.get_targets(ds), torch.as_tensor(raw_y))


@pytest.mark.parametrize("name,folder,mean,std", MNIST_LIKE)
def test_mnist_like_augment(tmp_path, name, folder, mean, std):
    write_fake_mnist(str(tmp_path), folder=folder)
    ds = get_dataset(name, str(tmp_path), train=True, augment=True)
    torch.manual_seed(0)
    draws = [ds[0][0] for _ in range(4)]
    assert all(d.shape == (1, 28, 28) for d in draws)
    assert any(not torch.equal(draws[0], d) for d in draws[1:])


# ------------------------------------------------------------------------------------ Cutout


def test_cutout_at_centre_zeroes_full_square():
    img = torch.ones(3, 32, 32)
    out = cutout_at(img, 16, 16, 8)
    zeroed = out == 0
    assert int(zeroed.sum()) == 3 * 8 * 8
    assert zeroed[:, 12:20, 12:20].all()  # square [y - L/2, y + L/2)
    assert torch.equal(img, torch.ones(3, 32, 32))  # input untouched


def test_cutout_at_clips_at_border():
    img = torch.ones(1, 32, 32)
    assert int((cutout_at(img, 0, 0, 8) == 0).sum()) == 4 * 4  # top-left corner
    bottom_right = cutout_at(img, 31, 31, 8) == 0
    assert int(bottom_right.sum()) == 5 * 5 and bottom_right[0, 27:, 27:].all()  # [27, 35) clip
    assert int((cutout_at(img, 16, 0, 7) == 0).sum()) == 7 * 4  # odd length: cols 0..3


def test_cutout_random_is_reproducible_and_bounded():
    img = torch.ones(3, 8, 8)
    cut = Cutout(4)
    torch.manual_seed(123)
    a = [cut(img) for _ in range(10)]
    torch.manual_seed(123)
    b = [cut(img) for _ in range(10)]
    assert all(torch.equal(x, y) for x, y in zip(a, b, strict=True))
    counts = {int((x[0] == 0).sum()) for x in a}
    assert all(1 <= c <= 16 for c in counts)
    assert len({tuple((x == 0).flatten().tolist()) for x in a}) > 1  # positions vary
    with pytest.raises(ValueError):
        Cutout(0)


# ------------------------------------------------------------------------------------ digits


def test_digits_split_sizes_disjoint_and_stable():
    train = get_dataset("digits", "/ignored", train=True)
    test = get_dataset("digits", "ignored/too", train=False)
    assert len(train) + len(test) == 1797
    assert abs(len(test) - 0.2 * 1797) < 10
    # Disjoint and covering, checked on the indices into load_digits().
    data = preproc._digits_data()
    tr, te = set(data.train_idx.tolist()), set(data.test_idx.tolist())
    assert not tr & te and len(tr | te) == 1797
    # Stable across calls, and unaffected by the global RNGs.
    preproc._digits_data.cache_clear()
    np.random.seed(999)
    torch.manual_seed(999)
    train2 = get_dataset("digits", "", train=True)
    assert torch.equal(train.data, train2.data) and torch.equal(train.targets, train2.targets)
    for ds in (train, test):
        img, label = ds[0]
        assert img.shape == (1, 8, 8) and img.dtype == torch.float32
        assert isinstance(label, int)
        assert set(preproc.get_targets(ds).tolist()) == set(range(10))


def test_digits_are_scikit_learns_read_without_importing_it():
    """preproc.read_digits: load_digits' images and labels exactly, and a digits run's process
    never imports scikit-learn (1.6 s of imports)."""
    from sklearn.datasets import load_digits

    raw = load_digits()
    images, labels = preproc.read_digits()
    assert images.dtype == raw.images.dtype and np.array_equal(images, raw.images)
    assert np.array_equal(labels, raw.target) and labels.dtype.kind == "i"
    probe = (
        "import sys, preproc; preproc.get_dataset('digits', '', train=True); "
        "print(sorted(m for m in sys.modules if m.split('.')[0] == 'sklearn'))"
    )
    res = subprocess.run(
        [sys.executable, "-c", probe], cwd=ROOT, capture_output=True, text=True, timeout=300
    )
    assert res.returncode == 0, res.stderr[-2000:]
    assert res.stdout.strip().splitlines()[-1] == "[]"


def test_digits_normalisation_and_targets():
    from sklearn.datasets import load_digits

    raw = load_digits()
    data = preproc._digits_data()
    mean, std = preproc.digits_normalization()
    train_px = raw.images[data.train_idx.numpy()] / 16.0
    assert mean == pytest.approx(train_px.mean(), abs=1e-5)
    assert std == pytest.approx(train_px.std(ddof=1), abs=1e-5)
    test = get_dataset("digits", "", train=False)
    k = 7
    i = int(data.test_idx[k])
    img, label = test[k]
    assert label == raw.target[i]
    np.testing.assert_allclose(img[0].numpy(), (raw.images[i] / 16.0 - mean) / std, atol=1e-5)
    assert torch.equal(preproc.get_targets(test), torch.as_tensor(raw.target[data.test_idx]))
    # Normalised training pixels have ~zero mean and unit std.
    x = torch.stack([get_dataset("digits", "", train=True)[j][0] for j in range(0, 1400, 7)])
    assert abs(float(x.mean())) < 0.1 and abs(float(x.std()) - 1) < 0.1


def test_digits_augment_and_dataloader_workers():
    ds = get_dataset("digits", "", train=True, augment=True, cutout_length=2)
    torch.manual_seed(0)
    draws = [ds[3][0] for _ in range(6)]
    assert all(d.shape == (1, 8, 8) for d in draws)
    assert any(not torch.equal(draws[0], d) for d in draws[1:])
    # Worker processes need the dataset (and its transforms) to pickle.
    loader = DataLoader(ds, batch_size=256, shuffle=True, num_workers=2)
    n = 0
    for x, y in loader:
        assert x.shape[1:] == (1, 8, 8) and x.dtype == torch.float32 and y.dtype == torch.long
        n += len(y)
    assert n == len(ds)


# ------------------------------------------------------------------------------------ errors


EXPECTED_FILE = {"cifar10": "data_batch_1", "mnist": "train-images-idx3-ubyte",
                 "fashionmnist": "train-images-idx3-ubyte"}  # fmt: skip


@pytest.mark.parametrize("name", ["cifar10", "mnist", "fashionmnist"])
def test_missing_files_without_download(tmp_path, name):
    with pytest.raises(DataError) as exc:
        get_dataset(name, str(tmp_path), train=True, download=False)
    msg = str(exc.value)
    assert "\n" not in msg
    assert name in msg and str(tmp_path) in msg and EXPECTED_FILE[name] in msg
    assert "--data_path" in msg


@pytest.mark.parametrize("name", ["cifar10", "mnist", "fashionmnist"])
def test_missing_files_with_download_fails_fast_offline(tmp_path, monkeypatch, name):
    if any(preproc._host_reachable(u, timeout=1.0) for u in preproc._download_urls(name)):
        pytest.skip("network reachable: this would download the real dataset")
    # Bounded by construction, not by a timed assertion: every connection attempt carries the
    # probe's timeout, and torchvision's downloader (urllib, no timeout) never starts.
    import torchvision.datasets.cifar as tv_cifar
    import torchvision.datasets.mnist as tv_mnist

    timeouts = []
    real_connect = preproc.socket.create_connection

    def connect(address, timeout=None, *args, **kwargs):
        timeouts.append(timeout)
        return real_connect(address, timeout, *args, **kwargs)

    def download(*args, **kwargs):
        raise AssertionError("the download started")

    monkeypatch.setattr(preproc.socket, "create_connection", connect)
    monkeypatch.setattr(tv_cifar, "download_and_extract_archive", download)
    monkeypatch.setattr(tv_mnist, "download_and_extract_archive", download)
    with pytest.raises(DataError) as exc:
        get_dataset(name, str(tmp_path), train=False, download=True)
    assert timeouts and all(t is not None and t <= preproc._PROBE_TIMEOUT for t in timeouts)
    msg = str(exc.value)
    assert "\n" not in msg and str(tmp_path) in msg and EXPECTED_FILE[name] in msg


def test_corrupt_cifar_is_a_data_error(tmp_path):
    # Real md5 check active (no allow_fake_cifar10): fake files count as corrupted.
    write_fake_cifar10(str(tmp_path))
    with pytest.raises(DataError) as exc:
        get_dataset("cifar10", str(tmp_path), train=True, download=False)
    assert "\n" not in str(exc.value) and "corrupted" in str(exc.value)


@pytest.mark.parametrize("name", ["cifar10", "mnist"])
def test_download_errors_become_data_error(tmp_path, monkeypatch, name):
    # Network probe passes but torchvision's download fails (as with a proxy or a dead mirror):
    # the exception must surface as a one-line DataError, not a traceback.
    import torchvision.datasets.cifar as tv_cifar
    import torchvision.datasets.mnist as tv_mnist

    def fail(url, *args, **kwargs):
        raise URLError(f"offline\nwhile fetching {url}")

    monkeypatch.setattr(preproc, "_host_reachable", lambda url, timeout=0: True)
    monkeypatch.setattr(tv_cifar, "download_and_extract_archive", fail)
    monkeypatch.setattr(tv_mnist, "download_and_extract_archive", fail)
    with pytest.raises(DataError) as exc:
        get_dataset(name, str(tmp_path), train=True, download=True)
    msg = str(exc.value)
    assert "\n" not in msg and "download failed" in msg and EXPECTED_FILE[name] in msg
