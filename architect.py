"""The architecture step of DARTS: the gradient of the validation loss w.r.t. the alphas.

Second order (paper, eq. 6-8): with one virtual SGD step w' = w - xi * dw L_trn(w, alpha),

    grad_alpha L_val(w', alpha) - xi * grad2_{alpha,w} L_trn(w, alpha) . grad_w' L_val(w', alpha)

and the Hessian-vector product by central finite differences at the original weights,
w+- = w +- eps * grad_w' L_val(w', alpha), eps = 0.01 / ||grad_w' L_val|| (``hessian="finite"``,
the paper's), or exactly by double backward (``hessian="exact"``): the alpha gradient of
grad_w L_trn(w, alpha) . dw', at the same original weights.

Each pass asks autograd only for what it needs, so nothing else is computed or kept for
backward: the virtual step differentiates the weights only (the alphas are frozen for it), the
finite differences the alphas only (the shifted weights are plain tensors). The Hessian term is
computed in float32 even under autocast: the shift eps * dw' is about 1e-5 of a weight, below
bfloat16's resolution, and the difference of two nearly equal gradients would be rounding noise.

The virtual step is taken with ``torch.func.functional_call`` on tensors of virtual weights, so
the network is never copied and its parameters are never written; the passes run within
:func:`models.kernels.running_stats_frozen`, so the batch-norm running statistics are not
updated either: the network is exactly as it was after the call.

The per-parameter arithmetic (virtual step, finite-difference shifts, the final combination) is
one ``torch._foreach_*`` call per operation over all tensors, each operation the one the
formula writes, in its order: the same roundings as a loop over the parameters, in a few calls
instead of a few per parameter.
"""

from __future__ import annotations

import torch
import torch.nn as nn
from torch.func import functional_call

from distributed import all_reduce_mean, tf32_disabled
from models.kernels import running_stats_frozen
from models.search_cnn import SearchCNNController

FD_SCALE = 0.01  # eps = FD_SCALE / ||dw'|| (paper, footnote to eq. 8)
# How the Hessian-vector product of eq. 7 is computed: the central difference of eq. 8 (the
# paper's) or double backward. config.py takes --hessian's choices from here, so that importing
# the architecture step needs neither the data sets (torchvision) nor the weight files.
HESSIAN_MODES = ("finite", "exact")


