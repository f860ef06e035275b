"""The authors' released DARTS weights (Liu et al., github.com/quark0/darts) in this project's
networks: read, check, map (issue 15).

The formats (tests/fixtures/official/ holds small files written by the authors' own code):

- **CIFAR-10:** a plain ``state_dict`` of their evaluated ``NetworkCIFAR``, auxiliary head
  included, as their training script saves it (``torch.save(model.state_dict(), path)``).
- **ImageNet:** a dict holding ``epoch``, ``state_dict``, ``best_acc_top1`` and ``optimizer``;
  the keys of its ``state_dict`` may carry a ``module.`` prefix (their ImageNet script trains
  under ``nn.DataParallel``).
- **This project's** augment checkpoints (``model``, ``config``, ``genotype``) are read too, so
  that ``augment.py --init_from`` takes either.

Their tensors appear in the order in which the authors' network registers its modules: stem
(stem0, stem1 for ImageNet), then each cell (its two input preprocessings, then its eight ops
in genotype order), then the auxiliary head, then the classifier, with each BN's buffers
(running_mean, running_var and, from PyTorch 0.4.1 on, num_batches_tracked) beside its weight
and bias. models/augment_cnn.py registers its modules in that same order, so after any
``module.`` prefix is stripped the file's tensors and the network's correspond one to one: they
are mapped **by order**, not by name (the names differ: ``preprocess0.op.1`` here is
``preproc0.1``). Each pair must agree in shape and in kind (the last part of the name: weight,
bias, running_mean, ...), the counts must agree, and the file's parameter count must be the
network's; the first tensor that does not fit stops everything with one line
(:class:`OfficialWeightsError`, exit status 2): a partial model is never loaded silently.

Two tolerated differences, each reported: a file without num_batches_tracked (saved by PyTorch
0.3 or 0.4.0, as the authors' code requires) leaves those counters at 0 (they only matter to a
BN with ``momentum=None``); a file with an auxiliary head loads into a network without one
(the head is left unused). For fine-tuning (:func:`init_state`), a classifier of another class
count (the main one and the auxiliary one) is left as newly initialised, and a network with an
auxiliary head may start from a file without one.

Files are read with ``torch.load(..., weights_only=True)``: a file that needs pickled Python
code to load is refused.
"""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn as nn

from checkpoint import safe_load
from preproc import FOLDER_DATASETS, IMAGENET_NORMALIZE
from utils import ConfigError, UserError

AUX_PREFIXES = ("auxiliary_head.", "aux_head.")  # the authors' attribute, this project's
# This project's classifiers (main, auxiliary): left new when the class count changes.
CLASSIFIERS = ("linear.weight", "linear.bias", "aux_head.linear.weight", "aux_head.linear.bias")
BN_BUFFERS = ("running_mean", "running_var", "num_batches_tracked")
# The published networks' sizes: (init_channels, layers) of the CIFAR and the ImageNet network.
PUBLISHED_SIZE = {"cifar": (36, 20), "imagenet": (48, 14)}
HINT = (
    "wrong --genotype, wrong --init_channels or --layers, or not a checkpoint of the authors' "
    "DARTS network"
)


class OfficialWeightsError(UserError):
    """A weights file that cannot be read, or does not fit the network (one line)."""


@dataclass
class Weights:
    """The tensors of a weights file, in the file's order, ``module.`` prefixes stripped."""

    path: str
    kind: str  # what the file is, for messages
    tensors: list[tuple[str, torch.Tensor]]
    meta: dict[str, Any] = field(default_factory=dict)  # epoch, best_acc_top1, genotype, config

    @property
    def has_aux(self) -> bool:
        """Whether the file holds an auxiliary head."""
        return any(name.startswith(AUX_PREFIXES) for name, _ in self.tensors)

    @property
    def imagenet(self) -> bool:
        """Whether the file holds an ImageNet network (two stems) rather than a CIFAR one."""
        return any(name.startswith("stem0.") for name, _ in self.tensors)

    @property
    def n_classes(self) -> int:
        """The class count of the file's classifier: the length of its last tensor (the
        classifier's bias, in the authors' order and in this project's)."""
        return int(self.tensors[-1][1].numel()) if self.tensors else 0


