"""The Architect's alpha gradient against an independent computation of the DARTS formula."""

import copy

import pytest
import torch
import torch.nn as nn

from architect import Architect
from models.search_cnn import SearchCNNController

MOMENTUM, WD, XI = 0.9, 3e-4, 0.05


def make_setup(seed=0):
    torch.manual_seed(seed)
    net = SearchCNNController(1, 4, 10, 3, nn.CrossEntropyLoss(), n_nodes=2).double()
    with torch.no_grad():  # alphas away from uniform so the Hessian term is not degenerate
        for a in net.alphas():
            a.normal_(0, 0.5)
    w_optim = torch.optim.SGD(net.weights(), XI, momentum=MOMENTUM, weight_decay=WD)
    X = torch.randn(16, 1, 8, 8, dtype=torch.float64)
    y = torch.randint(0, 10, (16,))
    trn, val = (X[:8], y[:8]), (X[8:], y[8:])
    # one real step so that the momentum buffers exist and enter the virtual step
    net.loss(*trn).backward()
    w_optim.step()
    w_optim.zero_grad()
    return net, w_optim, trn, val


def reference_gradient(net, w_optim, trn, val, xi):
    """DARTS eq. 7-8 on deep copies of the network, with plain tensor arithmetic."""
    base = copy.deepcopy(net)
    weights = list(base.weights())
    g_trn = torch.autograd.grad(base.loss(*trn), weights)
    virtual = copy.deepcopy(net)
    with torch.no_grad():
        for p_v, w, g, p in zip(virtual.weights(), weights, g_trn, net.weights()):
            buf = w_optim.state[p]["momentum_buffer"]
            p_v.copy_(w - xi * (MOMENTUM * buf + g + WD * w))
    val_loss = virtual.loss(*val)
    dalpha = torch.autograd.grad(val_loss, list(virtual.alphas()), retain_graph=True)
    dw = torch.autograd.grad(val_loss, list(virtual.weights()))
    eps = 0.01 / torch.cat([d.flatten() for d in dw]).norm()
    grads = []
    for sign in (1, -1):
        shifted = copy.deepcopy(net)
        with torch.no_grad():
            for p, d in zip(shifted.weights(), dw):
                p.add_(sign * eps * d)
        grads.append(torch.autograd.grad(shifted.loss(*trn), list(shifted.alphas())))
    hessian = [(gp - gn) / (2 * eps) for gp, gn in zip(*grads)]
    return [da - xi * h for da, h in zip(dalpha, hessian)], dalpha, hessian, dw


def test_second_order_gradient_matches_the_formula():
    net, w_optim, trn, val = make_setup()
    before = copy.deepcopy(net.state_dict())
    expected, dalpha, hessian, _ = reference_gradient(net, w_optim, trn, val, XI)

    Architect(net, MOMENTUM, WD).unrolled_backward(*trn, *val, XI, w_optim)

    for a, e in zip(net.alphas(), expected):
        torch.testing.assert_close(a.grad, e, rtol=1e-6, atol=1e-10)
    # the Hessian term is really there: it changes the gradient noticeably
    h_norm = torch.cat([h.flatten() for h in hessian]).norm()
    d_norm = torch.cat([d.flatten() for d in dalpha]).norm()
    assert XI * h_norm > 1e-3 * d_norm
    # weights, alphas and BN statistics are exactly as before
    after = net.state_dict()
    for k, v in before.items():
        assert torch.equal(after[k], v), k
    assert all(p.grad is None for p in net.weights())


def test_central_difference_converges_to_the_exact_hessian_vector_product():
    """The term the Architect approximates is d/dalpha (grad_w L_trn . dw): with a tiny step the
    central difference equals the double-backward product. (At DARTS' eps = 0.01 / ||dw|| it
    can be far from it on a small ReLU network: the step crosses ReLU and max-pool kinks.)"""
    net, w_optim, trn, val = make_setup(seed=1)
    *_, dw = reference_gradient(net, w_optim, trn, val, XI)
    weights, alphas = list(net.weights()), list(net.alphas())
    g = torch.autograd.grad(net.loss(*trn), weights, create_graph=True)
    exact = torch.autograd.grad(sum((gi * di).sum() for gi, di in zip(g, dw)), alphas)
    eps = 1e-6 / torch.cat([d.flatten() for d in dw]).norm()
    grads = []
    for sign in (1, -1):
        shifted = copy.deepcopy(net)
        with torch.no_grad():
            for p, d in zip(shifted.weights(), dw):
                p.add_(sign * eps * d)
        grads.append(torch.autograd.grad(shifted.loss(*trn), list(shifted.alphas())))
    for gp, gn, e in zip(*grads, exact):
        torch.testing.assert_close((gp - gn) / (2 * eps), e, rtol=1e-4, atol=1e-7)


