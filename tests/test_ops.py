"""Every primitive, at stride 1 and 2, in both BN modes: shapes and gradients."""

import pytest
import torch

from genotypes import PRIMITIVES
from models.ops import OPS, FactorizedReduce, MixedOp


@pytest.mark.parametrize("name", PRIMITIVES)
@pytest.mark.parametrize("stride", [1, 2])
@pytest.mark.parametrize("affine", [False, True])
@pytest.mark.parametrize("size", [8, 7])  # 7: odd sizes appear on MNIST after two reductions
def test_primitive_shape_and_gradient(name, stride, affine, size):
    torch.manual_seed(0)
    C = 4
    op = OPS[name](C, stride, affine)
    x = torch.randn(2, C, size, size, requires_grad=True)
    y = op(x)
    out = (size + stride - 1) // stride
    assert y.shape == (2, C, out, out)
    (y * torch.randn_like(y)).sum().backward()
    for n, p in op.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, f"{name}: no gradient for {n}"
    if name != "none":
        assert x.grad.abs().sum() > 0
    has_affine_bn = any(
        n.endswith("bn.weight") or (".weight" in n and p.dim() == 1)
        for n, p in op.named_parameters()
    )
    assert has_affine_bn == (
        affine
        and name not in ("none", "avg_pool_3x3", "max_pool_3x3")
        and not (name == "skip_connect" and stride == 1)
    )


def test_factorized_reduce_uses_both_pixel_phases():
    fr = FactorizedReduce(2, 4, affine=False)
    x = torch.zeros(1, 2, 4, 4)
    x[..., 1::2, 1::2] = 1.0  # only odd pixels: the unshifted branch at stride 2 never sees them
    fr.train()
    y = fr.conv2(torch.nn.functional.pad(x[:, :, 1:, 1:], (0, 1, 0, 1)))
    assert y.abs().sum() > 0
    assert fr.conv1(x).abs().sum() == 0


def test_mixed_op_is_softmax_weighted_sum_without_none():
    torch.manual_seed(0)
    mixed = MixedOp(4, 1).eval()
    assert len(mixed.ops) == len(PRIMITIVES) - 1  # `none` is not built
    x = torch.randn(2, 4, 6, 6)
    alpha = torch.randn(len(PRIMITIVES), requires_grad=True)
    w = torch.softmax(alpha, -1)
    y = mixed(x, w)
    expected = sum(w[i] * op(x) for i, op in zip(mixed.op_index, mixed.ops))
    torch.testing.assert_close(y, expected)
    y.sum().backward()
    # `none` contributes nothing forward but its alpha still gets a gradient via the softmax.
    assert alpha.grad[PRIMITIVES.index("none")] != 0


def test_pooling_followed_by_non_affine_bn_in_supernet():
    mixed = MixedOp(4, 2)
    for i, op in zip(mixed.op_index, mixed.ops):
        if "pool" in PRIMITIVES[i]:
            assert isinstance(op[1], torch.nn.BatchNorm2d) and not op[1].affine


# --------------------------------------------------------------------------------------------
# The fast formulations compute what the plain ones compute (float64, values and gradients)
# --------------------------------------------------------------------------------------------
CL = torch.channels_last


@pytest.mark.parametrize("k", [3, 5])
@pytest.mark.parametrize("dilation", [1, 2])
@pytest.mark.parametrize("stride", [1, 2])
@pytest.mark.parametrize("size", [8, 7, 2, 1])
@pytest.mark.parametrize("channels_last", [False, True])
def test_depthwise_conv2d_equals_conv2d(k, dilation, stride, size, channels_last):
    from models.kernels import depthwise_conv2d, use_kernels

    torch.manual_seed(0)
    fmt = CL if channels_last else torch.contiguous_format
    x = torch.randn(2, 3, size, size, dtype=torch.float64).contiguous(memory_format=fmt)
    w = torch.randn(3, 1, k, k, dtype=torch.float64).contiguous(memory_format=fmt)
    x.requires_grad_()
    w.requires_grad_()
    padding = dilation * (k - 1) // 2
    with use_kernels("plain"):  # the reference: the plain twin, through the switch
        ref = depthwise_conv2d(x, w, stride, padding, dilation)
    assert torch.equal(ref, torch.nn.functional.conv2d(x, w, None, stride, padding, dilation, 3))
    with use_kernels("fast"):
        out = depthwise_conv2d(x, w, stride, padding, dilation)
    torch.testing.assert_close(out, ref, rtol=1e-12, atol=1e-12)
    g = torch.randn_like(ref)
    for a, b in zip(torch.autograd.grad(out, (x, w), g), torch.autograd.grad(ref, (x, w), g)):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)


