"""The ImageNet network (issue 14; DARTS.md sections 2 and 8, the paper's appendix A.2) and the
mult-add counter of models/flops.py."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn

import augment
import genotypes as gt
import utils
from config import AugmentConfig
from models.augment_cnn import AugmentCNN, AuxiliaryHead
from models.flops import RULE, mult_adds
from models.ops import DilConv, FactorizedReduce, SepConv


def imagenet_net(genotype=gt.DARTS_V2, C=48, layers=14, n_classes=1000, size=224, aux=True):
    return AugmentCNN(size, 3, C, n_classes, layers, aux, genotype, imagenet=True)


@pytest.fixture(scope="module")
def v2() -> AugmentCNN:
    """DARTS_V2 at the published ImageNet size: C=48, 14 layers, 1000 classes."""
    torch.manual_seed(0)
    return imagenet_net()


# ------------------------------------------------------------------------- reference counts


def test_reference_parameter_counts(v2):
    assert utils.count_parameters(v2, exclude="aux_head") == 4_718_752
    assert utils.count_parameters(v2.aux_head) == 1_260_776
    v1 = imagenet_net(gt.DARTS_V1)
    assert utils.count_parameters(v1, exclude="aux_head") == 4_510_432


def test_the_cifar_network_is_unchanged():
    model = AugmentCNN(32, 3, 36, 10, 20, True, gt.DARTS_V2)
    assert utils.count_parameters(model, exclude="aux_head") == 3_349_342
    keys = list(model.state_dict())
    assert keys[0] == "stem.0.weight" and not any(k.startswith("stem0") for k in keys)
    assert keys[-2:] == ["linear.weight", "linear.bias"]
    assert isinstance(model.gap, nn.AdaptiveAvgPool2d) and not model.imagenet


# ------------------------------------------------------------------------------- structure


def test_stems_and_cell_inputs(v2):
    x = torch.randn(2, 3, 224, 224)
    v2.eval()
    with torch.no_grad():
        s0 = v2.stem0(x)
        s1 = v2.stem1(s0)
        assert s0.shape == (2, 48, 56, 56)  # stem0: two stride-2 convs
        assert s1.shape == (2, 48, 28, 28)  # stem1: one more
        assert [t.shape for t in v2.stems(x)] == [s0.shape, s1.shape]
    convs = [m for m in v2.stem0 if isinstance(m, nn.Conv2d)]
    assert [(c.in_channels, c.out_channels, c.stride) for c in convs] == [
        (3, 24, (2, 2)),
        (24, 48, (2, 2)),
    ]
    assert all(c.bias is None for c in convs)
    assert [type(m) for m in v2.stem1][0] is nn.ReLU
    # The first cell reads s0 (56x56, C channels) through FactorizedReduce, s1 at C channels.
    first = v2.cells[0]
    assert isinstance(first.preproc0, FactorizedReduce)
    assert first.preproc0.conv1.in_channels == 48 and first.preproc1[1].in_channels == 48
    assert v2.reductions == (4, 9) and v2.aux_pos == 9
    assert [c.reduction for c in v2.cells] == [i in (4, 9) for i in range(14)]


def test_registration_order_is_the_authors(v2):
    """stem0, stem1, cells (preprocess0, preprocess1, the 8 ops), auxiliary head, classifier:
    the order the released tensors come in (official.py maps them by it)."""
    tops = []
    for key in v2.state_dict():
        top = key.split(".")[0]
        if not tops or tops[-1] != top:
            tops.append(top)
    assert tops == ["stem0", "stem1", "cells", "aux_head", "linear"]
    cell_keys = [k for k in v2.state_dict() if k.startswith("cells.0.")]
    assert cell_keys[0].startswith("cells.0.preproc0.") and "preproc1" in cell_keys[7]


def test_auxiliary_head_for_imagenet(v2):
    head = v2.aux_head
    assert head.spatial == 7
    layers = list(head.features)
    kinds = [type(m) for m in layers]
    assert kinds == [nn.ReLU, nn.AvgPool2d, nn.Conv2d, type(layers[3]), nn.ReLU, nn.Conv2d, nn.ReLU]
    assert isinstance(layers[3], nn.BatchNorm2d)  # one BN only: none after the 2x2 conv
    pool = layers[1]
    assert (pool.kernel_size, pool.stride, pool.padding, pool.count_include_pad) == (5, 2, 0, False)
    assert layers[2].kernel_size == (1, 1) and layers[2].out_channels == 128
    assert layers[5].kernel_size == (2, 2) and layers[5].out_channels == 768
    assert head.linear.in_features == 768 and head.linear.out_features == 1000
    out = head.train()(torch.randn(2, 768, 7, 7))
    assert out.shape == (2, 1000)


@pytest.mark.parametrize("spatial", [2, 5, 6, 7, 8, 9, 14])
def test_imagenet_aux_head_fits_any_map(spatial):
    head = AuxiliaryHead(spatial, 16, 10, imagenet=True)
    assert isinstance(head.features[1], nn.AvgPool2d) == (spatial in (7, 8))
    assert head.train()(torch.randn(3, 16, spatial, spatial)).shape == (3, 10)


def test_output_shapes_at_224(v2):
    x = torch.randn(2, 3, 224, 224)
    v2.train()
    logits, aux = v2(x)
    assert logits.shape == (2, 1000) and aux is not None and aux.shape == (2, 1000)
    v2.eval()
    with torch.no_grad():
        logits, aux = v2(x)
    assert logits.shape == (2, 1000) and aux is None


def test_final_pooling_is_the_authors_avgpool7(v2):
    """At 224 the last map is 7x7 and the head is the authors' AvgPool2d(7). Global average
    pooling takes the same mean but not bit for bit, which is why it is not used there."""
    assert v2.final_spatial == 7 and isinstance(v2.gap, nn.AvgPool2d)
    assert v2.gap.kernel_size == 7
    x = torch.randn(4, 768, 7, 7)
    torch.testing.assert_close(v2.gap(x), nn.AdaptiveAvgPool2d(1)(x), rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("size", [64, 100, 320])
def test_other_input_sizes_pool_the_whole_map(size):
    model = imagenet_net(C=8, layers=5, n_classes=10, size=size).eval()
    x = torch.randn(2, 3, size, size)
    with torch.no_grad():
        logits, _ = model(x)
        s0, s1 = model.stems(x)
        for cell in model.cells:
            s0, s1 = s1, cell(s0, s1)
    assert s1.shape[-1] == model.final_spatial
    torch.testing.assert_close(logits, model.linear(s1.mean((2, 3))))
    model.train()
    assert model(x)[1].shape == (2, 10)


def test_build_model_passes_the_imagenet_stem():
    cfg = AugmentConfig(name="x", dataset="digits", genotype="DARTS_V2", init_channels=8, layers=5)
    assert not augment.build_model(cfg, gt.DARTS_V2).imagenet
    cfg.imagenet_stem = True
    model = augment.build_model(cfg, gt.DARTS_V2)
    assert model.imagenet and hasattr(model, "stem0") and not hasattr(model, "stem")
    assert model(torch.randn(2, 1, 8, 8))[0].shape == (2, 10)


# ------------------------------------------------------------------------------- mult-adds


def test_mult_adds_of_a_network_counted_by_hand():
    net = nn.Sequential(
        nn.Conv2d(2, 4, 3, padding=1),  # 5x5 out: 4 * 25 * 2 * 9 = 1800 (bias not counted)
        nn.BatchNorm2d(4),  # not counted
        nn.ReLU(),
        nn.Conv2d(4, 4, 3, stride=2, padding=1, groups=4, bias=False),  # 3x3: 4 * 9 * 9 = 324
        nn.Conv2d(4, 6, 1, bias=False),  # 3x3: 6 * 9 * 4 = 216
        nn.MaxPool2d(3),  # not counted
        nn.Flatten(),
        nn.Linear(6, 3),  # 18
        nn.Linear(3, 2, bias=False),  # 6
    )
    assert mult_adds(net, (2, 5, 5)) == 1800 + 324 + 216 + 18 + 6


@pytest.mark.parametrize("memory_format", [torch.contiguous_format, torch.channels_last])
def test_mult_adds_see_the_ops_functional_convs(memory_format):
    """The ops run their convs through models/kernels.py (slices, pixel phases): the count is
    the plain ops'."""
    fr = FactorizedReduce(4, 4)  # two 1x1 convs 4 -> 2 on 3x3: 2 * (2 * 9 * 4)
    sep = SepConv(4, 4, 3, 1, 1)  # twice: depthwise 4 * 36 * 9 + pointwise 4 * 36 * 4
    dil = DilConv(4, 4, 3, 1, 2, 2)  # dilated, stride 1 (the pixel phases on a CPU): 8x8
    for op in (fr, sep, dil):
        op.to(memory_format=memory_format)
    assert mult_adds(fr, (4, 6, 6)) == 144
    assert mult_adds(sep, (4, 6, 6)) == 2 * (4 * 36 * 9 + 4 * 36 * 4)
    assert mult_adds(dil, (4, 8, 8)) == 4 * 64 * 9 + 4 * 64 * 4


def test_darts_v2_mult_adds_at_224(v2):
    v2.train()
    bn = v2.stem0[1]
    before = (bn.running_mean.clone(), int(bn.num_batches_tracked))
    assert mult_adds(v2, (3, 224, 224)) == 529_911_552
    assert v2.training  # the mode is restored, the BN statistics untouched
    assert torch.equal(bn.running_mean, before[0]) and int(bn.num_batches_tracked) == before[1]


def test_mult_adds_exclude_the_auxiliary_head():
    torch.manual_seed(0)
    with_aux = imagenet_net(C=8, layers=5, n_classes=10, size=64)
    without = imagenet_net(C=8, layers=5, n_classes=10, size=64, aux=False)
    assert mult_adds(with_aux, (3, 64, 64)) == mult_adds(without, (3, 64, 64))


def test_describe_logs_the_mult_adds_and_their_rule():
    model = imagenet_net(C=8, layers=5, n_classes=10, size=64)
    text = augment.describe(model)
    n = mult_adds(model, (3, 64, 64))
    assert f"{n:,} mult-adds" in text and "at 64x64" in text and RULE in text
    assert "the paper's 574M cannot be reproduced from the released code" in RULE
    assert "without the auxiliary head" in text