def test_first_order_gradient_is_the_plain_validation_gradient():
    net, w_optim, trn, val = make_setup()
    ref = copy.deepcopy(net)
    expected = torch.autograd.grad(ref.loss(*val), list(ref.alphas()))
    before = copy.deepcopy(net.state_dict())
    Architect(net, MOMENTUM, WD).first_order_backward(*val)
    for a, e in zip(net.alphas(), expected):
        torch.testing.assert_close(a.grad, e)
    for k, v in before.items():
        assert torch.equal(net.state_dict()[k], v), k
    assert all(p.grad is None for p in net.weights())


@pytest.mark.parametrize("xi", [0.0])
def test_second_order_with_zero_lr_equals_first_order(xi):
    net, w_optim, trn, val = make_setup()
    Architect(net, MOMENTUM, WD).unrolled_backward(*trn, *val, xi, w_optim)
    second = [a.grad.clone() for a in net.alphas()]
    Architect(net, MOMENTUM, WD).first_order_backward(*val)
    for s, f in zip(second, net.alphas()):
        torch.testing.assert_close(s, f.grad)


def exact_hessian_reference(net, trn, dw):
    """d/dalpha (grad_w L_trn(w, alpha) . dw) by double backward, on a deep copy."""
    ref = copy.deepcopy(net)
    weights, alphas = list(ref.weights()), list(ref.alphas())
    g = torch.autograd.grad(ref.loss(*trn), weights, create_graph=True)
    dot = sum((gi * di).sum() for gi, di in zip(g, dw))
    return torch.autograd.grad(dot, alphas)


def test_exact_hessian_gradient_matches_double_backward():
    net, w_optim, trn, val = make_setup()
    before = copy.deepcopy(net.state_dict())
    _, dalpha, _, dw = reference_gradient(net, w_optim, trn, val, XI)
    exact = exact_hessian_reference(net, trn, dw)

    Architect(net, MOMENTUM, WD, hessian="exact").unrolled_backward(*trn, *val, XI, w_optim)

    for a, da, h in zip(net.alphas(), dalpha, exact):
        torch.testing.assert_close(a.grad, da - XI * h, rtol=1e-6, atol=1e-10)
    after = net.state_dict()
    for k, v in before.items():
        assert torch.equal(after[k], v), k
    assert all(p.grad is None for p in net.weights())


def test_finite_and_exact_hessian_differ_at_darts_eps_and_agree_at_small_eps():
    """Both modes compute the same product: at DARTS' eps the central difference is an
    approximation (ReLU and max-pool kinks inside the step), with a tiny eps it is exact."""
    net, w_optim, trn, val = make_setup(seed=1)
    _, dalpha, _, dw = reference_gradient(net, w_optim, trn, val, XI)
    exact = torch.cat([h.flatten() for h in exact_hessian_reference(net, trn, dw)])

    def architect_hessian(fd_scale):
        n = copy.deepcopy(net)
        arch = Architect(n, MOMENTUM, WD)
        arch.fd_scale = fd_scale
        opt = torch.optim.SGD(n.weights(), XI, momentum=MOMENTUM, weight_decay=WD)
        opt.load_state_dict(w_optim.state_dict())
        arch.unrolled_backward(*trn, *val, XI, opt)
        grad = torch.cat([a.grad.flatten() for a in n.alphas()])
        return (torch.cat([d.flatten() for d in dalpha]) - grad) / XI

    cos = torch.nn.functional.cosine_similarity
    assert cos(architect_hessian(1e-6), exact, dim=0) > 0.999999
    assert cos(architect_hessian(0.01), exact, dim=0) < 0.99


def test_finite_hessian_is_the_default():
    net, w_optim, trn, val = make_setup()
    Architect(net, MOMENTUM, WD).unrolled_backward(*trn, *val, XI, w_optim)
    default = [a.grad.clone() for a in net.alphas()]
    Architect(net, MOMENTUM, WD, hessian="finite").unrolled_backward(*trn, *val, XI, w_optim)
    for d, a in zip(default, net.alphas()):
        assert torch.equal(d, a.grad)
    assert Architect(net, MOMENTUM, WD).hessian == "finite"


def test_unknown_hessian_mode_is_refused():
    net, *_ = make_setup()
    with pytest.raises(ValueError, match="exact"):
        Architect(net, MOMENTUM, WD, hessian="gauss-newton")


def test_second_order_on_a_channels_last_network_matches_nchw():
    """The NHWC network (.to(memory_format=torch.channels_last)) gives the same alpha gradient."""

    net, w_optim, trn, val = make_setup()
    net_cl = copy.deepcopy(net).to(memory_format=torch.channels_last)
    opt_cl = torch.optim.SGD(net_cl.weights(), XI, momentum=MOMENTUM, weight_decay=WD)
    opt_cl.load_state_dict(w_optim.state_dict())
    Architect(net, MOMENTUM, WD).unrolled_backward(*trn, *val, XI, w_optim)
    Architect(net_cl, MOMENTUM, WD).unrolled_backward(*trn, *val, XI, opt_cl)
    for a, b in zip(net.alphas(), net_cl.alphas()):
        torch.testing.assert_close(a.grad, b.grad, rtol=1e-7, atol=1e-12)