@dataclass
class Matched:
    """The outcome of :func:`match`: ``state`` maps this network's tensor names to the file's
    tensors; ``fresh`` names the network's tensors the file does not give (left as they are);
    ``unused`` the file's tensors that have no place in the network."""

    weights: Weights
    state: dict[str, torch.Tensor]
    fresh: list[str] = field(default_factory=list)
    unused: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    def summary(self) -> str:
        """One line for the log."""
        n = sum(t.numel() for t in self.state.values() if t.is_floating_point())
        line = (
            f"Loaded {len(self.state)} tensors ({n:,} values) from {self.weights.path} "
            f"({self.weights.kind})"
        )
        return "; ".join([line, *self.notes])


def _kind(name: str) -> str:
    return name.rsplit(".", 1)[-1]


def _shape(t: torch.Tensor) -> str:
    return "(" + ", ".join(str(s) for s in t.shape) + ")"


# --------------------------------------------------------------------------------------------
# Reading
# --------------------------------------------------------------------------------------------
def read_weights(path: str) -> Weights:
    """Read a weights file (the formats of the module docstring) with ``weights_only=True``.
    OfficialWeightsError (one line) if it is missing, damaged, needs pickled code, or is none
    of those formats."""
    if not os.path.isfile(path):
        raise OfficialWeightsError(f"no weights file at {path}")
    try:
        obj = safe_load(path)
    except ConfigError as e:  # one line: damaged, or pickled code (refused)
        raise OfficialWeightsError(str(e)) from None

    meta: dict[str, Any] = {}
    if isinstance(obj, dict) and "model" in obj and "config" in obj:
        if "genotype" not in obj:
            raise OfficialWeightsError(
                f"{path} is a checkpoint of this project's search, not of a trained network"
            )
        kind, sd = "a checkpoint of this project", obj["model"]
        meta = {k: obj[k] for k in ("genotype", "config", "epoch") if k in obj}
    elif isinstance(obj, dict) and isinstance(obj.get("state_dict"), dict):
        kind, sd = "the authors' ImageNet checkpoint format", obj["state_dict"]
        meta = {k: obj[k] for k in ("epoch", "best_acc_top1") if k in obj}
    elif isinstance(obj, dict) and obj and all(isinstance(v, torch.Tensor) for v in obj.values()):
        kind, sd = "the authors' CIFAR state_dict format", obj
    else:
        what = f"a dict with keys {sorted(map(str, obj))[:5]}" if isinstance(obj, dict) else None
        raise OfficialWeightsError(
            f"{path} is not a state_dict or checkpoint of the authors' DARTS network (it holds "
            f"{what or type(obj).__name__})"
        )
    tensors = [(str(k), v) for k, v in sd.items()]
    if not tensors or not all(isinstance(v, torch.Tensor) for _, v in tensors):
        raise OfficialWeightsError(f"{path}: its state_dict holds no tensors, or not only tensors")
    if all(name.startswith("module.") for name, _ in tensors):  # saved from nn.DataParallel
        tensors = [(name[len("module.") :], t) for name, t in tensors]
        kind += ", nn.DataParallel's module. keys"
    return Weights(path, kind, tensors, meta)


