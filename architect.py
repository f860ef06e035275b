"""The architecture step of DARTS: the gradient of the validation loss w.r.t. the alphas.

Second order (paper, eq. 6-8): with one virtual SGD step w' = w - xi * dw L_trn(w, alpha),

    grad_alpha L_val(w', alpha) - xi * grad2_{alpha,w} L_trn(w, alpha) . grad_w' L_val(w', alpha)

and the Hessian-vector product by central finite differences at the original weights,
w+- = w +- eps * grad_w' L_val(w', alpha), eps = 0.01 / ||grad_w' L_val||.

The virtual step is taken with ``torch.func.functional_call`` on tensors of virtual weights, so
the network is never copied and its parameters are never written: the weights, and the batch-norm
running statistics that the extra forward passes would update, are exactly as they were after
the call.
"""

from __future__ import annotations

import torch
import torch.nn as nn
from torch.func import functional_call

from models.search_cnn import SearchCNNController


class Architect:
    """Computes alpha gradients for a :class:`SearchCNNController`."""

    def __init__(self, net: SearchCNNController, w_momentum: float, w_weight_decay: float) -> None:
        self.net = net
        self.w_momentum = w_momentum
        self.w_weight_decay = w_weight_decay

    # ----------------------------------------------------------------------------------------
    def _loss(
        self, params: dict[str, torch.Tensor], X: torch.Tensor, y: torch.Tensor
    ) -> torch.Tensor:
        """Loss of the network with some of its parameters replaced by ``params``."""
        return self.net.criterion(functional_call(self.net, params, (X,)), y)

    def _buffers_snapshot(self) -> list[tuple[torch.Tensor, torch.Tensor]]:
        return [(b, b.clone()) for b in self.net.buffers()]

    @staticmethod
    def _restore(snapshot: list[tuple[torch.Tensor, torch.Tensor]]) -> None:
        with torch.no_grad():
            for b, saved in snapshot:
                b.copy_(saved)

    # ----------------------------------------------------------------------------------------
    def first_order_backward(self, val_X: torch.Tensor, val_y: torch.Tensor) -> torch.Tensor:
        """alpha.grad = grad_alpha L_val(w, alpha) (the xi = 0 variant). Weight grads untouched."""
        snapshot = self._buffers_snapshot()
        alphas = list(self.net.alphas())
        loss = self.net.loss(val_X, val_y)
        grads = torch.autograd.grad(loss, alphas)
        for a, g in zip(alphas, grads):
            a.grad = g
        self._restore(snapshot)
        return loss.detach()

    def unrolled_backward(
        self,
        trn_X: torch.Tensor,
        trn_y: torch.Tensor,
        val_X: torch.Tensor,
        val_y: torch.Tensor,
        xi: float,
        w_optim: torch.optim.Optimizer,
    ) -> torch.Tensor:
        """Set ``alpha.grad`` to the second-order DARTS gradient; return the validation loss
        L_val(w', alpha). ``xi`` is the current weight learning rate; ``w_optim`` the SGD
        optimizer of the weights, whose momentum buffers enter the virtual step."""
        snapshot = self._buffers_snapshot()
        names, weights = zip(*self.net.named_weights())
        alphas = list(self.net.alphas())

        # 1. Virtual step w' = w - xi * (m * buf + grad_w L_trn(w, alpha) + wd * w).
        loss = self.net.loss(trn_X, trn_y)
        g_trn = torch.autograd.grad(loss, weights)
        with torch.no_grad():
            w_virtual = []
            for w, g in zip(weights, g_trn):
                buf = w_optim.state.get(w, {}).get("momentum_buffer")
                step = g + self.w_weight_decay * w
                if buf is not None:
                    step = step + self.w_momentum * buf
                w_virtual.append((w - xi * step).requires_grad_())
        del g_trn, loss

        # 2. dalpha = grad_alpha L_val(w', alpha), dw' = grad_w' L_val(w', alpha).
        val_loss = self._loss(dict(zip(names, w_virtual)), val_X, val_y)
        grads = torch.autograd.grad(val_loss, alphas + w_virtual)
        dalpha, dw = grads[: len(alphas)], grads[len(alphas) :]
        del w_virtual, grads

        # 3. Hessian-vector product grad2_{alpha,w} L_trn(w, alpha) . dw by central differences.
        hessian = self._hessian_vector_product(names, weights, alphas, dw, trn_X, trn_y)

        for a, da, h in zip(alphas, dalpha, hessian):
            a.grad = da - xi * h
        self._restore(snapshot)
        return val_loss.detach()

    def _hessian_vector_product(
        self,
        names: tuple[str, ...],
        weights: tuple[nn.Parameter, ...],
        alphas: list[nn.Parameter],
        dw: tuple[torch.Tensor, ...],
        trn_X: torch.Tensor,
        trn_y: torch.Tensor,
    ) -> list[torch.Tensor]:
        # eps = 0.01 / ||dw|| (paper, footnote to eq. 8). The weights at w +- eps * dw are
        # plain tensors: no weight gradient is computed in these two passes, only alpha's.
        eps = (
            0.01
            / torch.linalg.vector_norm(
                torch.stack([torch.linalg.vector_norm(d) for d in dw])
            ).item()
        )
        grads = []
        for sign in (1.0, -1.0):
            with torch.no_grad():
                w_shift = {n: w + sign * eps * d for n, w, d in zip(names, weights, dw)}
            loss = self._loss(w_shift, trn_X, trn_y)
            grads.append(torch.autograd.grad(loss, alphas))
            del w_shift, loss
        return [(gp - gn) / (2.0 * eps) for gp, gn in zip(*grads)]
