"""Datasets and transforms for DARTS search and evaluation.

Supported datasets: CIFAR-10, MNIST, Fashion-MNIST (through torchvision, read from
``data_path``), scikit-learn's 8x8 ``digits`` (ships with scikit-learn, works offline), and
image folders in torchvision's ImageFolder layout (``data_path/train/<class>/*``,
``data_path/val/<class>/*``): ``imagenet`` (the paper's ImageNet recipe) and ``folder`` (your
own images). Every dataset yields ``(float32 tensor (C, H, W), normalised; int label)``.
"""

from __future__ import annotations

import functools
import gzip
import hashlib
import importlib.util
import multiprocessing
import os
import socket
import sys
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlparse

import numpy as np
import torch
from torch.utils.data import Dataset, Subset
from torchvision import datasets as tv_datasets
from torchvision import transforms as T

from utils import UserError

FOLDER_DATASETS = ("imagenet", "folder")
DATASETS = ("cifar10", "mnist", "fashionmnist", "digits", *FOLDER_DATASETS)
IMAGENET_NORM = ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))
IMAGENET_NORMALIZE = "/".join(",".join(str(v) for v in t) for t in IMAGENET_NORM)  # --normalize
FOLDER_SIZE = {"imagenet": 224, "folder": 32}  # the default --image_size
IMAGE_EXTENSIONS = tv_datasets.folder.IMG_EXTENSIONS


class DataError(UserError):
    """Bad dataset name or missing data. str(e) is ONE line, meant to be shown to the user as is."""


@dataclass(frozen=True)
class DatasetInfo:
    """Static shape information about a dataset."""

    input_size: int  # H == W
    input_channels: int
    n_classes: int


_INFO = {
    "cifar10": DatasetInfo(32, 3, 10),
    "mnist": DatasetInfo(28, 1, 10),
    "fashionmnist": DatasetInfo(28, 1, 10),
    "digits": DatasetInfo(8, 1, 10),
}

# Per-channel (mean, std) of the training images scaled to [0, 1] (project reference sheet).
_NORM = {
    "cifar10": ((0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)),
    "mnist": ((0.1307,), (0.3081,)),
    "fashionmnist": ((0.2860,), (0.3530,)),
}

_TV_CLASSES: dict[str, type[tv_datasets.VisionDataset]] = {
    "cifar10": tv_datasets.CIFAR10,
    "mnist": tv_datasets.MNIST,
    "fashionmnist": tv_datasets.FashionMNIST,
}

# Seconds allowed to open a TCP connection to the download host before giving up; keeps an
# offline machine from hanging on urllib's default (no) timeout.
_PROBE_TIMEOUT = 3.0
# Per-socket-operation timeout while actually downloading (a stalled transfer aborts).
_DOWNLOAD_TIMEOUT = 60.0

# digits: fraction held out as the test split and the seed of its fixed stratified split.
_DIGITS_TEST_FRACTION = 0.2
_DIGITS_SPLIT_SEED = 0


def _check_name(name: str) -> str:
    if name not in DATASETS:
        raise DataError(f"unknown dataset '{name}' (choose from {', '.join(DATASETS)})")
    return name


def dataset_info(name: str, data_path: str = "", image_size: int = 0) -> DatasetInfo:
    """Input size, channels and number of classes of dataset `name`. An image folder's classes
    are its training folder's subfolders; its size is ``image_size`` (0: 224 for imagenet, 32
    for folder) and its images are read as RGB."""
    if _check_name(name) in FOLDER_DATASETS:
        classes = folder_classes(os.path.join(os.path.expanduser(data_path), "train"))
        return DatasetInfo(image_size or FOLDER_SIZE[name], 3, len(classes))
    return _INFO[name]


# ---------------------------------------------------------------------------------------------
# Cutout
# ---------------------------------------------------------------------------------------------


def cutout_at(img: torch.Tensor, y: int, x: int, length: int) -> torch.Tensor:
    """Return a copy of (C,H,W) `img` with a `length`-sided square centred at (y, x) zeroed.

    The square spans rows [y - length//2, y - length//2 + length), clipped to the image.
    """
    h, w = img.shape[-2], img.shape[-1]
    y1, x1 = y - length // 2, x - length // 2
    y2, x2 = y1 + length, x1 + length
    y1, x1 = max(0, y1), max(0, x1)
    y2, x2 = min(h, y2), min(w, x2)
    out = img.clone()  # never modify the caller's tensor in place
    if y2 > y1 and x2 > x1:
        out[..., y1:y2, x1:x2] = 0.0
    return out


