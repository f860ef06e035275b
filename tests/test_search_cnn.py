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


# --------------------------------------------------------------------------------------------
# The batched edges against the per-edge cell they replaced
# --------------------------------------------------------------------------------------------
import copy  # noqa: E402
import os  # noqa: E402
import shutil  # noqa: E402

import pytest  # noqa: E402
from conftest import ROOT  # noqa: E402
from torch import nn as _nn  # noqa: E402

import models.search_cnn as search_cnn  # noqa: E402
from architect import Architect  # noqa: E402
from models.kernels import dense_grad, use_kernels  # noqa: E402
from models.macro import Cell  # noqa: E402
from models.ops import EdgeInput, MixedOp  # noqa: E402

FIXTURE = os.path.join(ROOT, "tests", "fixtures", "search_v1")


class PerEdgeCell(Cell):
    """A frozen copy of the supernet cell before its edges were batched (commit 0fc7403): one
    models.ops.MixedOp per edge, its state-dict keys `dag.i.j.ops.m.*`."""

    def __init__(self, n_nodes, C_pp, C_p, C, reduction_p, reduction):
        super().__init__(C_pp, C_p, C, reduction_p, reduction, affine=False)
        self.dag = _nn.ModuleList(
            _nn.ModuleList(MixedOp(C, self.stride(j)) for j in range(gt.N_INPUT_NODES + i))
            for i in range(n_nodes)
        )

    def forward(self, s0, s1, w_dag):
        states = [EdgeInput(s) for s in self.preprocess(s0, s1)]
        for edges, w_edges in zip(self.dag, w_dag):
            node = None
            for edge, x, w in zip(edges, states, w_edges):
                h = edge(x, w)
                node = h if node is None else node.add_(h)
            states.append(EdgeInput(dense_grad(node)))
        return torch.cat([s.x for s in states[gt.N_INPUT_NODES :]], dim=1)


class PerEdgeNet(search_cnn.SearchCNN):
    def forward(self, x, weights_normal, weights_reduce, per_edge=False):
        s0 = s1 = self.stem(x)
        for cell in self.cells:
            s0, s1 = s1, cell(s0, s1, weights_reduce if cell.reduction else weights_normal)
        return self.linear(self.gap(s1).flatten(1))


def per_edge_pair(monkeypatch, seed, n_nodes=4, C_in=1, layers=3):
    """(batched, per-edge) controllers built from the same seed, in float64."""
    torch.manual_seed(seed)
    batched = SearchCNNController(C_in, 4, 10, layers, nn.CrossEntropyLoss(), n_nodes=n_nodes)
    after = torch.rand(3)  # the random stream after the construction
    with monkeypatch.context() as m:
        m.setattr(search_cnn, "SearchCell", PerEdgeCell)
        m.setattr(search_cnn, "SearchCNN", PerEdgeNet)
        torch.manual_seed(seed)
        old = SearchCNNController(C_in, 4, 10, layers, nn.CrossEntropyLoss(), n_nodes=n_nodes)
    assert torch.equal(torch.rand(3), after)
    return batched.double(), old.double()


def stacked(old_model, named, batched):
    """A per-edge state (names of old_model) in the batched layout."""
    return search_cnn.convert_per_edge(named, batched.state_dict(), list(batched.net.cells))


def rel(a, b):
    return ((a - b).norm() / b.norm().clamp_min(1e-300)).item()


def test_batched_init_is_the_per_edge_init(monkeypatch):
    """Same seed, same weights: every edge's convs are drawn as the per-edge modules drew
    them, in their order, and the random stream continues where theirs did."""
    batched, old = per_edge_pair(monkeypatch, seed=5)
    state = batched.state_dict()
    converted = stacked(old, old.state_dict(), batched)
    assert set(converted) == set(state)
    for k, v in state.items():
        assert torch.equal(converted[k], v), k
    assert sum(p.numel() for p in batched.weights()) == sum(p.numel() for p in old.weights())


def test_every_stacked_row_is_one_edge_op_tensor(monkeypatch):
    """edge_slices maps each per-edge tensor (the per-edge module's key, its shape) to rows of
    one stacked tensor; the parameters' rows are covered exactly once, the pools' BN
    statistics once per edge leaving their node (shared)."""
    batched, old = per_edge_pair(monkeypatch, seed=0, n_nodes=3)
    for cell, old_cell in zip(batched.net.cells, old.net.cells):
        params = dict(cell.named_parameters())
        cover = {n: torch.zeros(p.shape[0]) for n, p in params.items() if n.startswith("groups")}
        for i, j in cell.edges():
            views = cell.edge_tensors(i, j)
            mixed = old_cell.dag[i][j]
            old_keys = {}
            for m, name in enumerate(search_cnn._PER_EDGE_OPS):
                for key, t in mixed.ops[m].state_dict().items():
                    if not key.endswith("num_batches_tracked"):
                        old_keys[(name, key)] = t.shape
            new_keys = {(op, key): t.shape for op, d in views.items() for key, t in d.items()}
            assert new_keys == old_keys
            for _op, d in cell.edge_slices(i, j).items():
                for name, rows in d.values():
                    if name in cover:
                        cover[name][rows] += 1
        for name, c in cover.items():
            assert torch.equal(c, torch.ones_like(c)), name


