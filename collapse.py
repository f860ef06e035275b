"""Watching for DARTS' collapse (DARTS.md section 9): the cell statistics of each epoch, the
dominant eigenvalue of the alpha Hessian, and the published early-stopping rules.

* :func:`cell_stats`: the count of each op in an epoch's normal and reduce genotypes.
* :func:`power_iteration` and :class:`HessianProbe`: the dominant eigenvalue of the Hessian of
  the validation loss with respect to the alphas (Zela et al., ICLR 2020), by power iteration
  on exact Hessian-vector products (double backward over the alphas only).
* :func:`skip_stop` (DARTS+) and :func:`eigen_stop` (DARTS-ES): pure functions of the history,
  so the epoch at which a rule fires is testable on synthetic histories.

Nothing here draws from a global random stream or leaves a trace on the model: a search with
the probe on trains exactly as one with it off.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.nn as nn

import genotypes as gt
from distributed import all_reduce_mean, tf32_disabled

SKIP = "skip_connect"
# DARTS+ (Liang et al. 2019): stop once the normal cell holds this many skip-connects.
SKIP_LIMIT = 2
# DARTS-ES (Zela et al. 2020): window of the running mean, look-back k and the threshold.
ES_WINDOW = 5
ES_K = 5
ES_THRESHOLD = 0.75
# The probe: alpha-half batches of the fixed set, power-iteration budget and tolerance.
EIGEN_BATCHES = 2
EIGEN_ITERS = 20
EIGEN_TOL = 1e-3


# --------------------------------------------------------------------------------------------
# Cell statistics
# --------------------------------------------------------------------------------------------
def op_counts(cell: Sequence[Sequence[tuple[str, int]]]) -> dict[str, int]:
    """How many (op, input) pairs of ``cell`` use each op, for every primitive but ``none``
    (which a derived cell never holds); zero counts included, in PRIMITIVES' order."""
    counts = {op: 0 for op in gt.PRIMITIVES if op != "none"}
    for node in cell:
        for op, _ in node:
            counts[op] = counts.get(op, 0) + 1
    return counts


def cell_stats(genotype: gt.Genotype) -> dict[str, Any]:
    """The epoch's metrics keys: ``normal_ops`` / ``reduce_ops`` ({op: count}) and the
    skip-connect counts ``normal_skip`` / ``reduce_skip`` (scalars, so tensorboard gets them)."""
    normal, reduce = op_counts(genotype.normal), op_counts(genotype.reduce)
    return {
        "normal_ops": normal,
        "reduce_ops": reduce,
        "normal_skip": normal[SKIP],
        "reduce_skip": reduce[SKIP],
    }


# --------------------------------------------------------------------------------------------
# The dominant eigenvalue of the alpha Hessian
# --------------------------------------------------------------------------------------------
def power_iteration(
    hvp: Callable[[torch.Tensor], torch.Tensor],
    v0: torch.Tensor,
    iters: int = EIGEN_ITERS,
    tol: float = EIGEN_TOL,
) -> tuple[float, int]:
    """The dominant (largest in magnitude, signed) eigenvalue of the symmetric operator ``hvp``
    (a flat vector -> H @ vector), by power iteration from ``v0``: v <- Hv / |Hv|, the estimate
    being the Rayleigh quotient v^T H v. Stops when it changes by less than ``tol`` (relative)
    between two iterations, or after ``iters`` products. Returns (eigenvalue, products used)."""
    v = v0 / v0.norm()
    eig = float("nan")
    for n in range(1, iters + 1):
        hv = hvp(v)
        new = float(torch.dot(v, hv))  # Rayleigh quotient, |v| = 1
        norm = hv.norm()
        if norm == 0:  # H v = 0: v is in the kernel, and the estimate 0 is exact
            return 0.0, n
        v = hv / norm
        if n > 1 and abs(new - eig) <= tol * abs(new):
            return new, n
        eig = new
    return eig, iters


@dataclasses.dataclass
class Eigen:
    value: float  # the dominant eigenvalue
    products: int  # Hessian-vector products it took
    seconds: float  # the cost of the evaluation


class HessianProbe:
    """The dominant eigenvalue of the Hessian of the validation loss w.r.t. the alphas of
    ``model`` (a SearchCNNController), on a fixed set of batches ``batches`` (chosen once, so
    the curve compares like with like across epochs).

    The net runs in training mode, as in the search's architecture step (BatchNorm on batch
    statistics); the BatchNorm running statistics it would update are put back afterwards, so
    the search goes on exactly as without the probe. The Hessian-vector products are exact:
    the gradient of the loss w.r.t. the alphas is built with ``create_graph``, once per
    evaluation, and each product is a second backward through it, (d/dalpha)(g . v) = H v."""

    def __init__(self, batches: Sequence[tuple[torch.Tensor, torch.Tensor]], seed: int) -> None:
        self.batches = list(batches)
        self.seed = seed

    def __call__(
        self, model: nn.Module, epoch: int, iters: int = EIGEN_ITERS, tol: float = EIGEN_TOL
    ) -> Eigen:
        t0 = time.time()
        alphas = list(model.alphas())  # type: ignore[operator]
        buffers = [b.detach().clone() for b in model.buffers()]
        was_training = model.training
        model.train()
        try:
            with tf32_disabled():
                # L = mean over the fixed batches of the validation loss (their mean Hessian).
                loss = sum(model.loss(X, y) for X, y in self.batches) / len(self.batches)  # type: ignore[operator]
                # (A net of 2 layers has no normal cell: its alphas take no part, and their
                # rows of the Hessian are 0.)
                grads = torch.autograd.grad(loss, alphas, create_graph=True, allow_unused=True)
                g = _flat(grads, alphas)

                def hvp(v: torch.Tensor) -> torch.Tensor:
                    if not g.requires_grad:  # no alpha takes part
                        return torch.zeros_like(v)
                    hv = torch.autograd.grad(
                        g, alphas, grad_outputs=v, retain_graph=True, allow_unused=True
                    )
                    return _flat(hv, alphas).detach()

                # The start vector comes from the seed and the epoch, never from the search's
                # random streams: a resumed run gets the same one.
                gen = torch.Generator().manual_seed(self.seed * 100_003 + epoch)
                v0 = torch.randn(g.numel(), generator=gen, dtype=g.dtype).to(g.device)
                value, products = power_iteration(hvp, v0, iters, tol)
        finally:
            model.train(was_training)
            with torch.no_grad():
                for b, saved in zip(model.buffers(), buffers):
                    b.copy_(saved)
        # Under DDP every process holds the same alphas and weights; the mean makes the value,
        # and so any stop it triggers, the same in all of them.
        t = torch.tensor([value], dtype=torch.float64, device=alphas[0].device)
        all_reduce_mean([t])
        return Eigen(float(t.item()), products, time.time() - t0)


