"""The supernet and its controller."""

import torch
import torch.nn as nn

import genotypes as gt
from models.search_cnn import SearchCNNController


def test_supernet_size_matches_the_reference():
    net = SearchCNNController(3, 16, 10, 8, nn.CrossEntropyLoss())
    assert sum(p.numel() for p in net.weights()) == 1_930_618


def test_every_parameter_is_a_weight_or_an_alpha():
    net = SearchCNNController(1, 4, 10, 3, nn.CrossEntropyLoss(), n_nodes=3)
    names = {n for n, _ in net.named_parameters()}
    weights = {n for n, _ in net.named_weights()}
    alphas = {n for n, _ in net.named_alphas()}
    assert weights | alphas == names and not weights & alphas
    assert all("alpha" in n for n in alphas) and not any("alpha" in n for n in weights)
    assert "alpha_normal.0" in alphas and "alpha_reduce.2" in alphas
    assert {id(p) for p in net.weights()} == {id(p) for _, p in net.named_weights()}
    assert [p.shape for p in net.alphas()][:3] == [(2, 8), (3, 8), (4, 8)]
    # alphas are in the state dict, so checkpoints carry them
    assert "alpha_reduce.1" in net.state_dict()


def test_forward_shapes_and_reductions():
    torch.manual_seed(0)
    net = SearchCNNController(3, 4, 7, 5, nn.CrossEntropyLoss())
    x = torch.randn(2, 3, 16, 16)
    assert net(x).shape == (2, 7)
    cells = net.net.cells
    assert [c.reduction for c in cells] == [False, True, False, True, False]
    # 28x28 (MNIST) -> 14 -> 7: odd sizes after the second reduction still line up
    net = SearchCNNController(1, 4, 10, 3, nn.CrossEntropyLoss())
    assert net(torch.randn(2, 1, 28, 28)).shape == (2, 10)


def test_loss_backpropagates_to_weights_and_alphas():
    torch.manual_seed(0)
    net = SearchCNNController(1, 4, 10, 3, nn.CrossEntropyLoss(), n_nodes=2)
    loss = net.loss(torch.randn(4, 1, 8, 8), torch.randint(0, 10, (4,)))
    loss.backward()
    assert all(p.grad is not None for p in net.weights())
    assert all(a.grad is not None and a.grad.abs().sum() > 0 for a in net.alphas())


def test_alphas_frozen_leaves_no_alpha_gradient():
    net = SearchCNNController(1, 4, 10, 3, nn.CrossEntropyLoss(), n_nodes=2)
    with net.alphas_frozen():
        net.loss(torch.randn(4, 1, 8, 8), torch.randint(0, 10, (4,))).backward()
    assert all(a.grad is None and a.requires_grad for a in net.alphas())


def test_genotype_follows_the_alphas():
    net = SearchCNNController(1, 4, 10, 3, nn.CrossEntropyLoss())
    sep = gt.PRIMITIVES.index("sep_conv_3x3")
    with torch.no_grad():
        for a in net.alphas():
            a.zero_()
            a[0, sep] = 1.0
            a[1, sep] = 0.5
    g = net.genotype()
    assert g.normal == [[("sep_conv_3x3", 0), ("sep_conv_3x3", 1)]] * 4
    assert g.reduce == g.normal and list(g.normal_concat) == [2, 3, 4, 5]
    assert gt.from_str(gt.to_str(g)) == g
