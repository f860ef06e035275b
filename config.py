"""Typed configurations of search.py and augment.py, their command lines and their checks.

Each config is a dataclass; its command line is generated from the fields (type, default, help,
choices, and the section of ``--help`` that lists it), so a flag cannot drift from the value it
sets. ``--help`` prints every default. ``--config <run folder>/config.json`` starts from the
settings of a saved run; the flags given on the command line win.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import sys
from dataclasses import dataclass, field
from typing import Any, ClassVar, NoReturn, TypeVar

import official
from architect import HESSIAN_MODES
from distributed import parse_gpus
from genotypes import MAX_NODES
from models.kernels import KERNEL_MODES
from preproc import DATASETS, FOLDER_DATASETS
from utils import ConfigError, code_version

T = TypeVar("T", bound="BaseConfig")
MEMORY_FORMATS = ("channels_last", "contiguous")
LR_SCHEDULES = ("cosine", "step", "linear")
AMP_MODES = ("none", "bf16", "fp16")
EARLY_STOP_RULES = ("none", "skip", "eigen")  # collapse.stop_decision's rules

# The sections of --help, in their order; each field names one as its ``group``.
GROUPS = {
    "run": "the run",
    "data": "data",
    "model": "model",
    "optim": "optimisation",
    "arch": "architecture (the alphas of the search)",
    "device": "device, distributed and speed",
}
# What config.json holds besides the settings (BaseConfig.save writes it): --config skips it.
METADATA_KEYS = ("code_version",)
# Settings of config.json that say how one invocation starts, not what the run is: --config
# leaves them out (a saved --resume would make every run started from the file a resume).
PER_INVOCATION = ("resume",)


__all__ = ["AugmentConfig", "BaseConfig", "ConfigError", "SearchConfig"]


def _arg(default: Any, help: str, *, group: str, **kw: Any) -> Any:
    """A field and its flag: ``help``, the --help section ``group`` (a key of :data:`GROUPS`),
    and anything else ``add_argument`` takes (``choices``, ``required``)."""
    return field(default=default, metadata={"help": help, "group": group, **kw})


def _invalid_choice(name: str, value: Any, choices: tuple[str, ...]) -> str:
    """argparse's words for a value outside ``choices``, for a value that did not come
    through argparse (a --config file, a config built in code)."""
    return f"--{name}: invalid choice: {value!r} (choose from {', '.join(map(repr, choices))})"


class _Parser(argparse.ArgumentParser):
    """An argument parser whose errors (a bad value, an unknown or missing flag) are
    ConfigError: one line and exit status 2 in the scripts (``engine.script_main``), like
    every other refused setting, rather than argparse's usage text."""

    def error(self, message: str) -> NoReturn:
        raise ConfigError(message.removeprefix("argument "))