def _flat(grads: Sequence[torch.Tensor | None], like: Sequence[torch.Tensor]) -> torch.Tensor:
    """The gradients as one flat vector, 0 for a tensor that took no part."""
    return torch.cat(
        [(torch.zeros_like(p) if t is None else t).reshape(-1) for t, p in zip(grads, like)]
    )


def fixed_batches(
    dataset: Any, indices: Sequence[int], seed: int, n_batches: int, batch_size: int,
    device: torch.device,
) -> list[tuple[torch.Tensor, torch.Tensor]]:  # fmt: skip
    """``n_batches`` batches of ``batch_size`` images drawn once from ``indices`` (the alpha
    half) by the seed, as (X, y) on ``device``. ``dataset`` should be the un-augmented one, so
    the batches are the same in a fresh and a resumed run; nothing draws from a global RNG."""
    gen = torch.Generator().manual_seed(seed)
    order = torch.randperm(len(indices), generator=gen).tolist()
    batches = []
    for b in range(n_batches):
        chosen = [indices[i] for i in order[b * batch_size : (b + 1) * batch_size]]
        if not chosen:
            break
        items = [dataset[i] for i in chosen]
        X = torch.stack([x for x, _ in items]).to(device)
        y = torch.tensor([int(t) for _, t in items]).to(device)
        batches.append((X, y))
    return batches


# --------------------------------------------------------------------------------------------
# Early stopping: pure functions of the history (a list of metrics rows, one per epoch)
# --------------------------------------------------------------------------------------------
@dataclasses.dataclass
class Stop:
    epoch: int  # the epoch at whose end the search stops
    final_epoch: int  # the epoch whose genotype is the result
    reason: str  # one line

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def skip_stop(history: Sequence[dict[str, Any]], limit: int = SKIP_LIMIT) -> Stop | None:
    """DARTS+: stop at the last epoch of ``history`` if its normal genotype holds ``limit`` or
    more skip-connects; the result is that epoch's genotype."""
    if not history:
        return None
    last = history[-1]
    n = int(last["normal_skip"])
    if n < limit:
        return None
    e = int(last["epoch"])
    return Stop(e, e, f"the normal cell holds {n} skip-connects (DARTS+ stops at {limit})")


def eigen_stop(
    history: Sequence[dict[str, Any]],
    window: int = ES_WINDOW,
    k: int = ES_K,
    threshold: float = ES_THRESHOLD,
) -> Stop | None:
    """DARTS-ES: with w(i) the mean of the eigenvalue over the ``window`` evaluations ending
    at evaluation i, stop at the last evaluation i when w(i - k) / w(i) < ``threshold``, and
    return the genotype of evaluation i - k. Only the epochs that hold ``hessian_eigen`` count
    (every epoch with --hessian_eigen 1, as in the paper); the last epoch must be one of them."""
    rows = [h for h in history if isinstance(h.get("hessian_eigen"), (int, float))]
    if not rows or rows[-1] is not history[-1] or len(rows) < window + k:
        return None
    eig = [float(h["hessian_eigen"]) for h in rows]

    def w(i: int) -> float:  # the windowed mean ending at evaluation i (0-based)
        return sum(eig[i - window + 1 : i + 1]) / window

    i = len(rows) - 1
    now, before = w(i), w(i - k)
    if now == 0 or before / now >= threshold:
        return None
    e, back = int(rows[i]["epoch"]), int(rows[i - k]["epoch"])
    return Stop(
        e,
        back,
        f"the windowed Hessian eigenvalue rose from {before:.4g} (epoch {back}) to {now:.4g}: "
        f"ratio {before / now:.3f} < {threshold} (DARTS-ES, window {window}, k {k})",
    )


def stop_decision(rule: str, history: Sequence[dict[str, Any]]) -> Stop | None:
    """The stop ``rule`` (``none``, ``skip`` or ``eigen``) calls for after the last epoch."""
    if rule == "skip":
        return skip_stop(history, SKIP_LIMIT)
    if rule == "eigen":
        return eigen_stop(history, ES_WINDOW, ES_K, ES_THRESHOLD)
    return None