def test_depthwise_conv_is_twice_differentiable():
    """The exact Hessian of the Architect differentiates the weight gradient once more."""
    from models.kernels import _DepthwiseConv

    torch.manual_seed(0)
    for k, size in ((5, 7), (3, 2)):  # a wide kernel; a map smaller than the kernel
        x = torch.randn(2, 2, size, size, dtype=torch.float64, requires_grad=True)
        w = torch.randn(2, 1, k, k, dtype=torch.float64, requires_grad=True)
        for stride in (1, 2):
            f = lambda x, w, s=stride, p=k // 2: _DepthwiseConv.apply(x, w, s, p)  # noqa: E731
            assert torch.autograd.gradcheck(f, (x, w))
            assert torch.autograd.gradgradcheck(f, (x, w))


@pytest.mark.parametrize(
    ("k", "size", "own"), [(5, 8, True), (3, 2, True), (3, 1, True), (3, 3, False), (3, 8, False)]
)
def test_depthwise_conv2d_takes_its_own_weight_gradient_where_onednns_is_slow(k, size, own):
    """A kernel wider than 3 or a map smaller than the kernel: _DepthwiseConv (fast kernels);
    otherwise F.conv2d's own backward."""
    from models.kernels import depthwise_conv2d, use_kernels

    x = torch.randn(2, 3, size, size, requires_grad=True)
    w = torch.randn(3, 1, k, k, requires_grad=True)
    with use_kernels("fast"):
        out = depthwise_conv2d(x, w, 1, k // 2, 1)
    assert ("_DepthwiseConv" in type(out.grad_fn).__name__) == own
    with use_kernels("plain"):
        assert "_DepthwiseConv" not in type(depthwise_conv2d(x, w, 1, k // 2, 1).grad_fn).__name__


@pytest.mark.parametrize("size", [8, 7, 5])
def test_factorized_reduce_equals_shifted_stride_2_convs(size):
    torch.manual_seed(0)
    fr = FactorizedReduce(4, 6, affine=True).double()
    x = torch.randn(2, 4, size, size, dtype=torch.float64)
    r = torch.relu(x)
    shifted = torch.nn.functional.pad(r[:, :, 1:, 1:], (0, 1, 0, 1))  # the original formula
    expected = torch.cat([fr.conv1(r), fr.conv2(shifted)], dim=1)  # convs have stride 2
    expected = torch.nn.functional.batch_norm(
        expected, None, None, fr.bn.weight, fr.bn.bias, True, 0.0, fr.bn.eps
    )
    torch.testing.assert_close(fr(x), expected, rtol=1e-12, atol=1e-12)


def test_phases_round_trip():
    from models.kernels import from_phases, to_phases

    x = torch.randn(3, 2, 6, 4)
    p = to_phases(x)
    assert p.shape == (12, 2, 3, 2) and p.is_contiguous(memory_format=CL)
    torch.testing.assert_close(p[3:6], x[:, :, 0::2, 1::2], rtol=0, atol=0)  # phase (0, 1)
    assert torch.equal(from_phases(p), x)


@pytest.mark.parametrize("training", [True, False])
def test_scaled_batch_norm_equals_scale_times_bn(training):
    from models.kernels import scaled_batch_norm

    torch.manual_seed(0)
    bn, bn_ref = torch.nn.BatchNorm2d(3, affine=False), torch.nn.BatchNorm2d(3, affine=False)
    for m in (bn, bn_ref):
        m.train(training)
    x = torch.randn(4, 3, 5, 5, dtype=torch.float64)
    bn.double(), bn_ref.double()
    s = torch.tensor(0.3, dtype=torch.float64, requires_grad=True)
    out, ref = scaled_batch_norm(bn, x, s), s * bn_ref(x)
    torch.testing.assert_close(out, ref)
    g = torch.randn_like(out)
    torch.testing.assert_close(torch.autograd.grad(out, s, g), torch.autograd.grad(ref, s, g))
    for a, b in zip(bn.buffers(), bn_ref.buffers()):
        torch.testing.assert_close(a, b)
    with pytest.raises(ValueError):
        scaled_batch_norm(torch.nn.BatchNorm2d(3), x.float(), s.float())


@pytest.mark.parametrize("fresh", [False, True])
def test_scaled_batch_norm_centring_equals_scale_times_bn(fresh):
    """The centred path (channels-last CPU batch; ``fresh``: centred in place) in float64:
    the same output, gradients and running statistics as ``s * bn(x)``."""
    from models.kernels import centers_batch, scaled_batch_norm

    torch.manual_seed(0)
    bn = torch.nn.BatchNorm2d(3, affine=False).double()
    bn_ref = torch.nn.BatchNorm2d(3, affine=False).double()
    x = (torch.randn(4, 3, 5, 5, dtype=torch.float64) + 3).contiguous(memory_format=CL)
    x.requires_grad_()
    s = torch.tensor(0.3, dtype=torch.float64, requires_grad=True)
    h = x * 2  # a temporary that only the BN reads, as a conv output is
    assert centers_batch(h)
    out, ref = scaled_batch_norm(bn, h, s, fresh=fresh), s * bn_ref(x * 2)
    torch.testing.assert_close(out, ref, rtol=1e-12, atol=1e-12)
    g = torch.randn_like(out)
    for a, b in zip(torch.autograd.grad(out, (x, s), g), torch.autograd.grad(ref, (x, s), g)):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)
    for a, b in zip(bn.buffers(), bn_ref.buffers()):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("channels_last", [False, True])
def test_dense_grad_is_the_identity_with_a_dense_gradient(channels_last):
    """Forward: x itself. Backward: the incoming gradient's values, made dense in x's memory
    format even when it arrives as a strided channel slice (torch.cat's backward)."""
    from models.kernels import dense_grad

    fmt = CL if channels_last else torch.contiguous_format
    x = torch.randn(2, 3, 4, 4, dtype=torch.float64).contiguous(memory_format=fmt)
    x.requires_grad_()
    h = x * 1.0
    seen = []
    h.register_hook(seen.append)
    y = dense_grad(h)
    assert torch.equal(y, h)
    other = torch.randn(2, 2, 4, 4, dtype=torch.float64)
    out = torch.cat([y, other], dim=1)  # y's gradient: a channel slice of out's
    g = torch.randn_like(out).contiguous(
        memory_format=torch.contiguous_format if channels_last else CL
    )
    out.backward(g)
    assert torch.equal(seen[0], g[:, :3])
    assert seen[0].is_contiguous(memory_format=fmt)
    assert torch.equal(x.grad, g[:, :3])


@pytest.mark.parametrize("affine", [False, True])
@pytest.mark.parametrize("momentum", [0.1, None])
def test_batch_norm_is_accurate_on_channels_last_cpu_tensors(affine, momentum):
    """PyTorch's channels-last CPU BN sums a channel's N*H*W values one after the other in
    float32: for a channel of mean 100 and std 1 its output is ~1e-4 off
    the float64 result (NCHW: 3e-7). models.kernels.BatchNorm2d centres the batch first; the
    threshold is 1e-5 on the output, the input gradient and the running statistics."""
    import torch.nn.functional as F

    from models.kernels import BatchNorm2d

    torch.manual_seed(0)
    x = (torch.randn(16, 4, 32, 32) + 100).contiguous(memory_format=CL)
    g = (torch.randn(16, 4, 32, 32) + 0.5).contiguous(memory_format=CL)
    ref = BatchNorm2d(4, affine=affine, momentum=momentum).double()
    bn = BatchNorm2d(4, affine=affine, momentum=momentum).to(memory_format=CL)
    if affine:
        for m in (ref, bn):
            with torch.no_grad():
                m.weight.copy_(torch.linspace(0.5, 2, 4))
                m.bias.copy_(torch.linspace(-1, 1, 4))

    def run(m, x, g):
        x = x.detach().requires_grad_()
        outs = []
        for _ in range(2):  # twice: the running statistics are averaged over both
            y = m(x)
            (gx,) = torch.autograd.grad(y, x, g)
            outs += [y, gx]
        return outs

    def rel(a, b):
        return ((a.double() - b).abs().max() / b.abs().max()).item()

    for a, b in zip(run(bn, x, g), run(ref, x.double(), g.double())):
        assert rel(a, b) < 1e-5
    for a, b in zip(bn.buffers(), ref.buffers()):  # running mean and var, batches tracked
        assert rel(a, b) < 1e-5
    native = F.batch_norm(x, None, None, None, None, True, 0.1, 1e-5)
    assert rel(native, F.batch_norm(x.double(), None, None, None, None, True)) > 1e-5, (
        "the channels-last CPU BN kernel of this PyTorch is accurate: centring can go"
    )
    bn.eval(), ref.eval()  # evaluation: the running statistics, no centring
    assert rel(bn(x), ref(x.double())) < 1e-5


def _plain(module, x):
    """The op by the textbook layers, one torch.nn.functional call per layer (no fast paths)."""
    import torch.nn as nn
    import torch.nn.functional as F

    from models.ops import DilConv, SepConv

    if isinstance(module, (DilConv, SepConv, nn.Sequential)):
        for m in module:
            x = _plain(m, x)
        return x
    if isinstance(module, nn.Conv2d):
        return F.conv2d(
            x, module.weight, None, module.stride, module.padding, module.dilation, module.groups
        )
    if isinstance(module, nn.BatchNorm2d):
        if module.training:
            module.num_batches_tracked.add_(1)
        return F.batch_norm(
            x, module.running_mean, module.running_var, module.weight, module.bias,
            module.training, module.momentum, module.eps,
        )  # fmt: skip
    if isinstance(module, FactorizedReduce):
        r = torch.relu(x)
        shifted = F.pad(r[:, :, 1:, 1:], (0, 1, 0, 1))
        h = torch.cat([_plain(module.conv1, r), _plain(module.conv2, shifted)], dim=1)
        return _plain(module.bn, h)
    return module(x)  # ReLU, pooling, identity


def _reference_edge(mixed, x, w):
    """sum_o w_o * o(x), every op by its textbook layers."""
    return sum(w[i] * _plain(op, x) for i, op in zip(mixed.op_index, mixed.ops))


@pytest.mark.parametrize("stride", [1, 2])
@pytest.mark.parametrize("size", [8, 7])
@pytest.mark.parametrize("channels_last", [False, True])
def test_mixed_op_shared_relu_phases_and_folded_weights(stride, size, channels_last):
    """Training mode, float64: same output, gradients (input, weights, alphas) and BN
    statistics as the plain weighted sum, with relu(x) and its phases handed in by the caller
    (as the per-edge supernet cell did) or not."""
    import copy

    from models.kernels import phases_apply, to_phases
    from models.ops import EdgeInput

    torch.manual_seed(0)
    mixed = MixedOp(4, stride).double()
    if channels_last:
        mixed.to(memory_format=torch.channels_last)
    ref = copy.deepcopy(mixed)
    fmt = CL if channels_last else torch.contiguous_format
    x = torch.randn(2, 4, size, size, dtype=torch.float64).contiguous(memory_format=fmt)
    x.requires_grad_()
    alpha = torch.randn(len(PRIMITIVES), dtype=torch.float64, requires_grad=True)
    for shared in (False, True):
        w = torch.softmax(alpha, -1)
        x_relu = torch.relu(x) if shared else None
        phases = None
        if shared and phases_apply(x_relu, stride):
            phases = to_phases(x_relu)
        y = mixed(EdgeInput(x, x_relu, phases), w)
        y_ref = _reference_edge(ref, x, w)
        torch.testing.assert_close(y, y_ref, rtol=1e-10, atol=1e-12)
        g = torch.randn_like(y_ref)
        params, params_ref = list(mixed.parameters()), list(ref.parameters())
        grads = torch.autograd.grad(y, [x, alpha, *params], g, retain_graph=True)
        grads_ref = torch.autograd.grad(y_ref, [x, alpha, *params_ref], g)
        for a, b in zip(grads, grads_ref):
            torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)
        for a, b in zip(mixed.buffers(), ref.buffers()):
            torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)