class Cutout:
    """Zero one square of side `length` centred at a uniformly random pixel (DeVries & Taylor).

    Uses torch's RNG so that ``torch.manual_seed`` (and DataLoader worker seeding) makes it
    reproducible. Meant to run after Normalize, so the square becomes the dataset mean.
    """

    def __init__(self, length: int) -> None:
        if length <= 0:
            raise ValueError(f"Cutout length must be positive, got {length}")
        self.length = int(length)

    def __call__(self, img: torch.Tensor) -> torch.Tensor:
        h, w = img.shape[-2], img.shape[-1]
        y = int(torch.randint(h, (1,)).item())
        x = int(torch.randint(w, (1,)).item())
        return cutout_at(img, y, x, self.length)

    def __repr__(self) -> str:
        return f"{self.__class__.__name__}(length={self.length})"


# ---------------------------------------------------------------------------------------------
# Transforms
# ---------------------------------------------------------------------------------------------


def _augmentation(name: str) -> list[Callable]:
    """Training-only augmentations, applied before ToTensor (PIL) or on [0,1] tensors (digits)."""
    if name == "cifar10":
        return [T.RandomCrop(32, padding=4), T.RandomHorizontalFlip()]
    mnist_like = T.RandomAffine(degrees=15, translate=(0.1, 0.1), scale=(0.9, 1.1), shear=0.1)
    if name == "mnist":
        return [mnist_like]
    if name == "fashionmnist":
        return [mnist_like, T.RandomVerticalFlip()]
    # digits are tiny (8x8): a shift of at most one pixel is already a strong perturbation.
    return [T.RandomCrop(8, padding=1)]


def _build_transform(
    name: str,
    mean: tuple[float, ...],
    std: tuple[float, ...],
    augment: bool,
    cutout_length: int,
    to_tensor: bool,
) -> T.Compose:
    steps: list[Callable] = []
    if augment:
        steps += _augmentation(name)
    if to_tensor:
        steps.append(T.ToTensor())
    steps.append(T.Normalize(mean, std))
    if augment and cutout_length > 0:
        steps.append(Cutout(cutout_length))
    return T.Compose(steps)


# ---------------------------------------------------------------------------------------------
# torchvision datasets (CIFAR-10, MNIST, Fashion-MNIST)
# ---------------------------------------------------------------------------------------------


def _expected_names(name: str) -> tuple[str, list[str]]:
    """(folder relative to data_path, file names) that torchvision 0.29 requires to exist."""
    cls = _TV_CLASSES[name]
    if name == "cifar10":
        names = [f for f, _ in cls.train_list + cls.test_list] + [cls.meta["filename"]]
        return cls.base_folder, names
    # MNIST._check_exists looks for the *uncompressed* IDX files in <root>/<ClassName>/raw.
    return os.path.join(cls.__name__, "raw"), [os.path.splitext(f)[0] for f, _ in cls.resources]


def _expected_files(name: str, data_path: str) -> str:
    """One-line description of the expected files, e.g. '<root>/cifar-10-batches-py/{a,b}'."""
    folder, names = _expected_names(name)
    if name == "cifar10":  # abbreviate the five training batches
        names = ["data_batch_1..5"] + names[5:]
    return os.path.join(data_path, folder, "{" + ",".join(names) + "}")


def _files_missing(name: str, data_path: str) -> bool:
    folder, names = _expected_names(name)
    return not all(os.path.isfile(os.path.join(data_path, folder, f)) for f in names)


def _one_line(text: str) -> str:
    return " ".join(str(text).split())


def _data_error(name: str, data_path: str, problem: str) -> DataError:
    return DataError(
        f"{name} {problem}: expected {_expected_files(name, data_path)}; download it on a "
        f"machine with internet (e.g. torchvision.datasets.{_TV_CLASSES[name].__name__}"
        f"(root, download=True)) and copy it there, or pass --data_path pointing to it"
    )


def _download_urls(name: str) -> list[str]:
    cls = _TV_CLASSES[name]
    if name == "cifar10":
        return [cls.url]
    return [m + cls.resources[0][0] for m in cls.mirrors]


