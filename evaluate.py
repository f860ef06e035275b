"""Evaluate a trained network on the test set: an augment checkpoint, or the authors' weights.

    python evaluate.py --checkpoint augments/cifar10/best.pth.tar [--data_path ./data/]
    python evaluate.py --official cifar10_model.pt --genotype DARTS_V2 --dataset cifar10
    python evaluate.py --official imagenet_model.pt --genotype DARTS_V2 --dataset imagenet \
        --data_path /data/imagenet

With --checkpoint the genotype and the network's configuration are read from the checkpoint;
the reported top-1 is the one augment.py logged for that checkpoint. With --official the file
holds tensors only (official.py reads the authors' formats): the network is built from
--genotype, the type of --dataset and of the file (the ImageNet network for imagenet or for
their ImageNet file) and --init_channels / --layers, whose defaults are the published
networks' (CIFAR: C=36, 20 layers; ImageNet: C=48, 14 layers); the file must fit it tensor for
tensor. On ImageNet the "test" split is val/.
"""

from __future__ import annotations

import argparse
import sys

import torch
import torch.nn as nn

import genotypes as gt
import official
from augment import amp_dtype, build_model
from checkpoint import load_checkpoint
from config import AugmentConfig, ConfigError
from distributed import resolve_device, set_tf32
from engine import data_loader, end_loader_workers, evaluate
from models.augment_cnn import AugmentCNN
from preproc import dataset_info, get_dataset, set_max_image_pixels
from utils import UserError, memory_format

OFFICIAL_ONLY = ("genotype", "init_channels", "layers", "imagenet_stem")


def get_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    source = p.add_mutually_exclusive_group(required=True)
    source.add_argument(
        "--checkpoint", help="checkpoint written by augment.py or scripts/convert_official.py"
    )
    source.add_argument(
        "--official",
        help="the authors' released weights (their cifar10_model.pt, imagenet_model.pt, or any "
        "file in those formats); needs --genotype and --dataset",
    )
    p.add_argument(
        "--dataset", default=None, help="data set (default: the checkpoint's; --official: required)"
    )
    p.add_argument("--data_path", default=None, help="data folder (default: the checkpoint's)")
    p.add_argument(
        "--genotype", default=None, help="--official: the weights' genotype (DARTS_V2 for theirs)"
    )
    p.add_argument(
        "--init_channels",
        type=int,
        default=None,
        help="--official: C (default: the published 36, or 48 for the ImageNet network)",
    )
    p.add_argument(
        "--layers",
        type=int,
        default=None,
        help="--official: cells (default: the published 20, or 14 for the ImageNet network)",
    )
    p.add_argument(
        "--imagenet_stem",
        action="store_true",
        help="--official: the ImageNet network on a data set other than imagenet (implied by "
        "--dataset imagenet and by a file holding the authors' ImageNet network)",
    )
    p.add_argument("--batch_size", type=int, default=256, help="batch size")
    p.add_argument("--workers", type=int, default=4, help="data-loader worker processes")
    p.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N")
    p.add_argument("--amp", default="none", help="mixed precision: none | bf16 | fp16 (CUDA)")
    return p


def from_checkpoint(args: argparse.Namespace) -> tuple[AugmentConfig, AugmentCNN]:
    """The config and the network (weights loaded) of an augment checkpoint."""
    given = [f"--{k}" for k in OFFICIAL_ONLY if getattr(args, k) not in (None, False)]
    if given:
        raise ConfigError(f"{', '.join(given)} applies to --official (a checkpoint says it)")
    state = load_checkpoint(args.checkpoint)
    if "genotype" not in state:
        raise ConfigError(f"{args.checkpoint} is not an augment checkpoint (no genotype in it)")
    saved = state["config"]
    known = {k: v for k, v in saved.items() if k in AugmentConfig.__dataclass_fields__}
    cfg = AugmentConfig(**known)
    cfg.init_from = ""  # the weights are the checkpoint's, whatever the run started from
    cfg.dataset = args.dataset or cfg.dataset
    cfg.data_path = args.data_path or cfg.data_path
    _settings(cfg, args)
    if cfg.dataset != saved["dataset"]:
        ds_new = dataset_info(cfg.dataset, cfg.data_path, cfg.image_size)
        ds_old = dataset_info(saved["dataset"], saved["data_path"], cfg.image_size)
        if ds_new != ds_old:
            raise ConfigError(
                f"the network was trained on {saved['dataset']} ({ds_old}); it cannot "
                f"classify {cfg.dataset} ({ds_new})"
            )
    model = build_model(cfg, gt.from_str(state["genotype"]))
    try:
        model.load_state_dict(state["model"])
    except RuntimeError:
        raise ConfigError(
            f"the weights in {args.checkpoint} do not fit the network its config describes"
        ) from None
    official.warn_if_not_finite(args.checkpoint, state["model"].items())
    return cfg, model