# --------------------------------------------------------------------------------------------
# Mapping by order
# --------------------------------------------------------------------------------------------
def match(
    model: nn.Module, weights: Weights, network: str, new_classifiers: bool = False
) -> Matched:
    """Map ``weights`` onto ``model``'s state_dict by order (module docstring).

    ``network`` describes the model for messages ("DARTS_V2, CIFAR network, C=36, 20 layers,
    10 classes"). ``new_classifiers`` (fine-tuning): a classifier whose class count differs
    from the file's, and an auxiliary head the file lacks, are left as they are (named in
    ``fresh``); otherwise every tensor of the model must come from the file.
    """
    path = weights.path
    ours = list(model.state_dict().items())
    theirs = list(weights.tensors)
    fresh: list[str] = []
    unused: list[str] = []
    notes: list[str] = []

    def mismatch(detail: str) -> OfficialWeightsError:
        return OfficialWeightsError(f"{path} does not fit {network}: {detail} ({HINT})")

    if not any(_kind(name) == "num_batches_tracked" for name, _ in theirs):
        counters = [k for k, _ in ours if _kind(k) == "num_batches_tracked"]
        ours = [(k, v) for k, v in ours if _kind(k) != "num_batches_tracked"]
        if counters:
            notes.append(
                "the file has no BN num_batches_tracked (PyTorch < 0.4.1): left at 0, unused"
            )
    model_aux = any(k.startswith(AUX_PREFIXES) for k, _ in ours)
    if weights.has_aux and not model_aux:
        unused = [name for name, _ in theirs if name.startswith(AUX_PREFIXES)]
        theirs = [(name, t) for name, t in theirs if not name.startswith(AUX_PREFIXES)]
        notes.append("the file's auxiliary head is not used (the network has none)")
    elif model_aux and not weights.has_aux:
        if not new_classifiers:
            raise mismatch("the file has no auxiliary head, the network has one")
        fresh += [k for k, _ in ours if k.startswith(AUX_PREFIXES)]
        ours = [(k, v) for k, v in ours if not k.startswith(AUX_PREFIXES)]
        notes.append("the file has no auxiliary head: the network's is newly initialised")

    state: dict[str, torch.Tensor] = {}
    skipped: list[str] = []  # the file's tensors left out: classifiers of another class count
    new_classes: tuple[int, int] | None = None
    for i, ((name, t), (key, v)) in enumerate(zip(theirs, ours)):
        where = f"its tensor #{i} {name!r} {_shape(t)} meets the network's {key!r} {_shape(v)}"
        if _kind(name) != _kind(key) or t.is_floating_point() != v.is_floating_point():
            raise mismatch(where + ", a tensor of another kind")
        if t.shape != v.shape:
            if key in CLASSIFIERS and t.shape[1:] == v.shape[1:]:
                if new_classifiers:
                    fresh.append(key)
                    skipped.append(name)
                    new_classes = (t.shape[0], v.shape[0])
                    continue
                raise mismatch(
                    f"{where}: the file classifies {t.shape[0]} classes, the network "
                    f"{v.shape[0]} (evaluate on the data set the weights were trained on, or "
                    f"fine-tune with augment.py --init_from)"
                )
            raise mismatch(where)
        state[key] = t.to(v.dtype)
    if len(theirs) != len(ours):
        if len(theirs) < len(ours):
            key, v = ours[len(theirs)]
            detail = f"the file ends after {len(theirs)} tensors, the network's {key!r} "
            detail += f"{_shape(v)} and {len(ours) - len(theirs) - 1} more have none"
        else:
            name, t = theirs[len(ours)]
            detail = f"the network ends after {len(ours)} tensors, the file's {name!r} "
            detail += f"{_shape(t)} and {len(theirs) - len(ours) - 1} more have no place"
        raise mismatch(detail)
    # Every pair fits; the counts of learned values must then agree too (the file's side read
    # by its names: weights and biases, not the BN running statistics).
    n_model = sum(p.numel() for k, p in model.named_parameters() if k not in fresh)
    n_file = sum(
        t.numel() for name, t in theirs if _kind(name) not in BN_BUFFERS and name not in skipped
    )
    if n_file != n_model:
        raise mismatch(f"the file has {n_file:,} parameters, the network {n_model:,}")
    if new_classes is not None:
        notes.append(
            f"new classifiers for {new_classes[1]} classes (the file's classify {new_classes[0]})"
        )
    return Matched(weights, state, fresh, unused, notes)