def _local_archives_present(name: str, data_path: str) -> bool:
    """True if torchvision's download() would find its archives locally (no network needed)."""
    cls = _TV_CLASSES[name]
    if name == "cifar10":
        return os.path.isfile(os.path.join(data_path, cls.filename))
    raw = os.path.join(data_path, cls.__name__, "raw")
    return all(os.path.isfile(os.path.join(raw, f)) for f, _ in cls.resources)


def _host_reachable(url: str, timeout: float = _PROBE_TIMEOUT) -> bool:
    """Quick TCP connect to the host of `url`.

    torchvision's downloader calls urllib without a timeout, which on a firewalled machine can
    block for minutes; this probe fails in at most `timeout` seconds (instantly when DNS fails).
    """
    parts = urlparse(url)
    if not parts.hostname:
        return False
    port = parts.port or (443 if parts.scheme == "https" else 80)
    try:
        with socket.create_connection((parts.hostname, port), timeout=timeout):
            return True
    except OSError:
        return False


def _load_torchvision(
    name: str, data_path: str, train: bool, transform: Callable, download: bool
) -> Dataset:
    cls = _TV_CLASSES[name]
    try:
        # First without download: never touch the network when the files are already there.
        return cls(root=data_path, train=train, transform=transform, download=False)
    except Exception as e:  # torchvision raises RuntimeError, or OSError/ValueError on bad files
        first_error = e
    where = f"'{data_path}'"
    if not _files_missing(name, data_path):
        # All files exist, so torchvision failed on their content (md5 mismatch, truncation).
        raise _data_error(
            name, data_path, f"data in {where} is corrupted ({_one_line(str(first_error))})"
        ) from first_error
    if not download:
        raise _data_error(
            name, data_path, f"data not found in {where} (download disabled)"
        ) from first_error

    if not _local_archives_present(name, data_path):
        if not any(_host_reachable(u) for u in _download_urls(name)):
            raise _data_error(
                name, data_path, f"data not found in {where} and no network to download it"
            ) from first_error
    old_timeout = socket.getdefaulttimeout()
    # urllib in torchvision has no timeout argument; bound stalls via the default timeout.
    socket.setdefaulttimeout(_DOWNLOAD_TIMEOUT)
    try:
        return cls(root=data_path, train=train, transform=transform, download=True)
    except Exception as e:  # RuntimeError, URLError, OSError, tarfile errors, ...
        raise _data_error(
            name, data_path, f"data not found in {where} and download failed ({_one_line(str(e))})"
        ) from e
    finally:
        socket.setdefaulttimeout(old_timeout)


# ---------------------------------------------------------------------------------------------
# scikit-learn digits
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _DigitsData:
    images: torch.Tensor  # (N, 1, 8, 8) float32 in [0, 1]
    labels: torch.Tensor  # (N,) int64
    train_idx: torch.Tensor
    test_idx: torch.Tensor
    mean: float  # of the training split, in [0, 1] units
    std: float


def _stratified_split(labels: np.ndarray, test_fraction: float, seed: int):
    """Fixed per-class split; its own RandomState keeps it independent of the global RNG."""
    rng = np.random.RandomState(seed)
    train, test = [], []
    for c in np.unique(labels):
        idx = rng.permutation(np.flatnonzero(labels == c))
        n_test = int(round(test_fraction * len(idx)))
        test.append(idx[:n_test])
        train.append(idx[n_test:])
    return np.sort(np.concatenate(train)), np.sort(np.concatenate(test))


def read_digits() -> tuple[np.ndarray, np.ndarray]:
    """scikit-learn's 8x8 digits: (images (1797, 8, 8) float64 in 0..16, labels (1797,)),
    what ``sklearn.datasets.load_digits()`` returns as ``images`` and ``target``. Read from the
    file it reads (its bundled digits.csv.gz, one image and its label per row), as it reads it,
    without importing scikit-learn: 1.6 s of imports in every process on digits. Where the
    file is not found (another scikit-learn layout), load_digits itself."""
    spec = importlib.util.find_spec("sklearn")  # finds the package, imports nothing
    places = (spec.submodule_search_locations or []) if spec is not None else []
    for place in places:
        path = os.path.join(place, "datasets", "data", "digits.csv.gz")
        if os.path.isfile(path):
            with gzip.open(path, "rt") as f:
                data = np.loadtxt(f, delimiter=",")
            return data[:, :-1].reshape(-1, 8, 8), data[:, -1].astype(int)
    from sklearn.datasets import load_digits

    raw = load_digits()
    return raw.images, raw.target


