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
