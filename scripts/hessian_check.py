"""How far is the paper's finite-difference Hessian-vector product from the exact one?

    python scripts/hessian_check.py                       # CIFAR-10 shape, random batches
    python scripts/hessian_check.py --data digits --channels 8 --layers 5 --train_steps 20

Builds the supernet, optionally trains its weights for ``--train_steps`` steps (the first-order
search step of search.py, so the net is not at its initialisation), then takes the quantities of
one second-order step exactly as architect.Architect does: the virtual step w', the validation
gradient dw' = grad_w' L_val(w', alpha), and the Hessian-vector product
grad2_{alpha,w} L_trn(w, alpha) . dw' both by the central difference (eps = scale / ||dw'||, the
paper's scale is 0.01) and by double backward (``--hessian exact``). Prints, per eps scale, the
cosine similarity and the relative L2 difference between the two, and the size of the Hessian
term next to the first-order part of the alpha gradient (what the term changes).
"""

from __future__ import annotations

import argparse
import contextlib
import os
import sys

import torch
import torch.nn as nn

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import search  # noqa: E402
from architect import Architect  # noqa: E402
from config import SearchConfig  # noqa: E402
from distributed import tf32_disabled  # noqa: E402
from models.kernels import running_stats_frozen  # noqa: E402
from models.search_cnn import SearchCNNController  # noqa: E402

CFG = SearchConfig()  # the search defaults (the paper's): learning rates, momentum, decay
LR = CFG.w_lr  # xi of the virtual step, as search.py sets it at the first epoch


def get_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data", choices=("random", "digits"), default="random")
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--channels", type=int, default=16)
    p.add_argument("--layers", type=int, default=8)
    p.add_argument("--train_steps", type=int, default=0, help="weight/alpha steps first")
    p.add_argument("--scales", default="0.01,0.001,0.0001", help="eps * ||dw'|| values")
    p.add_argument("--seed", type=int, default=2)
    p.add_argument(
        "--dtype",
        choices=("float32", "float64"),
        default="float32",
        help="float64: rounding out of the way (the central difference then converges)",
    )
    return p


def batches(args: argparse.Namespace) -> tuple[int, int, list[tuple[torch.Tensor, ...]]]:
    """(input channels, classes, a list of (X, y) batches: two per step, and two more)."""
    n = 2 * args.train_steps + 2
    if args.data == "random":
        shape = (args.batch, 3, 32, 32)
        return 3, 10, [(torch.randn(shape), torch.randint(0, 10, (args.batch,))) for _ in range(n)]
    from preproc import get_dataset

    data = get_dataset("digits", "", train=True)
    perm = torch.randperm(len(data))
    out = []
    for i in range(n):
        idx = perm[(i * args.batch) % len(data) :][: args.batch]
        X = torch.stack([data[j][0] for j in idx])
        out.append((X, torch.tensor([data[j][1] for j in idx])))
    return out[0][0].shape[1], 10, out


def main(argv: list[str] | None = None) -> int:
    args = get_parser().parse_args(argv)
    # Every product of the check in float32 proper on a GPU, as the Architect takes its Hessian
    # term: TF32's rounding would be compared, not the two products.
    with tf32_disabled():
        return check(args)


def check(args: argparse.Namespace) -> int:
    torch.manual_seed(args.seed)
    c_in, n_classes, data = batches(args)
    model = SearchCNNController(c_in, args.channels, n_classes, args.layers, nn.CrossEntropyLoss())
    model.to(memory_format=torch.channels_last)
    if args.dtype == "float64":
        model.double()
        data = [(X.double(), y) for X, y in data]
    w_optim = torch.optim.SGD(
        model.weights(), LR, momentum=CFG.w_momentum, weight_decay=CFG.w_weight_decay
    )
    a_optim = torch.optim.Adam(
        model.alphas(), CFG.alpha_lr, betas=(0.5, 0.999), weight_decay=CFG.alpha_weight_decay
    )
    architect = Architect(model, CFG.w_momentum, CFG.w_weight_decay)
    for i in range(args.train_steps):
        trn, val = data[2 * i], data[2 * i + 1]
        search.search_step(model, architect, w_optim, a_optim, trn, val, LR, True, CFG.w_grad_clip)
    (trn_X, trn_y), (val_X, val_y) = data[-2], data[-1]

    # The quantities of Architect.unrolled_backward, by its own steps.
    names, weights = zip(*model.named_weights())
    alphas = list(model.alphas())
    # As in unrolled_backward, the passes leave the BN running statistics as they were.
    frozen = contextlib.ExitStack()
    frozen.enter_context(running_stats_frozen())
    _, dalpha, dw = architect._virtual_gradients(
        names, weights, alphas, trn_X, trn_y, val_X, val_y, LR, w_optim
    )

    def flat(ts: list[torch.Tensor] | tuple[torch.Tensor, ...]) -> torch.Tensor:
        return torch.cat([t.flatten() for t in ts]).double()

    exact = flat(architect._exact_hessian_vector_product(weights, alphas, dw, trn_X, trn_y))
    first = flat(dalpha)
    print(
        f"supernet C={args.channels}, {args.layers} layers, batch {args.batch}, {args.data} "
        f"data, after {args.train_steps} training steps; PyTorch {torch.__version__}, "
        f"{args.dtype}"
    )
    print(
        f"||grad_alpha L_val(w')|| = {first.norm():.4e}; exact Hessian term "
        f"xi * ||H dw'|| = {LR * exact.norm():.4e} (xi = {LR})"
    )
    for scale in (float(s) for s in args.scales.split(",")):
        architect.fd_scale = scale
        finite = flat(architect._hessian_vector_product(names, weights, alphas, dw, trn_X, trn_y))
        cos = torch.nn.functional.cosine_similarity(finite, exact, dim=0).item()
        rel = ((finite - exact).norm() / exact.norm()).item()
        full_cos = torch.nn.functional.cosine_similarity(
            first - LR * finite, first - LR * exact, dim=0
        ).item()
        print(
            f"eps = {scale:g} / ||dw'||: cosine(finite, exact) = {cos:.4f}, "
            f"||finite - exact|| / ||exact|| = {rel:.3f}, cosine of the full alpha gradients "
            f"= {full_cos:.6f}"
        )
    frozen.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