@functools.lru_cache(maxsize=1)
def _digits_data() -> _DigitsData:
    raw_images, raw_labels = read_digits()
    images = torch.from_numpy(raw_images.astype(np.float32) / 16.0).unsqueeze(1)
    labels = torch.from_numpy(raw_labels.astype(np.int64))
    train_idx, test_idx = _stratified_split(raw_labels, _DIGITS_TEST_FRACTION, _DIGITS_SPLIT_SEED)
    # Normalisation statistics come from the training split only (no test leakage); computed
    # here rather than hard-coded because it is deterministic and costs microseconds.
    train_pixels = images[torch.from_numpy(train_idx)]
    return _DigitsData(
        images=images,
        labels=labels,
        train_idx=torch.from_numpy(train_idx),
        test_idx=torch.from_numpy(test_idx),
        mean=float(train_pixels.mean()),
        std=float(train_pixels.std()),
    )


class DigitsDataset(Dataset):
    """scikit-learn's 8x8 digits as (1,8,8) tensors; the transform is applied per item.

    Holds only tensors and a torchvision Compose, so it pickles for DataLoader workers.
    """

    def __init__(self, train: bool, transform: Callable | None = None) -> None:
        d = _digits_data()
        idx = d.train_idx if train else d.test_idx
        self.train = train
        self.data = d.images[idx].clone()
        self.targets = d.labels[idx].clone()
        self.transform = transform

    def __len__(self) -> int:
        return len(self.targets)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        img = self.data[index]
        if self.transform is not None:
            img = self.transform(img)
        return img, int(self.targets[index])


def digits_normalization() -> tuple[float, float]:
    """(mean, std) of the digits training split in [0, 1] units, used to normalise digits."""
    d = _digits_data()
    return d.mean, d.std


# ---------------------------------------------------------------------------------------------
# Image folders (imagenet, folder)
# ---------------------------------------------------------------------------------------------
_LAYOUT = "<class>/<image files> (torchvision's ImageFolder layout)"


def folder_classes(split_dir: str) -> list[str]:
    """The class folders of ``split_dir``, sorted; DataError when it is missing or empty, or
    when a class folder holds no image."""
    if not os.path.isdir(split_dir):
        raise DataError(f"no image folder at {split_dir}: expected {split_dir}/{_LAYOUT}")
    classes = sorted(e.name for e in os.scandir(split_dir) if e.is_dir())
    if not classes:
        raise DataError(f"{split_dir} holds no class folders: expected {split_dir}/{_LAYOUT}")
    if len(classes) < 2:  # one class: the loss is 0 and every prediction right, nothing learns
        raise DataError(
            f"{split_dir} holds one class folder ({classes[0]}): a classifier needs at least two"
        )
    for c in classes:
        folder = os.path.join(split_dir, c)
        if not any(
            f.is_file() and f.name.lower().endswith(IMAGE_EXTENSIONS) for f in os.scandir(folder)
        ):
            raise DataError(
                f"class folder {folder} holds no images ({', '.join(IMAGE_EXTENSIONS)})"
            )
    return classes


def _check_same_classes(root: str) -> None:
    train = set(folder_classes(os.path.join(root, "train")))
    val = set(folder_classes(os.path.join(root, "val")))
    if train != val:
        only_train, only_val = sorted(train - val), sorted(val - train)
        raise DataError(
            f"{root}/train and {root}/val must hold the same classes: only in train: "
            f"{', '.join(only_train[:5]) or '-'}; only in val: {', '.join(only_val[:5]) or '-'}"
        )


# The files named in a warning so far, by this process and its loader workers together, so that
# each bad file is named once per run whichever pass (the --normalize auto statistics, training,
# validation) and whichever worker meets it: [0] is the count, then 64-bit digests of the paths.
_WARN_SLOTS = 4096
_warned_files: Any = None


def _warned_registry() -> Any:
    global _warned_files
    if _warned_files is None:  # made in the main process, inherited by the workers it starts
        _warned_files = multiprocessing.Array("q", _WARN_SLOTS + 1)
    return _warned_files


