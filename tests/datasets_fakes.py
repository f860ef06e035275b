"""Tiny fake CIFAR-10 / MNIST / Fashion-MNIST files in the on-disk formats torchvision reads.

CIFAR-10 caveat: torchvision's CIFAR10 verifies hard-coded md5 sums of every batch file (in
``_check_integrity`` and ``_load_meta``, both through ``torchvision.datasets.cifar.
check_integrity``), even with download=False, so no fake file can pass it. Tests that load fake
CIFAR must call :func:`allow_fake_cifar10` (monkeypatches that one function to an
existence-only check); everything else, including preproc's real loading code, runs unchanged.
MNIST/Fashion-MNIST only check that the raw files exist, so they need no patching.
"""

from __future__ import annotations

import os
import pickle
import struct

import numpy as np

CIFAR_LABEL_NAMES = [
    "airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck",
]  # fmt: skip


def _labels(rng: np.random.RandomState, n: int) -> np.ndarray:
    # Cycle through the 10 classes before shuffling so that n >= 10 covers every class.
    return rng.permutation(np.arange(n) % 10).astype(np.int64)


def fake_cifar10_arrays(
    n_train: int = 20, n_test: int = 10, seed: int = 0
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """(train_images, train_labels, test_images, test_labels) that write_fake_cifar10 writes.

    Images are uint8 (N, 32, 32, 3) HWC, i.e. as torchvision's CIFAR10.data holds them.
    """
    rng = np.random.RandomState(seed)
    x_train = rng.randint(0, 256, size=(n_train, 32, 32, 3), dtype=np.uint8)
    y_train = _labels(rng, n_train)
    x_test = rng.randint(0, 256, size=(n_test, 32, 32, 3), dtype=np.uint8)
    y_test = _labels(rng, n_test)
    return x_train, y_train, x_test, y_test


def _write_cifar_batch(path: str, images: np.ndarray, labels: np.ndarray, batch_label: str) -> None:
    # The real files are Python 2 pickles whose str keys load as str under torchvision's
    # encoding="latin1" (as bytes only under encoding="bytes"); torchvision indexes
    # entry["data"], so str keys are what reproduces the real behaviour from Python 3.
    entry = {
        "batch_label": batch_label,
        "labels": [int(v) for v in labels],
        # Row layout: 1024 R, then 1024 G, then 1024 B values, each row-major (CHW flattened).
        "data": np.ascontiguousarray(images.transpose(0, 3, 1, 2).reshape(len(images), 3072)),
        "filenames": [f"fake_{i:05d}.png" for i in range(len(images))],
    }
    with open(path, "wb") as f:
        pickle.dump(entry, f, protocol=2)


def write_fake_cifar10(root: str, n_train: int = 20, n_test: int = 10, seed: int = 0) -> None:
    """Write <root>/cifar-10-batches-py/{data_batch_1..5,test_batch,batches.meta}.

    The n_train images are spread over the five training batches in order. Loading them via
    torchvision requires :func:`allow_fake_cifar10` (md5 check, see module docstring).
    """
    x_train, y_train, x_test, y_test = fake_cifar10_arrays(n_train, n_test, seed)
    folder = os.path.join(root, "cifar-10-batches-py")
    os.makedirs(folder, exist_ok=True)
    chunks = np.array_split(np.arange(n_train), 5)
    for i, idx in enumerate(chunks, start=1):
        _write_cifar_batch(
            os.path.join(folder, f"data_batch_{i}"),
            x_train[idx],
            y_train[idx],
            f"training batch {i} of 5",
        )
    _write_cifar_batch(os.path.join(folder, "test_batch"), x_test, y_test, "testing batch 1 of 1")
    meta = {
        "num_cases_per_batch": max(len(c) for c in chunks),
        "label_names": list(CIFAR_LABEL_NAMES),
        "num_vis": 3072,
    }
    with open(os.path.join(folder, "batches.meta"), "wb") as f:
        pickle.dump(meta, f, protocol=2)


def allow_fake_cifar10(monkeypatch) -> None:
    """Make torchvision's CIFAR10 accept files whose md5 differs from the real ones.

    `monkeypatch` is pytest's fixture; the patch is undone at the end of the test.
    """
    import torchvision.datasets.cifar as tv_cifar

    monkeypatch.setattr(tv_cifar, "check_integrity", lambda fpath, md5=None: os.path.isfile(fpath))


def fake_mnist_arrays(
    n_train: int = 20, n_test: int = 10, seed: int = 0
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """(train_images, train_labels, test_images, test_labels) that write_fake_mnist writes.

    Images are uint8 (N, 28, 28).
    """
    rng = np.random.RandomState(seed)
    x_train = rng.randint(0, 256, size=(n_train, 28, 28), dtype=np.uint8)
    y_train = _labels(rng, n_train)
    x_test = rng.randint(0, 256, size=(n_test, 28, 28), dtype=np.uint8)
    y_test = _labels(rng, n_test)
    return x_train, y_train, x_test, y_test


def _write_idx_images(path: str, images: np.ndarray) -> None:
    n, rows, cols = images.shape
    with open(path, "wb") as f:
        f.write(struct.pack(">iiii", 2051, n, rows, cols))  # magic 0x0803: uint8, 3 dims
        f.write(images.astype(np.uint8).tobytes())


def _write_idx_labels(path: str, labels: np.ndarray) -> None:
    with open(path, "wb") as f:
        f.write(struct.pack(">ii", 2049, len(labels)))  # magic 0x0801: uint8, 1 dim
        f.write(labels.astype(np.uint8).tobytes())


def write_fake_mnist(
    root: str, n_train: int = 20, n_test: int = 10, seed: int = 0, folder: str = "MNIST"
) -> None:
    """Write uncompressed IDX files to <root>/<folder>/raw/ as torchvision MNIST reads them.

    Use folder="FashionMNIST" for Fashion-MNIST (torchvision uses the class name as folder).
    """
    x_train, y_train, x_test, y_test = fake_mnist_arrays(n_train, n_test, seed)
    raw = os.path.join(root, folder, "raw")
    os.makedirs(raw, exist_ok=True)
    _write_idx_images(os.path.join(raw, "train-images-idx3-ubyte"), x_train)
    _write_idx_labels(os.path.join(raw, "train-labels-idx1-ubyte"), y_train)
    _write_idx_images(os.path.join(raw, "t10k-images-idx3-ubyte"), x_test)
    _write_idx_labels(os.path.join(raw, "t10k-labels-idx1-ubyte"), y_test)


def write_image_folder(root: str, n_classes: int = 3, per_class: int = 4, seed: int = 0) -> dict:
    """An ImageFolder tree with JPEGs written by Pillow: ``root/train/<class>/`` with
    ``per_class`` images of random sizes each (one grayscale, one CMYK), plus one truncated
    JPEG and one file that is not an image; ``root/val/<class>/`` with 2 images each.
    Returns the paths of the bad files."""
    from PIL import Image

    rng = np.random.RandomState(seed)

    def jpeg(path: str, mode: str = "RGB") -> None:
        h, w = rng.randint(20, 60, size=2)
        pixels = rng.randint(0, 256, size=(h, w, 3), dtype=np.uint8)
        img = Image.fromarray(pixels, "RGB")
        if mode != "RGB":
            img = img.convert(mode)
        img.save(path, format="JPEG")

    for split, n in (("train", per_class), ("val", 2)):
        for c in range(n_classes):
            folder = os.path.join(root, split, f"class_{c}")
            os.makedirs(folder, exist_ok=True)
            for i in range(n):
                mode = "L" if (c, i) == (0, 0) else "CMYK" if (c, i) == (1, 0) else "RGB"
                jpeg(os.path.join(folder, f"img_{i}.jpg"), mode)
    train0 = os.path.join(root, "train", "class_0")
    truncated = os.path.join(train0, "truncated.jpg")
    jpeg(truncated)
    with open(truncated, "rb") as f:
        data = f.read()
    with open(truncated, "wb") as f:
        f.write(data[: len(data) // 2])
    not_image = os.path.join(train0, "notes.txt")
    with open(not_image, "w") as f:
        f.write("not an image")
    return {"truncated": truncated, "not_image": not_image}