def test_channels_last_supernet_keeps_parameters_and_values():
    import copy

    import torch.nn as nn

    from models.search_cnn import SearchCNNController

    torch.manual_seed(0)
    net = SearchCNNController(3, 4, 10, 3, nn.CrossEntropyLoss()).double()
    net_cl = copy.deepcopy(net).to(memory_format=torch.channels_last)
    assert [n for n, _ in net.named_parameters()] == [n for n, _ in net_cl.named_parameters()]
    assert net_cl.net.stem[0].weight.is_contiguous(memory_format=CL)
    X, y = torch.randn(4, 3, 8, 8, dtype=torch.float64), torch.randint(0, 10, (4,))
    loss, loss_cl = net.loss(X, y), net_cl.loss(X, y)
    torch.testing.assert_close(loss, loss_cl, rtol=1e-12, atol=1e-12)
    grads = torch.autograd.grad(loss, list(net.parameters()))
    grads_cl = torch.autograd.grad(loss_cl, list(net_cl.parameters()))
    for a, b in zip(grads, grads_cl):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)


# --------------------------------------------------------------------------------------------
# --kernels: the fast networks against the plain ones, through the switch
# --------------------------------------------------------------------------------------------
def test_kernels_switch_chooses_by_mode_and_device():
    from models.kernels import fast_kernels, get_kernels, set_kernels, use_kernels

    cpu, meta = torch.zeros(1), torch.zeros(1, device="meta")  # meta: a tensor not on the CPU
    assert get_kernels() == "auto" and fast_kernels(cpu) and not fast_kernels(meta)
    with use_kernels("fast"):
        assert fast_kernels(cpu) and fast_kernels(meta)
    with use_kernels("plain"):
        assert not fast_kernels(cpu) and not fast_kernels(meta)
    assert get_kernels() == "auto"
    with pytest.raises(ValueError, match="kernels must be one of auto, fast, plain"):
        set_kernels("quick")