def warn_once(registry: Any, path: str, problem: str) -> None:
    """``WARNING: skipped <path>: <problem>`` on stderr, unless ``registry`` holds ``path``."""
    key = int.from_bytes(hashlib.blake2b(path.encode(), digest_size=8).digest(), "little") >> 1
    with registry.get_lock():
        n = registry[0]
        if key in registry[1 : n + 1]:
            return
        if n < _WARN_SLOTS:  # past that many bad files, a repeated name is no harm
            registry[n + 1], registry[0] = key, n + 1
    print(f"WARNING: skipped {path}: {problem}", file=sys.stderr)


_SIXTEEN_BIT = ("I;16", "I;16L", "I;16B", "I;16N")


def to_rgb(img: Any) -> Any:
    """A PIL image as 8-bit RGB. PIL's own conversion clips wide modes to 0..255 (a 16-bit
    image turns white, a float one black), so they are scaled first, to a grayscale "L":
    16-bit (``I;16*``) values divided by 257 (65535 -> 255); 32-bit integers (``I``) the same
    when they lie in 0..65535, else their min..max stretched to 0..255; floats (``F``) times
    255 when they lie in [0, 1], else their min..max stretched (NaN counts as 0). Every other
    mode (1, L, P, RGBA, CMYK, ...) goes through PIL's conversion."""
    from PIL import Image

    if img.mode not in (*_SIXTEEN_BIT, "I", "F"):
        return img.convert("RGB")
    a = np.nan_to_num(np.asarray(img, dtype=np.float64), nan=0.0, posinf=0.0, neginf=0.0)
    lo, hi = (float(a.min()), float(a.max())) if a.size else (0.0, 0.0)
    if img.mode in _SIXTEEN_BIT or (img.mode == "I" and lo >= 0 and hi <= 65535):
        a = a / 257.0
    elif img.mode == "F" and lo >= 0 and hi <= 1:
        a = a * 255.0
    else:  # its own range
        a = (a - lo) * (255.0 / (hi - lo)) if hi > lo else np.zeros_like(a)
    return Image.fromarray(np.clip(a.round(), 0, 255).astype(np.uint8), "L").convert("RGB")


def set_max_image_pixels(pixels: int) -> None:
    """``--max_image_pixels``: the most pixels an image may have to be decoded (0: PIL's own
    limit). Set in the main process before its loader workers start: they inherit it."""
    from PIL import Image

    Image.MAX_IMAGE_PIXELS = pixels or _PIL_MAX_PIXELS


_PIL_MAX_PIXELS = 1024 * 1024 * 1024 // 4 // 3  # PIL's default Image.MAX_IMAGE_PIXELS


def _pil_max_pixels() -> int:
    from PIL import Image

    return Image.MAX_IMAGE_PIXELS or 0


class ImageTooLarge(ValueError):
    """An image over PIL's pixel limit (``Image.MAX_IMAGE_PIXELS``), perhaps a decompression
    bomb: a tiny file that decodes to gigabytes. Skipped like an unreadable file."""


def read_rgb(path: str) -> Any:
    """Decode the image file at ``path`` (all of it: truncation shows here) as 8-bit RGB.
    :class:`ImageTooLarge` for an image of more pixels than PIL's limit."""
    from PIL import Image

    with open(path, "rb") as f, warnings.catch_warnings():
        # PIL only warns between its limit and twice it, and then decodes: refuse both alike.
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        try:
            img = Image.open(f)
            img.load()
        except (Image.DecompressionBombError, Image.DecompressionBombWarning):
            limit = Image.MAX_IMAGE_PIXELS
            try:  # the header alone, for the size: opening decodes nothing
                Image.MAX_IMAGE_PIXELS = None
                with Image.open(path) as header:
                    w, h = header.size
            finally:
                Image.MAX_IMAGE_PIXELS = limit
            raise ImageTooLarge(
                f"{w}x{h} = {w * h:,} pixels, more than the {limit:,} read (the limit against "
                f"decompression bombs; --max_image_pixels raises it)"
            ) from None
    return to_rgb(img)