@dataclass
class BaseConfig:
    name: str = _arg(
        "", "name of the run; results go to <folder>/<name>/", group="run", required=True
    )
    dataset: str = _arg("", "data set", group="data", required=True, choices=DATASETS)
    data_path: str = _arg("./data/", "where the data set lives (or is downloaded to)", group="data")
    device: str = _arg(
        "auto", "auto | cpu | cuda | cuda:N (auto: CUDA when available)", group="device"
    )
    gpus: str = _arg(
        "0",
        "GPU ids to use: comma list or 'all'; several start one process each (DDP), one is the "
        "GPU of the run; under torchrun, local rank r takes the r-th (left at 0: GPU r)",
        group="device",
    )
    allow_tf32: bool = _arg(
        False,
        "let CUDA use TF32 for float32 convolutions and matmuls (faster on Ampere and later, "
        "about 5e-4 relative rounding; the Architect's Hessian-vector product never uses it)",
        group="device",
    )
    seed: int = _arg(2, "random seed", group="run")
    workers: int = _arg(4, "data-loader worker processes", group="data")
    resume: bool = _arg(
        False, "continue the run from <folder>/<name>/checkpoint.pth.tar", group="run"
    )
    no_progress: bool = _arg(
        False, "no progress bar (it is off anyway when not on a terminal)", group="run"
    )
    memory_format: str = _arg(
        "channels_last",
        "layout of the activations (channels_last is about twice as fast on CPUs; the values "
        "are the same up to float rounding)",
        group="device",
        choices=MEMORY_FORMATS,
    )
    kernels: str = _arg(
        "auto",
        "the CPU formulations of models/kernels.py (fast) or their plain twins, the paper's "
        "modules (plain); auto: fast on the CPU, plain on CUDA. The same values up to float "
        "rounding",
        group="device",
        choices=KERNEL_MODES,
    )
    # Declared here for the shared checks; each script sets its own defaults below.
    batch_size: int = _arg(64, "batch size", group="optim")
    epochs: int = _arg(50, "number of epochs", group="optim")
    init_channels: int = _arg(16, "channels of the first cell", group="model")
    layers: int = _arg(8, "number of cells", group="model")
    print_freq: int = _arg(50, "log every this many steps", group="run")
    image_size: int = _arg(
        0,
        "image folders: side the images are resized and cropped to (0: 224 imagenet, 32 folder)",
        group="data",
    )
    normalize: str = _arg(
        "auto",
        "image folders: auto (imagenet: ImageNet's constants; folder: the mean and std of the "
        "training images, computed once) | imagenet | MEAN/STD, e.g. 0.5,0.5,0.5/0.2,0.2,0.2",
        group="data",
    )
    max_image_pixels: int = _arg(
        0,
        "image folders: read images of up to this many pixels (0: PIL's limit, 89,478,485); "
        "larger ones are skipped with a warning, as possible decompression bombs",
        group="data",
    )

    # Settings that --dataset imagenet changes unless given (the paper's ImageNet recipe).
    RECIPES: ClassVar[dict[str, dict[str, Any]]] = {}

    # ---------------------------------------------------------------------------------------
    @classmethod
    def parser(
        cls, description: str, config: bool = False, add_help: bool = True
    ) -> argparse.ArgumentParser:
        """The command line of the fields, in the sections of :data:`GROUPS`; with ``config``,
        the ``--config`` flag too (not a field: a run is the same whichever file started it)."""
        p = _Parser(
            description=description,
            formatter_class=argparse.ArgumentDefaultsHelpFormatter,
            add_help=add_help,
        )
        groups = {key: p.add_argument_group(title) for key, title in GROUPS.items()}
        if config:
            groups["run"].add_argument(
                "--config",
                help="start from the settings of a run's config.json (searchs/<name>/"
                "config.json, augments/<name>/config.json); the flags given here win",
            )
        for f in dataclasses.fields(cls):
            meta = dict(f.metadata)
            help_, group = meta.pop("help"), groups[meta.pop("group")]
            flag = "--" + f.name
            if f.type in ("bool", bool):
                group.add_argument(flag, action="store_true", help=help_)
            else:
                typ = {"int": int, "float": float, "str": str}[str(f.type)]
                kwargs: dict[str, Any] = {} if meta.get("required") else {"default": f.default}
                group.add_argument(flag, type=typ, help=help_, **kwargs, **meta)
        return p

    @classmethod
    def from_argv(cls: type[T], argv: list[str] | None = None) -> T:
        """The config of a command line. Each setting comes from, in order of precedence: the
        command line, the ``--config`` file, the recipe of the flags given (:meth:`recipe`,
        for the settings neither of them gives), the field's default. ConfigError (one line)
        on bad input."""
        argv = sys.argv[1:] if argv is None else list(argv)
        given = cls.given_flags(argv)
        saved = cls.read_config(given["config"]) if given.get("config") else {}
        parser = cls.parser(cls.__doc__ or "", config=True)
        parser.set_defaults(**saved)  # timm's pattern: the file's values become the defaults
        for action in parser._actions:
            if action.dest in saved:
                action.required = False  # --name, --dataset: the file gives them
        args = vars(parser.parse_args(argv))
        del args["config"]
        recipe = cls.recipe(args)
        args.update({k: v for k, v in recipe.items() if k not in given and k not in saved})
        cfg = cls(**args)
        cfg.check()
        return cfg

    @classmethod
    def given_flags(cls, argv: list[str]) -> dict[str, Any]:
        """The settings that ``argv`` gives, with their values, whatever their spelling
        (--name x, --name=x, the prefixes argparse takes); nothing else. --help is left to the
        full parse, which prints the defaults."""
        p = cls.parser("", config=True, add_help=False)
        for action in p._actions:
            action.default, action.required = argparse.SUPPRESS, False
        return vars(p.parse_known_args(argv)[0])

    @classmethod
    def read_config(cls, path: str) -> dict[str, Any]:
        """The settings of a config.json (:meth:`save`), checked: ConfigError (one line) for a
        file that is missing or not a JSON object, a key that is no setting of this script, or a
        value of the wrong type. The code version and :data:`PER_INVOCATION` are left out."""
        try:
            with open(path) as f:
                saved = json.load(f)
        except OSError as e:
            raise ConfigError(f"--config: cannot read {path}: {e.strerror}") from None
        except ValueError as e:  # JSONDecodeError, UnicodeDecodeError
            raise ConfigError(f"--config: {path} is not a JSON file ({e})") from None
        if not isinstance(saved, dict):
            raise ConfigError(f"--config: {path} holds no JSON object of settings")
        fields = {f.name: f for f in dataclasses.fields(cls)}
        unknown = [k for k in saved if k not in fields and k not in METADATA_KEYS]
        if unknown:
            raise ConfigError(
                f"--config: {path} holds unknown settings: {', '.join(unknown)} (a config.json "
                f"of the other script?)"
            )
        settings = {}
        for key, value in saved.items():
            if key in METADATA_KEYS or key in PER_INVOCATION:
                continue
            kind = str(fields[key].type)
            if kind == "float" and isinstance(value, int) and not isinstance(value, bool):
                value = float(value)  # 5 in a file written by hand
            if type(value).__name__ != kind:
                raise ConfigError(
                    f"--config: {key} in {path} must be of type {kind}, got {value!r}"
                )
            settings[key] = value
        return settings

    @classmethod
    def recipe(cls, args: dict[str, Any]) -> dict[str, Any]:
        """Defaults that the given flags imply, for the flags not given: --dataset's recipe."""
        return dict(cls.RECIPES.get(args["dataset"], {}))

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def record(self) -> dict[str, Any]:
        """The settings and the version of the code (:func:`utils.code_version`): what
        config.json and the log's header hold."""
        return {**self.to_dict(), "code_version": code_version()}

    def save(self, path: str) -> None:
        with open(path, "w") as f:
            json.dump(self.record(), f, indent=2)

    def __str__(self) -> str:
        items = self.record()
        width = max(len(k) for k in items)
        return "\n".join(f"  {k.upper():<{width}} = {v}" for k, v in items.items())

    # ---------------------------------------------------------------------------------------
    def check(self) -> None:
        """Raise ConfigError on settings that cannot work, before anything is written."""
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if isinstance(value, float) and not math.isfinite(value):
                raise ConfigError(f"--{f.name} must be a finite number, got {value}")
            # argparse checks the command line's values; these may come from a file or code.
            choices = f.metadata.get("choices")
            if choices is not None and value not in choices:
                raise ConfigError(_invalid_choice(f.name, value, choices))
        # A name of only spaces would make a folder that no one can see or type.
        if not self.name.strip() or os.sep in self.name or self.name in (".", ".."):
            raise ConfigError(f"--name must be a plain folder name, got {self.name!r}")
        if self.max_image_pixels < 0:
            raise ConfigError(f"--max_image_pixels must be >= 0, got {self.max_image_pixels}")
        if self.workers < 0:
            raise ConfigError(f"--workers must be >= 0, got {self.workers}")
        _positive(self, "batch_size", "epochs", "layers", "init_channels", "print_freq")
        if self.layers < 3:
            raise ConfigError(
                f"--layers must be >= 3 to hold the two reduction cells, got {self.layers}"
            )
        if self.init_channels % 2:
            raise ConfigError(
                f"--init_channels must be even (FactorizedReduce splits the channels in two), "
                f"got {self.init_channels}"
            )
        self.gpu_ids()
        dev = self.device
        if not (dev in ("auto", "cpu", "cuda") or (dev.startswith("cuda:") and dev[5:].isdigit())):
            raise ConfigError(f"--device must be auto, cpu, cuda or cuda:N, got {dev!r}")
        if self.image_size < 0 or (self.image_size and self.dataset not in FOLDER_DATASETS):
            raise ConfigError(
                f"--image_size applies to image folders ({', '.join(FOLDER_DATASETS)}), as a "
                f"positive side, got {self.image_size} for {self.dataset}"
            )

    def gpu_ids(self) -> list[int] | None:
        """The ids of --gpus, or None for 'all'."""
        return parse_gpus(self.gpus)


