"""Convert the authors' released DARTS weights into a checkpoint of this project.

    python scripts/convert_official.py imagenet_model.pt --genotype DARTS_V2 --out v2.pth.tar
    python scripts/convert_official.py cifar10_model.pt --genotype DARTS_V2 --out v2_c10.pth.tar
    python evaluate.py --checkpoint v2.pth.tar --data_path /data/imagenet

The file's tensors are mapped by order onto the network of --genotype (official.py); every
shape is checked and a file that does not fit stops with one line (exit status 2). The output
holds "model" (this project's state_dict), "config" (an augment config: data set, size,
auxiliary head, network type) and "genotype", as augment.py writes them, so evaluate.py
--checkpoint and augment.py --init_from read it. The network is the ImageNet one for the
authors' ImageNet network (or --dataset imagenet, --imagenet_stem), at the published size
unless --init_channels / --layers say otherwise; the data set defaults to imagenet for it,
else to cifar10. The class count of an image folder is the file's; no data is read.
"""

from __future__ import annotations

import argparse
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)  # the project's modules, when run as scripts/convert_official.py

import genotypes as gt  # noqa: E402
import official  # noqa: E402
from checkpoint import save_checkpoint  # noqa: E402
from config import AugmentConfig  # noqa: E402
from models.augment_cnn import AugmentCNN  # noqa: E402
from preproc import DATASETS, FOLDER_DATASETS, FOLDER_SIZE, dataset_info  # noqa: E402
from utils import ConfigError, UserError  # noqa: E402


def get_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("weights", help="the authors' file (cifar10_model.pt, imagenet_model.pt)")
    p.add_argument("--genotype", required=True, help="the weights' genotype (DARTS_V2 for theirs)")
    p.add_argument("--out", required=True, help="the checkpoint to write")
    p.add_argument(
        "--dataset",
        default=None,
        help="the data set the checkpoint's config names: " + " | ".join(DATASETS) + " "
        "(default: imagenet for the authors' ImageNet network, else cifar10)",
    )
    p.add_argument(
        "--init_channels",
        type=int,
        default=None,
        help="C (default: the published 36, or 48 for the ImageNet network)",
    )
    p.add_argument(
        "--layers",
        type=int,
        default=None,
        help="cells (default: the published 20, or 14 for the ImageNet network)",
    )
    p.add_argument(
        "--imagenet_stem",
        action="store_true",
        help="the ImageNet network on a data set other than imagenet (implied by --dataset "
        "imagenet and by a file holding the authors' ImageNet network)",
    )
    return p


def convert(args: argparse.Namespace) -> str:
    """Write the checkpoint; returns the line that reports it."""
    weights = official.read_weights(args.weights)
    genotype = gt.load(args.genotype)
    dataset = args.dataset or ("imagenet" if weights.imagenet else "cifar10")
    if dataset not in DATASETS:
        raise ConfigError(f"unknown dataset {dataset!r} (choose from {', '.join(DATASETS)})")
    imagenet = dataset == "imagenet" or args.imagenet_stem or weights.imagenet
    C, layers = official.PUBLISHED_SIZE["imagenet" if imagenet else "cifar"]
    cfg = AugmentConfig(
        name=os.path.splitext(os.path.basename(args.out))[0] or "official",
        dataset=dataset,
        genotype=args.genotype,
        init_channels=args.init_channels or C,
        layers=args.layers or layers,
        aux_weight=0.4 if weights.has_aux else 0.0,  # the network holds the file's head
        imagenet_stem=imagenet,
        **official.folder_defaults(dataset, imagenet),
    )
    cfg.check()
    if dataset in FOLDER_DATASETS:  # its classes live in a folder this script does not read
        input_size, C_in, n_classes = cfg.image_size or FOLDER_SIZE[dataset], 3, weights.n_classes
    else:
        info = dataset_info(dataset)
        input_size, C_in, n_classes = info.input_size, info.input_channels, info.n_classes
    model = AugmentCNN(
        input_size,
        C_in,
        cfg.init_channels,
        n_classes,
        cfg.layers,
        weights.has_aux,
        genotype,
        imagenet=imagenet,
    )
    name = official.network_name(args.genotype, imagenet, cfg.init_channels, cfg.layers, n_classes)
    matched = official.load(model, weights, name)
    state = {
        "model": model.state_dict(),
        "config": cfg.to_dict(),
        "genotype": gt.to_str(genotype),
        "epoch": int(weights.meta.get("epoch", 0)),
        "official": {"source": os.path.abspath(args.weights), "format": weights.kind},
    }
    save_checkpoint(state, args.out)
    return f"{matched.summary()}\nWrote {args.out}: {name}, data set {dataset}"


def main(argv: list[str] | None = None) -> int:
    args = get_parser().parse_args(argv)
    try:
        print(convert(args))
    except UserError as e:
        print(f"convert_official.py: error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