@pytest.mark.parametrize("kernels", ["fast", "plain"])
def test_batched_supernet_equals_the_per_edge_supernet(monkeypatch, kernels):
    """float64, training mode: the same loss, weight and alpha gradients and BN running
    statistics (to 1e-12 relative) as the per-edge cell, and as the per-edge reference
    forward of the batched cell (forward_per_edge, on its own weights). 14x14 inputs: the
    second reduction cell reads 7x7 (odd sizes); channels-last (the fast paths apply)."""
    batched, old = per_edge_pair(monkeypatch, seed=1)
    with torch.no_grad():
        for a, b in zip(batched.alphas(), old.alphas()):
            a.normal_(0, 0.5)
            b.copy_(a)
    batched = batched.to(memory_format=torch.channels_last)
    old = old.to(memory_format=torch.channels_last)
    X = torch.randn(4, 1, 14, 14, dtype=torch.float64).contiguous(memory_format=torch.channels_last)
    y = torch.randint(0, 10, (4,))
    ref = copy.deepcopy(batched)
    with use_kernels(kernels):
        loss = batched.loss(X, y)
        loss_old = old.loss(X, y)
        loss_ref = ref.criterion(ref(X, per_edge=True), y)
        names = [n for n, _ in batched.named_parameters()]
        grads = dict(zip(names, torch.autograd.grad(loss, list(batched.parameters()))))
        old_names = [n for n, _ in old.named_parameters()]
        old_grads = dict(zip(old_names, torch.autograd.grad(loss_old, list(old.parameters()))))
        ref_grads = torch.autograd.grad(loss_ref, list(ref.parameters()))
    assert rel(loss, loss_old) < 1e-12 and rel(loss_ref, loss_old) < 1e-12
    converted = stacked(old, old_grads, batched)
    for (n, g), r in zip(grads.items(), ref_grads):
        assert rel(g, converted[n]) < 1e-12, n
        assert rel(r, converted[n]) < 1e-12, n
    buffers = stacked(old, dict(old.named_buffers()), batched)
    saved = batched.state_dict()  # the buffers a checkpoint holds (not the index tensors)
    for n, b in batched.named_buffers():
        if n in saved:
            assert rel(b.double(), buffers[n].double()) < 1e-12, n


@pytest.mark.parametrize("hessian", ["finite", "exact"])
def test_second_order_alpha_gradient_equals_the_per_edge_supernet(monkeypatch, hessian):
    batched, old = per_edge_pair(monkeypatch, seed=2)
    with torch.no_grad():
        for a, b in zip(batched.alphas(), old.alphas()):
            a.normal_(0, 0.5)
            b.copy_(a)
    X, y = torch.randn(8, 1, 8, 8, dtype=torch.float64), torch.randint(0, 10, (8,))
    trn, val = (X[:4], y[:4]), (X[4:], y[4:])
    optims = []
    for net in (batched, old):
        opt = torch.optim.SGD(net.weights(), 0.05, momentum=0.9, weight_decay=3e-4)
        with net.alphas_frozen():
            net.loss(*trn).backward()
        opt.step()
        opt.zero_grad()
        optims.append(opt)
        Architect(net, 0.9, 3e-4, hessian=hessian).unrolled_backward(*trn, *val, 0.05, opt)
    for a, b in zip(batched.alphas(), old.alphas()):
        assert rel(a.grad, b.grad) < 1e-12


def load_fixture():
    ckpt = torch.load(os.path.join(FIXTURE, "checkpoint.pth.tar"), weights_only=True)
    cfg = ckpt["config"]
    net = SearchCNNController(
        1, cfg["init_channels"], 10, cfg["layers"], nn.CrossEntropyLoss(), n_nodes=cfg["nodes"]
    )
    return ckpt, net


def test_a_per_edge_checkpoint_loads_and_computes_what_it_did():
    """The fixture was written, and its outputs computed, by the per-edge code (see its
    README): converted on load, the network computes the same (float64, 1e-12)."""
    ckpt, net = load_fixture()
    expected = torch.load(os.path.join(FIXTURE, "expected.pt"), weights_only=True)
    assert search_cnn.is_per_edge(ckpt["model"]) and not search_cnn.is_per_edge(net.state_dict())
    net.load_state_dict(ckpt["model"])
    net = net.double().eval()
    with torch.no_grad():
        assert rel(net(expected["X"]), expected["eval_logits"]) < 1e-12
    net.train()
    loss = net.loss(expected["X"], expected["y"])
    assert rel(loss, expected["train_loss"]) < 1e-12
    for g, e in zip(torch.autograd.grad(loss, list(net.alphas())), expected["alpha_grads"]):
        assert rel(g, e) < 1e-12