def load(model: nn.Module, weights: Weights, network: str) -> Matched:
    """Load every tensor of ``model`` from ``weights`` (:func:`match`, strict)."""
    matched = match(model, weights, network)
    apply(model, matched)
    return matched


def init_state(model: nn.Module, path: str, network: str) -> Matched:
    """The weights of ``path`` for fine-tuning ``model`` (``augment.py --init_from``): all
    but the classifiers when the class count differs (:func:`match` with new_classifiers)."""
    return match(model, read_weights(path), network, new_classifiers=True)


def warn_if_not_finite(path: str, tensors: Any) -> None:
    """One warning line on stderr when ``tensors`` ((name, tensor) pairs) hold NaN or infinite
    values: a network of such weights computes NaN, and its results would say only that."""
    bad = [n for n, t in tensors if t.is_floating_point() and not bool(torch.isfinite(t).all())]
    if bad:
        print(
            f"WARNING: the weights in {path} are not finite: {len(bad)} tensors hold NaN or "
            f"infinite values (the first: {bad[0]})",
            file=sys.stderr,
        )


def apply(model: nn.Module, matched: Matched) -> None:
    """Load ``matched.state`` into ``model`` (a network like the one it was matched on). The
    tensors left out must be exactly those :func:`match` named in ``fresh``, and the BN
    counters an old file lacks."""
    result = model.load_state_dict(matched.state, strict=False)
    left = {k for k in result.missing_keys if _kind(k) != "num_batches_tracked"}
    if left != set(matched.fresh) or result.unexpected_keys:  # a bug, not a user error
        raise RuntimeError(
            f"loading {matched.weights.path}: missing {sorted(left)[:3]}, unexpected "
            f"{result.unexpected_keys[:3]}"
        )


def network_defaults(path: str, dataset: str) -> dict[str, Any]:
    """The settings of the network the weights in ``path`` belong to, as defaults of
    ``augment.py --init_from`` for the flags not given: the authors' ImageNet network
    (``--imagenet_stem``, the published C=48 and 14 layers, and :func:`folder_defaults`) or
    their CIFAR network (C=36, 20 layers); for a checkpoint of this project, its config's."""
    weights = read_weights(path)
    if "config" in weights.meta:
        saved = weights.meta["config"]
        return {k: saved[k] for k in ("init_channels", "layers", "imagenet_stem") if k in saved}
    C, layers = PUBLISHED_SIZE["imagenet" if weights.imagenet else "cifar"]
    defaults = dict(init_channels=C, layers=layers, imagenet_stem=weights.imagenet)
    return {**defaults, **folder_defaults(dataset, weights.imagenet)}


def folder_defaults(dataset: str, imagenet: bool) -> dict[str, Any]:
    """``--image_size`` and ``--normalize`` for the authors' ImageNet network on an image folder
    other than imagenet (whose recipe has them already): the 224x224 inputs and ImageNet's mean
    and std it was trained on, not the folder's defaults (32, and its own mean and std)."""
    if imagenet and dataset in FOLDER_DATASETS and dataset != "imagenet":
        return dict(image_size=224, normalize=IMAGENET_NORMALIZE)
    return {}


def network_name(genotype: str, imagenet: bool, C: int, layers: int, n_classes: int) -> str:
    """The network, for messages: "DARTS_V2 (ImageNet network, C=48, 14 layers, 1000
    classes)"; a genotype given as a string is not repeated."""
    name = genotype if len(genotype) <= 40 and "(" not in genotype else "the given genotype"
    net = "ImageNet" if imagenet else "CIFAR"
    return f"{name} ({net} network, C={C}, {layers} layers, {n_classes} classes)"