def _positive(cfg: BaseConfig, *names: str) -> None:
    for n in names:
        v = getattr(cfg, n)
        if v <= 0:
            raise ConfigError(f"--{n} must be positive, got {v}")


@dataclass
class SearchConfig(BaseConfig):
    """DARTS search: train the supernet and the architecture, print the genotype."""

    batch_size: int = _arg(64, "batch size", group="optim")
    w_lr: float = _arg(0.025, "learning rate of the weights (cosine schedule)", group="optim")
    w_lr_min: float = _arg(0.001, "final learning rate of the weights", group="optim")
    w_momentum: float = _arg(0.9, "SGD momentum of the weights", group="optim")
    w_weight_decay: float = _arg(3e-4, "weight decay of the weights", group="optim")
    w_grad_clip: float = _arg(5.0, "gradient-norm clipping of the weights", group="optim")
    print_freq: int = _arg(50, "log every this many steps", group="run")
    epochs: int = _arg(50, "number of search epochs", group="optim")
    init_channels: int = _arg(16, "channels of the first cell", group="model")
    layers: int = _arg(8, "number of cells", group="model")
    nodes: int = _arg(4, "intermediate nodes per cell", group="model")
    alpha_lr: float = _arg(3e-4, "Adam learning rate of the alphas", group="arch")
    alpha_weight_decay: float = _arg(1e-3, "weight decay of the alphas", group="arch")
    first_order: bool = _arg(
        False, "first-order approximation (xi = 0) instead of second order", group="arch"
    )
    hessian: str = _arg(
        "finite",
        "second-order Hessian-vector product: finite (central difference, the paper's) or exact "
        "(double backward)",
        group="arch",
        choices=HESSIAN_MODES,
    )
    train_portion: float = _arg(
        0.5,
        "portion of the search data that trains the weights; the rest trains the alphas",
        group="data",
    )
    select_portion: float = _arg(
        0.0,
        "portion of the training set held out from both halves to rank the epochs' genotypes "
        "(this project's addition; 0: the paper's exact 50/50 split, and the final genotype is "
        "the result)",
        group="data",
    )

    max_skip: int = _arg(
        0,
        "P-DARTS: at most this many skip-connects in the final normal cell, the weakest extra "
        "ones replaced by their node's next-best op (0: no limit, the paper's derivation)",
        group="arch",
    )

    hessian_eigen: int = _arg(
        0,
        "every this many epochs, the dominant eigenvalue of the Hessian of the validation loss "
        "w.r.t. the alphas (Zela et al.; 0: never)",
        group="arch",
    )
    early_stop: str = _arg(
        "none",
        "none, skip (DARTS+: stop when the normal cell holds 2 skip-connects) or eigen "
        "(DARTS-ES: stop when the windowed eigenvalue rises, return the genotype of 5 "
        "evaluations earlier; needs --hessian_eigen)",
        group="arch",
        choices=EARLY_STOP_RULES,
    )

    def check(self) -> None:
        super().check()
        _positive(self, "nodes")
        if self.hessian_eigen < 0:
            raise ConfigError(f"--hessian_eigen must be >= 0 (0: never), got {self.hessian_eigen}")
        if self.early_stop == "eigen" and not self.hessian_eigen:
            raise ConfigError("--early_stop eigen needs the eigenvalue: give --hessian_eigen N")
        if self.max_skip < 0:
            raise ConfigError(f"--max_skip must be >= 0 (0: no limit), got {self.max_skip}")
        if self.nodes > MAX_NODES:  # the genotype it prints must be readable back
            raise ConfigError(f"--nodes must be at most {MAX_NODES}, got {self.nodes}")
        if not 0.0 < self.train_portion < 1.0:
            raise ConfigError(f"--train_portion must be in (0, 1), got {self.train_portion}")
        if not 0.0 <= self.select_portion < 1.0:
            raise ConfigError(f"--select_portion must be in [0, 1), got {self.select_portion}")