class Architect:
    """Computes alpha gradients for a :class:`SearchCNNController`.

    ``hessian`` chooses how the second-order gradient gets its Hessian-vector product:
    ``"finite"`` (default, the paper's central difference) or ``"exact"`` (double backward).
    """

    def __init__(
        self,
        net: SearchCNNController,
        w_momentum: float,
        w_weight_decay: float,
        hessian: str = "finite",
    ) -> None:
        if hessian not in HESSIAN_MODES:
            raise ValueError(f"hessian must be one of {', '.join(HESSIAN_MODES)}, got {hessian!r}")
        self.net = net
        self.w_momentum = w_momentum
        self.w_weight_decay = w_weight_decay
        self.hessian = hessian
        self.fd_scale = FD_SCALE

    # ----------------------------------------------------------------------------------------
    def _loss(
        self, params: dict[str, torch.Tensor], X: torch.Tensor, y: torch.Tensor
    ) -> torch.Tensor:
        """Loss of the network with some of its parameters replaced by ``params``."""
        return self.net.criterion(functional_call(self.net, params, (X,)), y)

    # ----------------------------------------------------------------------------------------
    def first_order_backward(self, val_X: torch.Tensor, val_y: torch.Tensor) -> torch.Tensor:
        """alpha.grad = grad_alpha L_val(w, alpha) (the xi = 0 variant). Weight grads untouched."""
        alphas = list(self.net.alphas())
        with running_stats_frozen():
            loss = self.net.loss(val_X, val_y)
        grads = torch.autograd.grad(loss, alphas)
        all_reduce_mean(grads)  # DDP: every process takes the same architecture step
        for a, g in zip(alphas, grads):
            a.grad = g
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
        names, weights = zip(*self.net.named_weights())
        alphas = list(self.net.alphas())
        with running_stats_frozen():
            val_loss, dalpha, dw = self._virtual_gradients(
                names, weights, alphas, trn_X, trn_y, val_X, val_y, xi, w_optim
            )

            # 3. Hessian-vector product grad2_{alpha,w} L_trn(w, alpha) . dw at the original
            # weights, in float32 proper: no autocast, no TF32 (see distributed.tf32_disabled).
            with torch.autocast(trn_X.device.type, enabled=False), tf32_disabled():
                if self.hessian == "exact":
                    hessian = self._exact_hessian_vector_product(weights, alphas, dw, trn_X, trn_y)
                else:
                    hessian = self._hessian_vector_product(names, weights, alphas, dw, trn_X, trn_y)

        all_reduce_mean(hessian)  # linear in the gradients: the mean of the processes' terms
        # alpha.grad = dalpha - xi * h
        torch._foreach_mul_(hessian, xi)
        for a, g in zip(alphas, torch._foreach_sub(dalpha, hessian)):
            a.grad = g
        return val_loss.detach()

    def _virtual_gradients(
        self,
        names: tuple[str, ...],
        weights: tuple[nn.Parameter, ...],
        alphas: list[nn.Parameter],
        trn_X: torch.Tensor,
        trn_y: torch.Tensor,
        val_X: torch.Tensor,
        val_y: torch.Tensor,
        xi: float,
        w_optim: torch.optim.Optimizer,
    ) -> tuple[torch.Tensor, tuple[torch.Tensor, ...], tuple[torch.Tensor, ...]]:
        """Steps 1 and 2 of the second-order gradient: (L_val(w', alpha), dalpha, dw'), with
        dalpha = grad_alpha L_val(w', alpha) and dw' = grad_w' L_val(w', alpha)."""
        # 1. Virtual step w' = w - xi * (m * buf + grad_w L_trn(w, alpha) + wd * w). Alphas
        # frozen: no alpha gradient is wanted, and the graph does not keep the ops' outputs
        # that only the alpha gradient needs.
        with self.net.alphas_frozen():
            loss = self.net.loss(trn_X, trn_y)
            g_trn = torch.autograd.grad(loss, weights)
        all_reduce_mean(g_trn)  # DDP: the same virtual step in every process
        with torch.no_grad():
            step = torch._foreach_mul(weights, self.w_weight_decay)  # wd * w
            torch._foreach_add_(step, g_trn)  # g + wd * w
            bufs = [w_optim.state.get(w, {}).get("momentum_buffer") for w in weights]
            with_buf = [i for i, b in enumerate(bufs) if b is not None]  # all after a step
            if with_buf:
                momentum = torch._foreach_mul([bufs[i] for i in with_buf], self.w_momentum)
                torch._foreach_add_([step[i] for i in with_buf], momentum)  # + m * buf
            torch._foreach_mul_(step, xi)
            w_virtual = torch._foreach_sub(weights, step)  # w - xi * step
        for w in w_virtual:
            w.requires_grad_()
        del g_trn, loss, step

        # 2. dalpha = grad_alpha L_val(w', alpha), dw' = grad_w' L_val(w', alpha).
        val_loss = self._loss(dict(zip(names, w_virtual)), val_X, val_y)
        grads = torch.autograd.grad(val_loss, [*alphas, *w_virtual])
        all_reduce_mean(grads)
        return val_loss, grads[: len(alphas)], grads[len(alphas) :]

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
        # eps stays a 0-d device tensor (no host-device synchronisation), in float64 as the
        # Python float it once was, so the shifts w +- eps * dw' round as they did. A zero dw (a
        # loss flat in w, e.g. one class) gives eps = 0.01 / tiny, finite in dw's dtype: both
        # shifts are then w itself and the term is exactly 0 instead of 0 / 0.
        norm = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(d) for d in dw]))
        eps = self.fd_scale / norm.clamp_min(torch.finfo(norm.dtype).tiny).double()
        grads = []
        for sign in (1.0, -1.0):
            with torch.no_grad():  # w +- eps * dw'; eps cast as a Python float would be
                shift = torch._foreach_mul(dw, (sign * eps).to(dw[0].dtype))
                w_shift = dict(zip(names, torch._foreach_add(weights, shift)))
            loss = self._loss(w_shift, trn_X, trn_y)
            grads.append(torch.autograd.grad(loss, alphas))
            del w_shift, shift, loss
        hessian = torch._foreach_sub(list(grads[0]), list(grads[1]))  # (gp - gn) / (2 eps)
        torch._foreach_div_(hessian, (2.0 * eps).to(hessian[0].dtype))
        return list(hessian)

    def _exact_hessian_vector_product(
        self,
        weights: tuple[nn.Parameter, ...],
        alphas: list[nn.Parameter],
        dw: tuple[torch.Tensor, ...],
        trn_X: torch.Tensor,
        trn_y: torch.Tensor,
    ) -> list[torch.Tensor]:
        """grad_alpha (grad_w L_trn(w, alpha) . dw) by double backward: exact, where the
        central difference is exact only as eps -> 0. Costs a backward with ``create_graph``
        and a backward through it, and the memory of that graph."""
        loss = self.net.loss(trn_X, trn_y)
        g = torch.autograd.grad(loss, weights, create_graph=True)
        dot = torch.stack([(gi * di).sum() for gi, di in zip(g, dw)]).sum()
        return list(torch.autograd.grad(dot, alphas))
