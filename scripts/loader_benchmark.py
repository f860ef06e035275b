"""Training images per second of an image-folder loader, by number of worker processes.

    python scripts/loader_benchmark.py                         # a generated folder of JPEGs
    python scripts/loader_benchmark.py --data_path /data/imagenet --dataset imagenet

Decoding a JPEG and the ImageNet augmentation (RandomResizedCrop 224, flip, ColorJitter) run on
the CPU, in the loader's worker processes; at ImageNet scale they can starve a GPU. Without
``--data_path`` the script writes ``--images`` JPEGs of ``--side`` x 3/4 ``--side`` pixels (the
typical ImageNet photo is about 500 x 375) into a temporary folder. Each figure is the median of
``--repeats`` passes over ``--batches`` batches, after the untimed start-up and the batches the
workers prefetched during it.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)


def write_jpegs(root: str, n: int, side: int, classes: int = 10) -> None:
    import numpy as np
    from PIL import Image

    rng = np.random.RandomState(0)
    for split in ("train", "val"):
        for i in range(n if split == "train" else classes):
            folder = os.path.join(root, split, f"c{i % classes}")
            os.makedirs(folder, exist_ok=True)
            # Smooth noise compresses like a photo; pure noise would make huge JPEGs.
            small = rng.randint(0, 256, size=(side // 16, side * 3 // 64, 3), dtype=np.uint8)
            img = Image.fromarray(small).resize((side, side * 3 // 4), Image.BILINEAR)
            img.save(os.path.join(folder, f"{i}.jpg"), quality=90)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data_path", default=None, help="an image folder (default: generated)")
    p.add_argument("--dataset", default="imagenet", choices=("imagenet", "folder"))
    p.add_argument("--image_size", type=int, default=0, help="0: the data set's default")
    p.add_argument("--workers", default="0,2,4", help="comma list of worker counts")
    p.add_argument("--batch_size", type=int, default=32)
    p.add_argument("--batches", type=int, default=30, help="timed batches per pass")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--images", type=int, default=1600, help="generated images")
    p.add_argument("--side", type=int, default=500, help="generated images' width")
    args = p.parse_args(argv)

    import torch

    from engine import data_loader
    from preproc import get_dataset

    tmp = None
    if args.data_path is None:
        tmp = tempfile.TemporaryDirectory()
        args.data_path = tmp.name
        write_jpegs(args.data_path, args.images, args.side)
    data = get_dataset(
        args.dataset, args.data_path, train=True, augment=True, image_size=args.image_size
    )
    print(
        f"# {args.dataset} training transform, {len(data)} images in {args.data_path}, batch "
        f"{args.batch_size}, {os.cpu_count()} CPUs, torch {torch.__version__}, "
        f"threads {torch.get_num_threads()}; median of {args.repeats} x {args.batches} batches"
    )
    for workers in (int(w) for w in args.workers.split(",")):
        loader = data_loader(
            data,
            args.batch_size,
            workers,
            pin=False,
            shuffle=True,
        )
        rates = []
        for _ in range(args.repeats):
            it = iter(loader)
            # Untimed: the start-up, and the batches the workers prefetched meanwhile (2 each),
            # which would otherwise count as made in no time.
            for _ in range(2 * workers + 1):
                next(it)
            t0 = time.perf_counter()
            n = 0
            for _ in range(args.batches):
                try:
                    n += len(next(it)[1])
                except StopIteration:
                    it = iter(loader)
                    n += len(next(it)[1])
            rates.append(n / (time.perf_counter() - t0))
            del it  # its workers end here, before the next pass (or the folder's removal)
        print(f"workers {workers}: {statistics.median(rates):.0f} images/s")
    if tmp is not None:
        tmp.cleanup()
    return 0


if __name__ == "__main__":
    sys.exit(main())