def _loss_grads_buffers(net, X, y, mode):
    from models.kernels import use_kernels

    with use_kernels(mode):
        out = net(X)
        outs = out if isinstance(out, tuple) else (out,)  # the augment net: (logits, aux)
        loss = sum(torch.nn.functional.cross_entropy(o, y) for o in outs)
        grads = torch.autograd.grad(loss, [p for p in net.parameters() if p.requires_grad])
    return loss, grads, [b.clone() for b in net.buffers()]


@pytest.mark.parametrize("network", ["search", "augment"])
def test_fast_kernels_compute_the_plain_networks(network):
    """float64, training mode, channels-last on the CPU (where every fast path applies):
    --kernels fast gives the loss, every gradient (weights and alphas) and the BN statistics
    of --kernels plain."""
    import copy

    import torch.nn as nn

    import genotypes as gt
    from models.augment_cnn import AugmentCNN
    from models.search_cnn import SearchCNNController

    torch.manual_seed(0)
    if network == "search":
        net = SearchCNNController(3, 4, 10, 3, nn.CrossEntropyLoss())
        with torch.no_grad():
            for a in net.alphas():
                a.normal_(0, 0.5)
    else:
        net = AugmentCNN(8, 3, 4, 10, 3, True, gt.DARTS_V2)
        net.drop_path_prob(0.0)
    net = net.double().to(memory_format=CL).train()
    plain = copy.deepcopy(net)
    X = torch.randn(4, 3, 8, 8, dtype=torch.float64).contiguous(memory_format=CL)
    y = torch.randint(0, 10, (4,))
    loss, grads, buffers = _loss_grads_buffers(net, X, y, "fast")
    loss_p, grads_p, buffers_p = _loss_grads_buffers(plain, X, y, "plain")
    torch.testing.assert_close(loss, loss_p, rtol=1e-12, atol=0)
    for a, b in zip(grads, grads_p):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-12)
    for a, b in zip(buffers, buffers_p):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)


