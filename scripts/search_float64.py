"""search.py in float64 (weights, alphas, BN statistics, batches): a tool to compare two
versions of the code without float32 rounding, not a training mode.

    OMP_NUM_THREADS=1 python scripts/search_float64.py --name g64 --dataset digits --epochs 2 \\
        --layers 5 --init_channels 8 --batch_size 64 --workers 0 --no_progress

A 2-epoch search picks its genotype from softmax weights that differ by ~1e-4 (still near
uniform), and Adam turns a gradient's last float32 bits into whole update steps: two float32
runs whose arithmetic is the same but for the order of float additions (a grouped conv for
separate convs, another thread count) end with different genotypes. In float64 they agree
(docs/benchmarks.md, the check of the batched edges; tests/test_search_cnn.py has a short
float64 search of both layouts).
"""

import os
import sys

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def main(argv: list[str] | None = None) -> int:
    if ROOT not in sys.path:
        sys.path.insert(0, ROOT)
    torch.set_default_dtype(torch.float64)  # the networks and alphas are built in float64
    import engine
    import search

    to_device = engine._to

    def to_float64(batch, device):  # type: ignore[no-untyped-def]
        out = to_device(batch, device)
        if isinstance(out, torch.Tensor) and out.is_floating_point():
            return out.double()
        return out

    engine._to = to_float64  # the loaders' float32 images, as float64
    return search.main(argv)


if __name__ == "__main__":
    sys.exit(main())