@dataclass
class AugmentConfig(BaseConfig):
    """DARTS augment: train the network of a genotype from scratch and report test accuracy.
    With --dataset imagenet the defaults are the paper's ImageNet recipe: 250 epochs, batch
    128, lr 0.1 times 0.97 after every epoch, weight decay 3e-5, label smoothing 0.1, no drop
    path and no Cutout, C = 48, 14 layers, the ImageNet network; flags given, and the settings
    of a --config file, win."""

    genotype: str = _arg(
        "",
        "genotype string, published name (DARTS_V1, DARTS_V2) or the path of a genotype file",
        group="model",
        required=True,
    )
    init_from: str = _arg(
        "",
        "start from these weights instead of a random initialisation: the authors' released "
        "files (CIFAR state_dict, ImageNet checkpoint) or a checkpoint of this project. The "
        "network defaults to the file's (the authors' ImageNet network: --imagenet_stem, C 48, "
        "14 layers, and on a folder --image_size 224 --normalize imagenet; their CIFAR one: C "
        "36, 20 layers); a classifier of another class count (main and auxiliary) starts new",
        group="model",
    )
    batch_size: int = _arg(96, "batch size", group="optim")
    lr: float = _arg(0.025, "learning rate (initial; see --lr_schedule)", group="optim")
    lr_schedule: str = _arg(
        "cosine",
        "cosine (to 0), step (times --lr_gamma after every epoch) or linear (to 0)",
        group="optim",
        choices=LR_SCHEDULES,
    )
    lr_gamma: float = _arg(
        0.97, "--lr_schedule step: the factor applied after every epoch", group="optim"
    )
    warmup_epochs: int = _arg(
        0,
        "epochs of linear warm-up to --lr before the schedule (the lr is never rescaled)",
        group="optim",
    )
    label_smoothing: float = _arg(
        0.0, "label smoothing of the training losses (main, auxiliary)", group="optim"
    )
    amp: str = _arg(
        "none",
        "mixed precision: none, bf16 (CUDA, CPUs that support it) or fp16 (CUDA)",
        group="device",
        choices=AMP_MODES,
    )
    imagenet_stem: bool = _arg(
        False,
        "the ImageNet network's stride-8 stems (implied by --dataset imagenet)",
        group="model",
    )
    momentum: float = _arg(0.9, "SGD momentum", group="optim")
    weight_decay: float = _arg(3e-4, "weight decay", group="optim")
    grad_clip: float = _arg(5.0, "gradient-norm clipping", group="optim")
    print_freq: int = _arg(200, "log every this many steps", group="run")
    epochs: int = _arg(600, "number of training epochs", group="optim")
    init_channels: int = _arg(36, "channels of the first cell", group="model")
    layers: int = _arg(20, "number of cells", group="model")
    aux_weight: float = _arg(
        0.4, "weight of the auxiliary head's loss (0: no auxiliary head)", group="optim"
    )
    cutout_length: int = _arg(16, "side of the Cutout square (0: no Cutout)", group="data")
    drop_path_prob: float = _arg(
        0.2, "final drop-path probability (grows linearly from 0)", group="optim"
    )
    val_portion: float = _arg(
        0.0,
        "portion of the training set held out (not trained on) to choose the best epoch; 0: "
        "train on the whole training set, as the paper does (the best epoch is then chosen on "
        "the test set and is not a figure to compare)",
        group="data",
    )
    no_test: bool = _arg(
        False,
        "never open the test set: evaluate on the --val_portion split only (a selection run, "
        "as in the paper's protocol)",
        group="data",
    )

    RECIPES: ClassVar[dict[str, dict[str, Any]]] = {
        # The paper's ImageNet mobile setting (DARTS.md section 8; the authors' ImageNet script).
        "imagenet": dict(
            epochs=250,
            batch_size=128,
            lr=0.1,
            momentum=0.9,
            weight_decay=3e-5,
            lr_schedule="step",
            lr_gamma=0.97,
            label_smoothing=0.1,
            aux_weight=0.4,
            grad_clip=5.0,
            drop_path_prob=0.0,
            cutout_length=0,
            init_channels=48,
            layers=14,
            imagenet_stem=True,
        )
    }

    @classmethod
    def recipe(cls, args: dict[str, Any]) -> dict[str, Any]:
        """--dataset's recipe, then the network of --init_from's weights: their network type
        and size (official.network_defaults), which the file decides over the data set."""
        recipe = super().recipe(args)
        if args.get("init_from"):
            if not os.path.isfile(args["init_from"]):
                raise ConfigError(f"--init_from: no file at {args['init_from']}")
            recipe.update(official.network_defaults(args["init_from"], args["dataset"]))
        return recipe

    def check(self) -> None:
        super().check()
        if self.warmup_epochs < 0 or self.warmup_epochs >= self.epochs:
            raise ConfigError(f"--warmup_epochs must be in [0, --epochs), got {self.warmup_epochs}")
        if not 0.0 <= self.label_smoothing < 1.0:
            raise ConfigError(f"--label_smoothing must be in [0, 1), got {self.label_smoothing}")
        if self.aux_weight < 0:
            raise ConfigError(f"--aux_weight must be >= 0, got {self.aux_weight}")
        if self.batch_size == 1 and self.aux_weight > 0:
            # The auxiliary head's BN sees one value per channel (1x1 maps) of a single image.
            raise ConfigError(
                "--batch_size 1 cannot train the auxiliary head (its BatchNorm needs two "
                "images): use --batch_size 2 or more, or --aux_weight 0"
            )
        if self.cutout_length < 0:
            raise ConfigError(f"--cutout_length must be >= 0, got {self.cutout_length}")
        if not 0.0 <= self.drop_path_prob < 1.0:
            raise ConfigError(f"--drop_path_prob must be in [0, 1), got {self.drop_path_prob}")
        if not 0.0 <= self.val_portion < 1.0:
            raise ConfigError(f"--val_portion must be in [0, 1), got {self.val_portion}")
        if self.no_test and self.val_portion == 0:
            raise ConfigError("--no_test needs a --val_portion to evaluate on")
        # The file sets the network's defaults: a resumed run reads it too (not its weights).
        if self.init_from and not os.path.isfile(self.init_from):
            raise ConfigError(f"--init_from: no file at {self.init_from}")