class ImageFolderDataset(tv_datasets.ImageFolder):
    """torchvision's ImageFolder (images read as 8-bit RGB by :func:`read_rgb`: grayscale,
    CMYK, 16-bit and float files too) that never stops a run on a bad file.

    A file without an image extension is left out when the folder is scanned (``rejected``
    lists them). A file that cannot be decoded (not an image, a truncated JPEG, an image over
    the pixel limit) is skipped when it is read: a warning line names it (once per run:
    :func:`warn_once`), the next image takes its place, and ``unreadable`` (shared with the
    loader's worker processes) counts the skips."""

    def __init__(self, root: str, transform: Callable) -> None:
        self.rejected: list[str] = []
        self.unreadable = multiprocessing.Value("i", 0)
        self.warned = _warned_registry()
        self.max_pixels = _pil_max_pixels()  # --max_image_pixels, for workers of any start method
        super().__init__(root, transform=transform, loader=read_rgb, is_valid_file=self._is_image)

    def _is_image(self, path: str) -> bool:
        if path.lower().endswith(IMAGE_EXTENSIONS):
            return True
        self.rejected.append(path)
        return False

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        set_max_image_pixels(self.max_pixels)
        for k in range(len(self.samples)):
            path, target = self.samples[(index + k) % len(self.samples)]
            try:
                img = self.loader(path)  # decodes the whole file: truncation shows here
            except (OSError, ValueError, SyntaxError) as e:  # what PIL raises for a bad file
                self._skip(path, e)
                continue
            return self.transform(img) if self.transform else img, target  # type: ignore[return-value]
        raise DataError(f"no readable image in {self.root}")

    def _skip(self, path: str, error: Exception) -> None:
        with self.unreadable.get_lock():
            self.unreadable.value += 1
        warn_once(self.warned, path, _one_line(str(error))[:200])


def parse_normalize(text: str) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """``"m1,m2,m3/s1,s2,s3"`` -> ((m1, m2, m3), (s1, s2, s3))."""
    try:
        mean, std = (tuple(float(v) for v in part.split(",")) for part in text.split("/"))
    except ValueError:
        raise DataError(
            f"--normalize must be auto, imagenet or MEAN/STD (e.g. 0.5,0.5,0.5/0.25,0.25,0.25), "
            f"got {text!r}"
        ) from None
    if len(mean) != 3 or len(std) != 3 or min(std) <= 0:
        raise DataError(f"--normalize needs 3 means and 3 positive stds, got {text!r}")
    return mean, std


def resolve_normalize(
    name: str, data_path: str, image_size: int, normalize: str, with_val: bool = False
) -> str:
    """The ``--normalize`` a run records: for an image folder with ``auto``, the per-channel
    mean and std of its training images, computed once (on up to 1,000 images spread evenly
    over the sorted files, resized and centre-cropped to the run's size) and written as
    ``MEAN/STD``, so that the run's config holds the numbers and a resumed run (which computes
    them again, identically) matches it. Other data sets keep their published constants.
    The folder's layout is checked first (``with_val``: its val/ split too)."""
    if name not in FOLDER_DATASETS:
        if normalize != "auto":
            raise DataError(f"--normalize applies to image folders only, not to {name}")
        return normalize
    root = os.path.expanduser(data_path)
    if with_val:
        _check_same_classes(root)
    else:
        folder_classes(os.path.join(root, "train"))
    if normalize == "imagenet" or (normalize == "auto" and name == "imagenet"):
        return IMAGENET_NORMALIZE
    if normalize != "auto":
        parse_normalize(normalize)
        return normalize
    size = image_size or FOLDER_SIZE[name]
    tf = T.Compose([T.Resize(size), T.CenterCrop(size), T.ToTensor()])
    data = ImageFolderDataset(os.path.join(root, "train"), tf)
    picks = np.unique(np.linspace(0, len(data) - 1, min(len(data), 1000)).round().astype(int))
    total = torch.zeros(3, dtype=torch.float64)
    squares = torch.zeros(3, dtype=torch.float64)
    n = 0
    for i in picks.tolist():
        x = data[i][0].double()  # (3, size, size)
        total += x.sum((1, 2))
        squares += (x * x).sum((1, 2))
        n += x[0].numel()
    mean = total / n
    std = (squares / n - mean * mean).clamp_min(1e-12).sqrt()
    return "/".join(",".join(f"{v:.4f}" for v in t.tolist()) for t in (mean, std))


