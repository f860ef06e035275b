"""Evaluate a trained network on the test set, from an augment checkpoint alone.

    python evaluate.py --checkpoint augments/cifar10/best.pth.tar [--data_path ./data/]

The genotype and the network's configuration are read from the checkpoint; the reported top-1
is the one augment.py logged for that checkpoint.
"""

from __future__ import annotations

import argparse
import sys

import torch
import torch.nn as nn

import genotypes as gt
from augment import amp_dtype, build_model
from checkpoint import load_checkpoint
from config import AugmentConfig, ConfigError
from distributed import resolve_device
from engine import data_loader, evaluate
from preproc import dataset_info, get_dataset
from utils import UserError, memory_format


def get_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("--checkpoint", required=True, help="checkpoint written by augment.py")
    p.add_argument("--dataset", default=None, help="data set (default: the checkpoint's)")
    p.add_argument("--data_path", default=None, help="data folder (default: the checkpoint's)")
    p.add_argument("--batch_size", type=int, default=256, help="batch size")
    p.add_argument("--workers", type=int, default=4, help="data-loader worker processes")
    p.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N")
    p.add_argument("--amp", default="none", help="mixed precision: none | bf16 | fp16 (CUDA)")
    return p


def run(args: argparse.Namespace) -> dict[str, float]:
    state = load_checkpoint(args.checkpoint)
    if "genotype" not in state:
        raise ConfigError(f"{args.checkpoint} is not an augment checkpoint (no genotype in it)")
    saved = state["config"]
    known = {k: v for k, v in saved.items() if k in AugmentConfig.__dataclass_fields__}
    cfg = AugmentConfig(**known)
    cfg.dataset = args.dataset or cfg.dataset
    cfg.data_path = args.data_path or cfg.data_path
    cfg.device, cfg.workers, cfg.batch_size = args.device, args.workers, args.batch_size
    cfg.amp = args.amp
    cfg.gpus = "0"  # one process evaluates; the run may have used several GPUs
    cfg.check()
    if cfg.dataset != saved["dataset"]:
        ds_new = dataset_info(cfg.dataset, cfg.data_path, cfg.image_size)
        ds_old = dataset_info(saved["dataset"], saved["data_path"], cfg.image_size)
        if ds_new != ds_old:
            raise ConfigError(
                f"the network was trained on {saved['dataset']} ({ds_old}); it cannot "
                f"classify {cfg.dataset} ({ds_new})"
            )
    device = resolve_device(cfg.device, cfg.gpu_ids())
    # An image folder's test split is val/, normalised as in training (the run's config holds
    # the mean and std it computed).
    test_data = get_dataset(
        cfg.dataset, cfg.data_path, False, image_size=cfg.image_size, normalize=cfg.normalize
    )
    loader = data_loader(test_data, cfg.batch_size, cfg.workers, device.type == "cuda")
    model = build_model(cfg, gt.from_str(state["genotype"]))
    try:
        model.load_state_dict(state["model"])
    except RuntimeError:
        raise ConfigError(
            f"the weights in {args.checkpoint} do not fit the network its config describes"
        ) from None
    model.to(device).to(memory_format=memory_format(cfg.memory_format))
    return evaluate(model, loader, device, nn.CrossEntropyLoss(), amp_dtype(cfg.amp, device))


def main(argv: list[str] | None = None) -> int:
    args = get_parser().parse_args(argv)
    try:
        result = run(args)
    except UserError as e:
        print(f"evaluate.py: error: {e}", file=sys.stderr)
        return 2
    print(
        f"Test loss {result['loss']:.4f} top1 {result['top1']:.2%} top5 {result['top5']:.2%} "
        f"({args.checkpoint}, PyTorch {torch.__version__})"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