def test_running_stats_frozen_leaves_the_buffers_and_changes_no_value():
    import copy

    from models.kernels import BatchNorm2d, running_stats_frozen, scaled_batch_norm

    torch.manual_seed(0)
    bn = BatchNorm2d(3, affine=False).double()
    x = torch.randn(4, 3, 5, 5, dtype=torch.float64).contiguous(memory_format=CL)
    ref = copy.deepcopy(bn)
    w = torch.tensor(0.3, dtype=torch.float64)
    with running_stats_frozen():
        out, scaled = bn(x), scaled_batch_norm(bn, x, w)
    assert all(torch.equal(a, b) for a, b in zip(bn.buffers(), ref.buffers()))
    torch.testing.assert_close(out, ref(x), rtol=0, atol=0)
    torch.testing.assert_close(scaled, w * out, rtol=1e-15, atol=1e-15)
    assert int(ref.num_batches_tracked) == 1  # outside the block the statistics move


@pytest.mark.parametrize("momentum", [0.1, None])
def test_bookkept_bns_update_their_statistics_as_each_bn_would(momentum):
    """Within kernels.bookkept() the centred BNs leave their running statistics to one update
    of all of them at the end of the block: the same counters, and the same statistics (to the
    rounding: float64 1e-12) and outputs as the BNs' own updates, on a few steps."""
    import copy

    from models.kernels import BatchNorm2d, bookkept

    torch.manual_seed(0)
    net = torch.nn.Sequential(
        BatchNorm2d(3, momentum=momentum),
        torch.nn.Conv2d(3, 5, 3, padding=1),
        BatchNorm2d(5, affine=False, momentum=momentum),
    ).double()
    net = net.to(memory_format=CL)
    ref = copy.deepcopy(net)
    for _ in range(3):
        x = (3 + 2 * torch.randn(4, 3, 6, 6, dtype=torch.float64)).contiguous(memory_format=CL)
        with bookkept(net):
            out = net(x)
        torch.testing.assert_close(out, ref(x), rtol=1e-12, atol=1e-12)
    for (name, a), b in zip(net.named_buffers(), ref.buffers()):
        assert not torch.equal(a, torch.zeros_like(a)), name  # the statistics moved
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12, msg=name)