def test_a_per_edge_checkpoint_keeps_its_momentum_buffers():
    """upgrade_checkpoint converts the weight optimizer's momentum buffers with the weights:
    each edge's view of the new buffer is its old buffer."""
    ckpt, net = load_fixture()
    up = net.upgrade_checkpoint(ckpt)
    net.load_state_dict(up["model"])
    opt = torch.optim.SGD(net.weights(), 0.025, momentum=0.9, weight_decay=3e-4)
    opt.load_state_dict(up["w_optim"])
    old_names = [
        k
        for k in ckpt["model"]
        if k.startswith("net.") and not k.endswith(("running_mean", "running_var", "tracked"))
    ]
    old_bufs = {old_names[i]: s["momentum_buffer"] for i, s in ckpt["w_optim"]["state"].items()}
    new_bufs = {n: opt.state[p]["momentum_buffer"] for n, p in net.named_weights()}
    assert len(new_bufs) == len(list(net.weights()))
    cells = list(net.net.cells)
    checked = 0
    for key, old in old_bufs.items():
        m = search_cnn._PER_EDGE_KEY.match(key)
        if m is None:
            assert torch.equal(new_bufs[key], old), key
        else:
            c, i, j, op, rest = int(m[2]), int(m[3]), int(m[4]), int(m[5]), m[6]
            name, rows = cells[c].edge_slices(i, j)[search_cnn._PER_EDGE_OPS[op]][rest]
            assert torch.equal(new_bufs[f"{m[1]}{name}"][rows], old), key
        checked += 1
    assert checked == len(old_bufs) > 0
    assert up["alpha_optim"] is ckpt["alpha_optim"] and up["epoch"] == 1


@pytest.mark.slow
def test_a_per_edge_search_run_resumes(tmp_path, monkeypatch):
    """The fixture's run, as if it had been started for 2 epochs: --resume continues it."""
    import search

    run = tmp_path / "searchs" / "fix2"
    run.mkdir(parents=True)
    ckpt = torch.load(os.path.join(FIXTURE, "checkpoint.pth.tar"), weights_only=True)
    ckpt["config"]["epochs"] = 2
    torch.save(ckpt, run / "checkpoint.pth.tar")
    shutil.copy(os.path.join(FIXTURE, "README.md"), tmp_path / "fixture-README.md")
    monkeypatch.chdir(tmp_path)
    argv = ["--name", "fix2", "--dataset", "digits", "--epochs", "2", "--layers", "3"]
    argv += ["--init_channels", "4", "--nodes", "2", "--batch_size", "64", "--workers", "0"]
    argv += ["--no_progress", "--resume"]
    assert search.main(argv) == 0
    after = torch.load(run / "checkpoint.pth.tar", weights_only=True)
    assert after["epoch"] == 2 and not search_cnn.is_per_edge(after["model"])
    assert "Resumed from" in (run / "search.log").read_text()


@pytest.mark.slow
def test_a_search_on_the_digits_takes_the_per_edge_supernets_path(monkeypatch):
    """float64, one pass over 512 of scikit-learn's digits in 8 second-order search steps
    (search.search_step, the stage's step): the batched and the per-edge supernets end with
    the same alphas (1e-9 relative) and so the same genotype. The batching only reorders float
    additions; in float32 that reordering alone is enough to flip near-tied argmaxes of a short
    search (docs/benchmarks.md), so this is the exact form of "the same search as before"."""
    from sklearn.datasets import load_digits

    import search

    digits = load_digits()
    X = torch.tensor(digits.images[:512], dtype=torch.float64).unsqueeze(1) / 16.0
    X = (X - X.mean()) / X.std()
    y = torch.tensor(digits.target[:512])
    batches = [(X[i : i + 32], y[i : i + 32]) for i in range(0, 512, 32)]
    pairs = list(zip(batches[0::2], batches[1::2]))  # (training batch, validation batch)

    batched, old = per_edge_pair(monkeypatch, seed=4, n_nodes=3)
    start = [a.detach().clone() for a in batched.alphas()]
    for net in (batched, old):
        w_optim = torch.optim.SGD(net.weights(), 0.025, momentum=0.9, weight_decay=3e-4)
        alpha_optim = torch.optim.Adam(
            net.alphas(), 3e-3, betas=(0.5, 0.999), weight_decay=1e-3
        )  # 10x the paper's lr, so that 8 steps move the alphas well past the tolerance
        architect = Architect(net, 0.9, 3e-4)
        for trn, val in pairs:
            search.search_step(net, architect, w_optim, alpha_optim, trn, val, 0.025, False, 5.0)
    for a, b, s in zip(batched.alphas(), old.alphas(), start):
        assert rel(a, b) < 1e-9
        assert rel(a, s) > 1e-3  # the alphas did move: the agreement is not the initial one's
    assert batched.genotype() == old.genotype()