def test_a_zero_validation_gradient_gives_a_zero_hessian_term():
    """dw' = 0 (a loss flat in w, as with one class): eps = 0.01 / ||dw'|| must not divide by
    zero; the Hessian term is 0 and the alpha gradient is dalpha at the virtual step."""
    net, w_optim, trn, val = make_setup()
    arch = Architect(net, MOMENTUM, WD)
    virtual = arch._virtual_gradients
    seen = {}

    def zero_dw(*args, **kw):
        val_loss, dalpha, dw = virtual(*args, **kw)
        seen["dalpha"] = [d.clone() for d in dalpha]
        return val_loss, dalpha, tuple(torch.zeros_like(d) for d in dw)

    arch._virtual_gradients = zero_dw
    arch.unrolled_backward(*trn, *val, XI, w_optim)
    _, dalpha, _, _ = reference_gradient(net, w_optim, trn, val, XI)
    for a, da, ref in zip(net.alphas(), seen["dalpha"], dalpha):
        assert torch.isfinite(a.grad).all()
        assert torch.equal(a.grad, da)  # da - xi * 0, exactly
        torch.testing.assert_close(a.grad, ref)  # the first-order term at the virtual step


class LoopArchitect(Architect):
    """The Architect as it was before torch._foreach_* (a frozen copy of its per-parameter
    loops): the reference that the batched arithmetic must reproduce."""

    def unrolled_backward(self, trn_X, trn_y, val_X, val_y, xi, w_optim):
        buffers = [(b, b.clone()) for b in self.net.buffers()]
        names, weights = zip(*self.net.named_weights())
        alphas = list(self.net.alphas())
        with self.net.alphas_frozen():
            g_trn = torch.autograd.grad(self.net.loss(trn_X, trn_y), weights)
        with torch.no_grad():
            w_virtual = []
            for w, g in zip(weights, g_trn):
                buf = w_optim.state.get(w, {}).get("momentum_buffer")
                step = g + self.w_weight_decay * w
                if buf is not None:
                    step = step + self.w_momentum * buf
                w_virtual.append((w - xi * step).requires_grad_())
        val_loss = self._loss(dict(zip(names, w_virtual)), val_X, val_y)
        grads = torch.autograd.grad(val_loss, alphas + w_virtual)
        dalpha, dw = grads[: len(alphas)], grads[len(alphas) :]
        if self.hessian == "exact":
            hessian = self._exact_hessian_vector_product(weights, alphas, dw, trn_X, trn_y)
        else:
            norm = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(d) for d in dw]))
            eps = self.fd_scale / norm.item()
            pair = []
            for sign in (1.0, -1.0):
                with torch.no_grad():
                    w_shift = {n: w + sign * eps * d for n, w, d in zip(names, weights, dw)}
                pair.append(torch.autograd.grad(self._loss(w_shift, trn_X, trn_y), alphas))
            hessian = [(gp - gn) / (2.0 * eps) for gp, gn in zip(*pair)]
        for a, da, h in zip(alphas, dalpha, hessian):
            a.grad = da - xi * h
        with torch.no_grad():
            for b, saved in buffers:
                b.copy_(saved)
        return val_loss.detach()


def _relative(a, b):
    return ((a - b).norm() / b.norm()).item()


@pytest.mark.parametrize("hessian", ["finite", "exact"])
def test_batched_arithmetic_equals_the_per_parameter_loops(hessian):
    """float64: the Architect's alpha gradient and validation loss equal the per-parameter
    loops' (LoopArchitect) to 1e-12 relative, and the network is left exactly as it was."""
    net, w_optim, trn, val = make_setup(seed=3)
    ref = copy.deepcopy(net)
    ref_optim = torch.optim.SGD(ref.weights(), XI, momentum=MOMENTUM, weight_decay=WD)
    ref_optim.load_state_dict(w_optim.state_dict())
    before = copy.deepcopy(net.state_dict())
    loss = Architect(net, MOMENTUM, WD, hessian=hessian).unrolled_backward(*trn, *val, XI, w_optim)
    loss_ref = LoopArchitect(ref, MOMENTUM, WD, hessian=hessian).unrolled_backward(
        *trn, *val, XI, ref_optim
    )
    assert _relative(loss, loss_ref) < 1e-12
    for a, b in zip(net.alphas(), ref.alphas()):
        assert _relative(a.grad, b.grad) < 1e-12
    for k, v in before.items():
        assert torch.equal(net.state_dict()[k], v), k
    assert [k for k in before] == [k for k in ref.state_dict()]