def _folder_transform(
    name: str, size: int, train: bool, augment: bool, cutout_length: int, normalize: str
) -> T.Compose:
    """ImageNet: RandomResizedCrop, flip and ColorJitter(0.4, 0.4, 0.4, 0.2) for training;
    resize to 256/224 of the size and centre crop for evaluation (the paper's recipe). A
    folder: resize the short side to the size, then a random crop padded by size/8 and a flip
    (CIFAR-10's augmentation) or a centre crop."""
    steps: list[Callable]
    if name == "imagenet":
        if augment:
            steps = [
                T.RandomResizedCrop(size),
                T.RandomHorizontalFlip(),
                T.ColorJitter(brightness=0.4, contrast=0.4, saturation=0.4, hue=0.2),
            ]
        else:
            steps = [T.Resize(size * 256 // 224), T.CenterCrop(size)]
    elif augment:
        steps = [T.Resize(size), T.RandomCrop(size, padding=size // 8), T.RandomHorizontalFlip()]
    else:
        steps = [T.Resize(size), T.CenterCrop(size)]
    mean, std = parse_normalize(normalize)
    steps += [T.ToTensor(), T.Normalize(mean, std)]
    if augment and cutout_length > 0:
        steps.append(Cutout(cutout_length))
    return T.Compose(steps)


def _load_folder(
    name: str,
    data_path: str,
    train: bool,
    augment: bool,
    cutout_length: int,
    image_size: int,
    normalize: str,
) -> Dataset:
    root = os.path.expanduser(data_path)
    split = os.path.join(root, "train" if train else "val")
    if train:
        folder_classes(split)
    else:
        _check_same_classes(root)
    if normalize == "auto":
        normalize = resolve_normalize(name, data_path, image_size, normalize)
    size = image_size or FOLDER_SIZE[name]
    tf = _folder_transform(name, size, train, augment, cutout_length, normalize)
    data = ImageFolderDataset(split, tf)
    for path in data.rejected:
        warn_once(data.warned, path, "not an image file")
    return data


def skipped_files(dataset: Dataset) -> tuple[int, int]:
    """(files left out as not images, files skipped as unreadable so far) of an image-folder
    dataset, or of the one inside a Subset; (0, 0) for the other data sets."""
    while isinstance(dataset, Subset):
        dataset = dataset.dataset
    if isinstance(dataset, ImageFolderDataset):
        return len(dataset.rejected), int(dataset.unreadable.value)
    return 0, 0


# ---------------------------------------------------------------------------------------------
# Public entry points
# ---------------------------------------------------------------------------------------------


def get_dataset(
    name: str,
    data_path: str,
    train: bool,
    augment: bool = False,
    cutout_length: int = 0,
    download: bool = True,
    image_size: int = 0,
    normalize: str = "auto",
) -> Dataset:
    """Training (train=True) or test split of `name`, yielding (normalised float CHW, label).

    augment=True adds the training augmentation (and Cutout when cutout_length > 0).
    Raises DataError (one-line message) for an unknown name or missing/unreadable files.
    `data_path` is ignored for digits. Image folders: the test split is ``val/``; images are
    resized to ``image_size`` (0: the data set's default) and normalised per ``normalize``
    (see :func:`resolve_normalize`).
    """
    if _check_name(name) in FOLDER_DATASETS:
        return _load_folder(name, data_path, train, augment, cutout_length, image_size, normalize)
    if name == "digits":
        mean, std = digits_normalization()
        tf = _build_transform(name, (mean,), (std,), augment, cutout_length, to_tensor=False)
        return DigitsDataset(train=train, transform=tf)
    mean_t, std_t = _NORM[name]
    tf = _build_transform(name, mean_t, std_t, augment, cutout_length, to_tensor=True)
    return _load_torchvision(name, os.path.expanduser(str(data_path)), train, tf, download)


def get_targets(dataset: Dataset) -> torch.Tensor:
    """Labels of `dataset` as a LongTensor, read from `.targets` without loading any image.

    Works for the datasets returned by get_dataset and for (nested) torch Subsets of them.
    """
    if isinstance(dataset, Subset):
        parent = get_targets(dataset.dataset)
        return parent[torch.as_tensor(list(dataset.indices), dtype=torch.long)]
    targets = getattr(dataset, "targets", None)
    if targets is None:
        raise TypeError(f"{type(dataset).__name__} has no 'targets' attribute")
    return torch.as_tensor(targets, dtype=torch.long).clone()