def from_official(args: argparse.Namespace) -> tuple[AugmentConfig, AugmentCNN]:
    """The network of --genotype, --dataset, --init_channels and --layers, with the authors'
    weights of --official mapped onto it (official.py; one line naming the first tensor that
    does not fit, before any data is read)."""
    for flag in ("genotype", "dataset"):
        if not getattr(args, flag):
            raise ConfigError(
                f"--official needs --{flag} (the released weights: --genotype DARTS_V2, "
                f"--dataset cifar10 or imagenet)"
            )
    weights = official.read_weights(args.official)
    official.warn_if_not_finite(args.official, weights.tensors)
    genotype = gt.load(args.genotype)
    # The ImageNet network for imagenet, for --imagenet_stem, and for the authors' ImageNet file.
    imagenet = args.dataset == "imagenet" or args.imagenet_stem or weights.imagenet
    C, layers = official.PUBLISHED_SIZE["imagenet" if imagenet else "cifar"]
    cfg = AugmentConfig(
        name="official",
        dataset=args.dataset,
        genotype=args.genotype,
        init_channels=args.init_channels or C,
        layers=args.layers or layers,
        aux_weight=0.4 if weights.has_aux else 0.0,  # the network holds the file's head
        imagenet_stem=imagenet,
        **official.folder_defaults(args.dataset, imagenet),
    )
    cfg.data_path = args.data_path or cfg.data_path
    _settings(cfg, args)
    model = build_model(cfg, genotype)
    name = official.network_name(
        args.genotype, imagenet, cfg.init_channels, cfg.layers, model.linear.out_features
    )
    print(official.load(model, weights, name).summary())
    return cfg, model


def _settings(cfg: AugmentConfig, args: argparse.Namespace) -> None:
    """The evaluation's own settings, then the config's checks."""
    cfg.device, cfg.workers, cfg.batch_size = args.device, args.workers, args.batch_size
    cfg.amp = args.amp
    cfg.gpus = "0"  # one process evaluates; the run may have used several GPUs
    cfg.check()


def run(args: argparse.Namespace) -> dict[str, float]:
    cfg, model = from_official(args) if args.official else from_checkpoint(args)
    device = resolve_device(cfg.device, cfg.gpu_ids())
    set_tf32(cfg.allow_tf32)  # the run's precision (its checkpoint's --allow_tf32)
    set_max_image_pixels(cfg.max_image_pixels)  # the run's, from its config
    # An image folder's test split is val/, normalised as in training (the run's config holds
    # the mean and std it computed).
    test_data = get_dataset(
        cfg.dataset, cfg.data_path, False, image_size=cfg.image_size, normalize=cfg.normalize
    )
    loader = data_loader(test_data, cfg.batch_size, cfg.workers, device.type == "cuda")
    model.to(device).to(memory_format=memory_format(cfg.memory_format))
    return evaluate(model, loader, device, nn.CrossEntropyLoss(), amp_dtype(cfg.amp, device))


def main(argv: list[str] | None = None) -> int:
    args = get_parser().parse_args(argv)
    try:
        result = run(args)
    except UserError as e:
        print(f"evaluate.py: error: {e}", file=sys.stderr)
        return 2
    except BaseException:  # its traceback follows; the loader workers must not outlive it
        end_loader_workers()
        raise
    print(
        f"Test loss {result['loss']:.4f} top1 {result['top1']:.2%} top5 {result['top5']:.2%} "
        f"({args.checkpoint or args.official}, PyTorch {torch.__version__})"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