def test_relu_by_threshold_is_relu_twice_differentiable():
    from models.kernels import ReLU, relu

    x = torch.randn(64, dtype=torch.float64, requires_grad=True)
    assert torch.equal(relu(x), torch.relu(x)) and isinstance(ReLU(), torch.nn.ReLU)
    (g,) = torch.autograd.grad((relu(x) ** 3).sum(), x, create_graph=True)
    (g_ref,) = torch.autograd.grad((torch.relu(x) ** 3).sum(), x, create_graph=True)
    torch.testing.assert_close(g, g_ref, rtol=0, atol=0)
    torch.testing.assert_close(
        torch.autograd.grad(g.sum(), x)[0], torch.autograd.grad(g_ref.sum(), x)[0], rtol=0, atol=0
    )


def test_phases_as_images_reads_the_phases_in_place_and_back():
    """phases_as_images(to_phases(x)) holds x's pixels in phase order, (p, q, n, i, j) at the
    image pixel (n, 2i + p, 2j + q), without a copy; its gradient is the inverse reading."""
    from models.kernels import phases_as_images, to_phases

    x = torch.randn(2, 3, 4, 6, dtype=torch.float64).contiguous(memory_format=CL)
    ph = to_phases(x)
    img = phases_as_images(ph)
    assert img.shape == x.shape and img.data_ptr() == ph.data_ptr()
    back = img.permute(0, 2, 3, 1).reshape(2, 2, 2, 2, 3, 3).permute(2, 3, 0, 4, 1, 5)
    assert torch.equal(back.reshape(2, 4, 6, 3), x.permute(0, 2, 3, 1))
    c = torch.randn_like(img)
    ph = ph.detach().clone(memory_format=CL).requires_grad_()
    assert torch.autograd.gradcheck(lambda t: phases_as_images(t) * c, (ph,))


def test_clip_grad_norm_is_torchs():
    """utils.clip_grad_norm: the norm and the scaled gradients of nn.utils.clip_grad_norm_."""
    import copy

    from utils import clip_grad_norm

    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(5, 7), torch.nn.Linear(7, 3), torch.nn.Linear(3, 2))
    net[1].bias.requires_grad_(False)  # a parameter without a gradient
    net(torch.randn(4, 5)).square().sum().backward()
    ref = copy.deepcopy(net)
    for p, q in zip(net.parameters(), ref.parameters()):
        q.grad = None if p.grad is None else p.grad.clone()
    for max_norm in (0.05, 1e6):  # clipped, and left as it is
        total = clip_grad_norm(net.parameters(), max_norm)
        total_ref = torch.nn.utils.clip_grad_norm_(ref.parameters(), max_norm)
        assert torch.equal(total, total_ref)
        for p, q in zip(net.parameters(), ref.parameters()):
            assert (p.grad is None and q.grad is None) or torch.equal(p.grad, q.grad)
