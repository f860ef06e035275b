"""Tests for the augment stage: models/augment_cnn.py (the discrete network) and augment.py."""

from __future__ import annotations

import itertools
import json
import os

import pytest
import torch
import torch.nn as nn
from PIL import Image

import augment
import genotypes as gt
import utils
from config import AugmentConfig, ConfigError
from models.augment_cnn import AugmentCell, AugmentCNN, AuxiliaryHead, drop_path
from preproc import get_dataset

# The published cells in the authors' flat form and in the nested form that gt.to_str prints.
FLAT = dict(gt._PUBLISHED)
NESTED = {name: gt.to_str(gt.NAMED[name]) for name in FLAT}

CIFAR = dict(input_size=32, C_in=3)
MNIST = dict(input_size=28, C_in=1)


def tiny(
    genotype: gt.Genotype = gt.DARTS_V2,
    auxiliary: bool = True,
    input_size: int = 32,
    C_in: int = 3,
    C: int = 8,
    n_layers: int = 5,
    n_classes: int = 10,
) -> AugmentCNN:
    return AugmentCNN(input_size, C_in, C, n_classes, n_layers, auxiliary, genotype)


# ------------------------------------------------------------------------------ building


@pytest.mark.parametrize("name", ["DARTS_V1", "DARTS_V2"])
def test_published_genotypes_build_the_same_network_from_every_form(name):
    forms = {"name": gt.load(name), "flat": gt.load(FLAT[name]), "nested": gt.load(NESTED[name])}
    assert FLAT[name] != NESTED[name]  # really two different strings
    x = torch.randn(2, 3, 32, 32)
    nets, outs = {}, {}
    for form, genotype in forms.items():
        torch.manual_seed(0)
        nets[form] = tiny(genotype).eval()
        with torch.no_grad():
            outs[form] = nets[form](x)[0]
    ref = nets["name"].state_dict()
    for form in ("flat", "nested"):
        sd = nets[form].state_dict()
        assert list(sd) == list(ref)
        assert all(sd[k].shape == ref[k].shape and torch.equal(sd[k], ref[k]) for k in ref)
        torch.testing.assert_close(outs[form], outs["name"], rtol=0, atol=0)


def test_v1_and_v2_differ():
    """Guards the test above: different genotypes do give different networks."""
    v1, v2 = tiny(gt.DARTS_V1).state_dict(), tiny(gt.DARTS_V2).state_dict()
    assert list(v1) != list(v2)


def test_darts_v2_cifar10_parameter_count():
    """The paper's network (no BN after pooling): 3.3M; the authors' code reports 3.349342M."""
    model = AugmentCNN(32, 3, 36, 10, 20, True, gt.DARTS_V2)
    assert utils.count_parameters(model, exclude="aux_head") == 3_349_342


def test_cells_follow_the_genotype():
    model = tiny(gt.DARTS_V2, n_layers=5)
    assert [i for i, c in enumerate(model.cells) if c.reduction] == [1, 3]
    for cell in model.cells:
        nodes = gt.DARTS_V2.reduce if cell.reduction else gt.DARTS_V2.normal
        assert cell.inputs == [[src for _, src in node] for node in nodes]
        for ops, node in zip(cell.dag, nodes, strict=True):
            for op, (name, src) in zip(ops, node, strict=True):
                stride = 2 if cell.reduction and src < 2 else 1
                if name == "skip_connect":
                    assert isinstance(op, nn.Identity) == (stride == 1)
                elif "pool" in name:
                    assert op.stride == stride
                else:  # SepConv / DilConv: the first depthwise conv carries the stride
                    convs = [m for m in op.modules() if isinstance(m, nn.Conv2d)]
                    assert convs[0].stride == (stride, stride)
    # Every BN of the evaluated network is affine.
    bns = [m for m in model.modules() if isinstance(m, nn.BatchNorm2d)]
    assert bns and all(bn.affine for bn in bns)


def test_no_batchnorm_after_pooling():
    model = tiny(gt.DARTS_V1)  # its reduction cell has max and avg pooling
    n_pool_edges = sum("pool" in op for node in gt.DARTS_V1.reduce for op, _ in node)
    pools = 0
    for cell in model.cells:
        for ops in cell.dag:
            for op in ops:
                if isinstance(op, (nn.MaxPool2d, nn.AvgPool2d)):
                    pools += 1
                # A pooling op is the bare layer, never wrapped with a BN.
                assert not (
                    isinstance(op, nn.Sequential)
                    and any(isinstance(m, (nn.MaxPool2d, nn.AvgPool2d)) for m in op)
                )
    assert n_pool_edges == 5 and pools == 2 * n_pool_edges  # two reduction cells
    # And nowhere in the network does a BN follow a pooling layer in a Sequential.
    for seq in (m for m in model.modules() if isinstance(m, nn.Sequential)):
        for a, b in itertools.pairwise(seq):
            assert not (
                isinstance(a, (nn.MaxPool2d, nn.AvgPool2d)) and isinstance(b, nn.BatchNorm2d)
            )


def test_any_node_count_and_concat_lengths():
    """3 nodes in the normal cell (one with three inputs, one with one), 2 in the reduction
    cell, and concats of different lengths: output channels follow C * len(concat)."""
    genotype = gt.from_str(
        "Genotype(normal=[[('sep_conv_3x3', 0), ('skip_connect', 1), ('dil_conv_5x5', 1)], "
        "[('avg_pool_3x3', 2)], [('sep_conv_5x5', 3), ('skip_connect', 0)]], "
        "normal_concat=[2, 3, 4], reduce=[[('max_pool_3x3', 0), ('skip_connect', 1)], "
        "[('dil_conv_3x3', 2), ('skip_connect', 1)]], reduce_concat=[3])"
    )
    C = 4
    model = tiny(genotype, C=C, n_layers=5)
    x = torch.randn(2, 3, 32, 32)
    s0 = s1 = model.stem(x)
    expected_c, c_cur = [], C
    for cell in model.cells:
        c_cur = c_cur * 2 if cell.reduction else c_cur
        expected_c.append(c_cur * (1 if cell.reduction else 3))
        s0, s1 = s1, cell(s0, s1)
        assert s1.shape[1] == expected_c[-1]
    assert model.linear.in_features == expected_c[-1]
    logits, aux = model.train()(x)
    assert logits.shape == aux.shape == (2, 10)


# ------------------------------------------------------------------------ forward/backward


@pytest.mark.parametrize("shape", [CIFAR, MNIST], ids=["cifar", "mnist"])
@pytest.mark.parametrize("auxiliary", [True, False], ids=["aux", "noaux"])
def test_forward_backward(shape, auxiliary):
    torch.manual_seed(0)
    n_layers = 5 if shape is CIFAR else 3
    model = tiny(auxiliary=auxiliary, n_layers=n_layers, **shape)
    model.drop_path_prob(0.2)
    x = torch.randn(4, shape["C_in"], shape["input_size"], shape["input_size"])
    y = torch.randint(0, 10, (4,))

    model.train()
    logits, aux = model(x)
    assert logits.shape == (4, 10)
    if auxiliary:
        assert aux is not None and aux.shape == (4, 10)
    else:
        assert aux is None and model.aux_head is None
    loss = nn.functional.cross_entropy(logits, y)
    if aux is not None:
        loss = loss + 0.4 * nn.functional.cross_entropy(aux, y)
    loss.backward()
    for name, p in model.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name
    if auxiliary:
        assert any(p.grad.abs().sum() > 0 for p in model.aux_head.parameters())

    model.eval()
    with torch.no_grad():
        logits, aux = model(x)
    assert logits.shape == (4, 10) and aux is None


def test_aux_head_parameters_and_count():
    with_aux, without = tiny(auxiliary=True), tiny(auxiliary=False)
    aux_names = [n for n, _ in with_aux.named_parameters() if n.startswith("aux_head.")]
    assert aux_names
    assert {n for n, _ in with_aux.named_parameters()} - set(aux_names) == {
        n for n, _ in without.named_parameters()
    }
    n_aux = sum(p.numel() for p in with_aux.aux_head.parameters())
    assert utils.count_parameters(with_aux, exclude="aux_head") == utils.count_parameters(without)
    assert utils.count_parameters(with_aux) == utils.count_parameters(without) + n_aux


def test_aux_head_is_the_papers_on_cifar():
    model = tiny(**CIFAR)
    head = model.aux_head
    assert head.spatial == 8 and model.aux_pos == 2 * 5 // 3
    layers = list(head.features)
    pool = layers[1]
    assert isinstance(pool, nn.AvgPool2d)
    assert (pool.kernel_size, pool.stride, pool.padding, pool.count_include_pad) == (5, 3, 0, False)
    kinds = (nn.ReLU, nn.AvgPool2d, nn.Conv2d, nn.BatchNorm2d)
    assert [next(k for k in kinds if isinstance(m, k)) for m in layers] == [
        nn.ReLU,
        nn.AvgPool2d,
        nn.Conv2d,
        nn.BatchNorm2d,
        nn.ReLU,
        nn.Conv2d,
        nn.BatchNorm2d,
        nn.ReLU,
    ]
    assert layers[2].kernel_size == (1, 1) and layers[2].out_channels == 128
    assert layers[5].kernel_size == (2, 2) and layers[5].out_channels == 768
    assert head.linear.in_features == 768


@pytest.mark.parametrize("spatial", range(1, 17))
def test_aux_head_works_for_every_map_size(spatial):
    """MNIST (7x7) and digits (2x2) maps are too small for the paper's pool: adaptive 2x2."""
    head = AuxiliaryHead(spatial, 16, 10)
    assert isinstance(head.features[1], nn.AvgPool2d) == (8 <= spatial <= 10)
    out = head.train()(torch.randn(3, 16, spatial, spatial))
    assert out.shape == (3, 10)


def test_aux_head_sees_the_right_map_on_small_inputs():
    seen = {}
    for size, c_in, n_layers in [(28, 1, 5), (8, 1, 3)]:
        model = tiny(input_size=size, C_in=c_in, n_layers=n_layers).train()
        model.aux_head.register_forward_hook(
            lambda m, inp, out, size=size: seen.__setitem__(size, inp[0].shape[-1])
        )
        model(torch.randn(2, c_in, size, size))
        assert seen[size] == model.aux_head.spatial
    assert seen == {28: 7, 8: 2}


# -------------------------------------------------------------------------------- drop path


def test_drop_path_masks_and_rescales():
    torch.manual_seed(0)
    x = torch.ones(4000, 2, 3, 3)
    out = drop_path(x, 0.3)
    per_sample = out.flatten(1)
    # Each sample is either dropped whole or kept whole and scaled by 1/keep_prob.
    dropped = (per_sample == 0).all(1)
    kept = torch.isclose(per_sample, torch.full_like(per_sample, 1 / 0.7)).all(1)
    assert (dropped | kept).all()
    assert 0.25 < dropped.float().mean().item() < 0.35
    assert abs(out.mean().item() - 1.0) < 0.05  # expectation preserved
    assert drop_path(x, 0.0) is x
    # Gradient flows through the kept samples only, with the same scale.
    xg = torch.ones(64, 1, 2, 2, requires_grad=True)
    drop_path(xg, 0.5).sum().backward()
    g = xg.grad.flatten(1)
    assert set(g[:, 0].tolist()) <= {0.0, 2.0}


def _two_node_cell() -> AugmentCell:
    # node 2 = identity of input 1; node 3 = sep_conv of input 1.
    nodes = [[("skip_connect", 1)], [("sep_conv_3x3", 1)]]
    return AugmentCell(nodes, [2, 3], C_pp=4, C_p=4, C=4, reduction_p=False, reduction=False)


def test_drop_path_in_a_cell_spares_the_identity():
    torch.manual_seed(0)
    cell = _two_node_cell().train()
    cell.drop_prob = 0.5
    s = torch.randn(64, 4, 6, 6)
    with torch.no_grad():
        ref = cell.preproc1(s)  # what the identity passes on (train-mode BN, same batch)
        out = cell(s, s)
    ident, conv = out[:, :4], out[:, 4:]
    torch.testing.assert_close(ident, ref)  # never dropped, never rescaled
    zeroed = (conv.flatten(1) == 0).all(1)
    assert 0 < zeroed.sum() < 64  # some samples of the sep_conv output dropped, not all


def test_drop_path_active_in_training_only():
    torch.manual_seed(0)
    model = tiny(auxiliary=False, input_size=16, C=4)
    model.drop_path_prob(0.3)
    assert all(c.drop_prob == 0.3 for c in model.cells)
    x = torch.randn(4, 3, 16, 16)
    model.eval()
    with torch.no_grad():
        a, b = model(x)[0], model(x)[0]
    torch.testing.assert_close(a, b, rtol=0, atol=0)
    model.train()
    # Freeze the BN statistics' effect: train-mode BN is deterministic given the batch, so any
    # difference between two calls comes from the drop-path masks.
    with torch.no_grad():
        c, d = model(x)[0], model(x)[0]
    assert not torch.allclose(c, d)
    model.drop_path_prob(0.0)
    with torch.no_grad():
        e, f = model(x)[0], model(x)[0]
    torch.testing.assert_close(e, f)
    with pytest.raises(ValueError):
        model.drop_path_prob(1.0)


def test_drop_path_schedule():
    ps = [augment.drop_path_schedule(0.2, e, 10) for e in range(1, 11)]
    assert ps[0] == 0.0
    assert ps == pytest.approx([0.2 * k / 10 for k in range(10)])


def test_train_step_uses_aux_loss():
    torch.manual_seed(0)
    model = tiny(n_layers=3).train()
    x, y = torch.randn(4, 3, 32, 32), torch.randint(0, 10, (4,))
    opt = torch.optim.SGD(model.parameters(), 0.0)  # lr 0: the weights stay put
    loss, logits = augment.train_step(model, opt, x, y, aux_weight=0.0, grad_clip=5.0)
    assert model.aux_head.linear.weight.grad is None  # aux loss not used with weight 0
    loss_aux, _ = augment.train_step(model, opt, x, y, aux_weight=0.4, grad_clip=5.0)
    assert model.aux_head.linear.weight.grad is not None
    assert loss_aux > loss and logits.shape == (4, 10) and not loss.requires_grad


# ----------------------------------------------------------------------------- augment.py

BASE = [
    "--name",
    "t",
    "--dataset",
    "digits",
    "--epochs",
    "1",
    "--layers",
    "3",
    "--init_channels",
    "4",
    "--batch_size",
    "64",
    "--workers",
    "0",
    "--device",
    "cpu",
]

BAD_GENOTYPES = {
    "unknown op": (
        "Genotype(normal=[('sep_conv_7x7', 0), ('skip_connect', 1)], "
        "normal_concat=[2], reduce=[('max_pool_3x3', 0), ('max_pool_3x3', 1)], "
        "reduce_concat=[2])",
        "unknown op 'sep_conv_7x7'",
    ),
    "index out of range": (
        "Genotype(normal=[('sep_conv_3x3', 0), ('skip_connect', 2)], "
        "normal_concat=[2], reduce=[('max_pool_3x3', 0), "
        "('max_pool_3x3', 1)], reduce_concat=[2])",
        "node index out of range",
    ),
    "odd flat list": (
        "Genotype(normal=[('sep_conv_3x3', 0), ('skip_connect', 1), "
        "('skip_connect', 0)], normal_concat=[2, 3], reduce=[('max_pool_3x3', 0), "
        "('max_pool_3x3', 1)], reduce_concat=[2])",
        "wrong number of nodes",
    ),
    "not a genotype": ("[1, 2, 3]", "not a genotype"),
    "unknown name": ("DARTS_V3", "not a genotype"),
    "missing file-like": ("no/such/genotype.txt", "not a genotype"),
}


@pytest.mark.parametrize("case", list(BAD_GENOTYPES))
def test_malformed_genotype_exits_2_with_one_line(case, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    text, message = BAD_GENOTYPES[case]
    assert augment.main(BASE + ["--genotype", text]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("augment.py: error: ") and message in err[0]
    assert not os.path.exists("augments")  # rejected before anything is written


@pytest.mark.parametrize(
    "code",
    [
        "__import__('os').system('touch PWNED')",
        "Genotype(normal=__import__('os').system('touch PWNED'), normal_concat=[2], "
        "reduce=[('max_pool_3x3', 0), ('max_pool_3x3', 1)], reduce_concat=[2])",
        "Genotype(normal=[('sep_conv_3x3', 0), ('skip_connect', 1)], "
        "normal_concat=range(__import__('os').system('touch PWNED'), 3), "
        "reduce=[('max_pool_3x3', 0), ('max_pool_3x3', 1)], reduce_concat=[2])",
    ],
)
def test_python_in_the_genotype_runs_nothing(code, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    assert augment.main(BASE + ["--genotype", code]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("augment.py: error: ")
    assert not (tmp_path / "PWNED").exists()


def test_bad_genotype_file_exits_2(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "g.txt").write_text("Genotype(normal=[('conv_9x9', 0)])\n")
    assert augment.main(BASE + ["--genotype", "g.txt"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("augment.py: error: g.txt: ")


@pytest.mark.slow
def test_one_epoch_on_digits(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    # The genotype comes from a file, in the nested form the search writes.
    (tmp_path / "genotype.txt").write_text(gt.to_str(gt.DARTS_V2) + "\n")
    assert augment.main(BASE + ["--genotype", "genotype.txt"]) == 0
    out = capsys.readouterr().out
    run_dir = tmp_path / "augments" / "t"
    for name in ("augment.log", "config.json", "checkpoint.pth.tar", "best.pth.tar"):
        assert (run_dir / name).is_file(), name
    assert any((run_dir / "tb").iterdir())
    final = [ln for ln in out.splitlines() if ln.startswith("Final test top1 = ")]
    best = [ln for ln in out.splitlines() if ln.startswith("Best test top1 = ")]
    assert len(final) == len(best) == 1 and final[0].endswith("%")
    assert best[0].endswith(
        "(chosen on the test set: not comparable with the paper, which reports the final epoch)"
    )
    log = (run_dir / "augment.log").read_text()
    assert "Test: [  1/1]" in log and "alidation" not in log
    assert "without the auxiliary head" in log and "M without" in log
    assert "WARNING: --cutout_length 16 is not smaller than the 8x8 images" in log

    state = torch.load(run_dir / "checkpoint.pth.tar", weights_only=True)
    assert {"model", "optimizer", "scheduler", "epoch", "best_top1", "genotype", "config"} <= set(
        state
    )
    assert state["epoch"] == 1 and state["config"]["dataset"] == "digits"
    assert gt.from_str(state["genotype"]) == gt.DARTS_V2
    assert f"{state['best_top1']:.2%} at epoch 1 " in best[0]
    model = AugmentCNN(8, 1, 4, 10, 3, True, gt.from_str(state["genotype"]))
    model.load_state_dict(state["model"])
    best_state = torch.load(run_dir / "best.pth.tar", weights_only=True)
    assert best_state["epoch"] == 1
    rows = [json.loads(ln) for ln in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in rows] == [1]
    assert f"{rows[0]['test_top1']:.2%}" == final[0].split(" = ")[1]
    for key in ("train_loss", "train_top1", "test_loss", "test_top5", "lr", "time"):
        assert isinstance(rows[0][key], float), key
    with Image.open(run_dir / "curves.png") as img:
        assert len(img.convert("RGB").getcolors(1 << 20)) > 10


@pytest.mark.slow
def test_one_epoch_on_fake_cifar10(fake_data, tmp_path, monkeypatch, capsys):
    """CIFAR-shaped data (tiny files in the real format): the paper's auxiliary head path."""
    monkeypatch.chdir(tmp_path)
    argv = [
        "--name",
        "c",
        "--dataset",
        "cifar10",
        "--data_path",
        fake_data,
        "--genotype",
        "DARTS_V1",
        "--epochs",
        "1",
        "--layers",
        "5",
        "--init_channels",
        "8",
        "--batch_size",
        "16",
        "--workers",
        "0",
        "--device",
        "cpu",
    ]
    assert augment.main(argv) == 0
    out = capsys.readouterr().out
    assert "Final test top1 = " in out and "Best test top1 = " in out
    log = (tmp_path / "augments" / "c" / "augment.log").read_text()
    assert "on 8x8 maps" in log and "WARNING" not in log


@pytest.mark.parametrize("genotype", [gt.DARTS_V2, gt.DARTS_V1])
def test_cell_shares_relus_without_changing_the_result(genotype):
    """A cell computes relu(state) once for all its ops that begin with a ReLU; its output and
    gradients are those of every op applied on its own (its module's forward)."""
    torch.manual_seed(0)
    model = tiny(genotype, auxiliary=False).double()
    x = torch.randn(4, 3, 32, 32, dtype=torch.float64)

    def reference_cell(cell, s0, s1):
        states = [cell.preproc0(s0), cell.preproc1(s1)]
        for ops, inputs in zip(cell.dag, cell.inputs):
            states.append(sum(op(states[src]) for op, src in zip(ops, inputs)))
        return torch.cat([states[i] for i in cell.concat], dim=1)

    outs, grads = [], []
    for use_reference in (False, True):
        model.zero_grad()
        s0 = s1 = model.stem(x)
        for cell in model.cells:
            s0, s1 = s1, (reference_cell(cell, s0, s1) if use_reference else cell(s0, s1))
        out = model.linear(model.gap(s1).flatten(1))
        out.sum().backward()
        outs.append(out.detach())
        grads.append(torch.cat([p.grad.flatten() for p in model.parameters()]))
    torch.testing.assert_close(outs[0], outs[1])
    torch.testing.assert_close(grads[0], grads[1])


def test_val_portion_is_held_out_of_training_and_disjoint_from_it():
    cfg = AugmentConfig(name="v", dataset="digits", genotype="DARTS_V2", val_portion=0.25)
    cfg.workers = 0
    train, val, test, _ = augment.make_loaders(cfg, pin=False)
    n_train = len(get_dataset("digits", "", train=True))
    train_idx, val_idx = set(train.dataset.indices), set(val.dataset.indices)
    assert len(val_idx) == int(0.25 * n_train) and len(train_idx) == n_train - len(val_idx)
    assert not train_idx & val_idx  # the held-out images are never trained on
    assert val.dataset.dataset.transform.transforms[0].__class__.__name__ == "Normalize"  # plain
    assert len(test.dataset) == len(get_dataset("digits", "", train=False))
    with pytest.raises(ConfigError, match="--val_portion must be in"):
        AugmentConfig(name="v", dataset="digits", genotype="DARTS_V2", val_portion=1.0).check()


@pytest.mark.slow
def test_val_portion_picks_the_best_epoch_and_reports_its_test_accuracy(
    tmp_path, monkeypatch, capsys
):
    monkeypatch.chdir(tmp_path)
    args = [*BASE, "--genotype", "DARTS_V2", "--epochs", "2", "--val_portion", "0.2"]
    assert augment.main(args) == 0
    out = capsys.readouterr().out
    run = tmp_path / "augments" / "t"
    state = torch.load(run / "checkpoint.pth.tar", weights_only=True)
    history = state["history"]
    best = max(history, key=lambda h: h["val_top1"])  # the first of equals, as the run keeps
    assert state["best_epoch"] == best["epoch"] and state["best_top1"] == best["val_top1"]
    assert torch.load(run / "best.pth.tar", weights_only=True)["epoch"] == best["epoch"]
    assert f"Final test top1 = {history[-1]['test_top1']:.2%}" in out
    line = [ln for ln in out.splitlines() if ln.startswith("Best epoch by validation top1 = ")]
    assert len(line) == 1 and line[0].endswith(f"its test top1 = {best['test_top1']:.2%}")
    log = (tmp_path / "augments" / "t" / "augment.log").read_text()
    assert "Validation: [  1/2]" in log and "Test: [  2/2]" in log


@pytest.mark.slow
def test_no_test_never_opens_the_test_set(tmp_path, monkeypatch, capsys):
    """A selection run (the paper's protocol) is scored on the held-out split alone."""
    monkeypatch.chdir(tmp_path)
    opened = []

    def spy(name, path, train, **kw):
        opened.append(train)
        return get_dataset(name, path, train, **kw)

    monkeypatch.setattr(augment, "get_dataset", spy)
    args = [*BASE, "--genotype", "DARTS_V2", "--val_portion", "0.2", "--no_test"]
    assert augment.main(args) == 0
    assert opened and all(opened)  # training images only
    out = capsys.readouterr().out.splitlines()
    state = torch.load(tmp_path / "augments" / "t" / "checkpoint.pth.tar", weights_only=True)
    assert f"Final val top1 = {state['history'][-1]['val_top1']:.2%}" in out
    assert [ln for ln in out if ln.startswith("Best epoch by validation top1 = 1 (val top1 ")]
    assert "Test:" not in (tmp_path / "augments" / "t" / "augment.log").read_text()
    assert not any(k.startswith("test_") for k in state["history"][-1])
    with pytest.raises(ConfigError, match="--no_test needs a --val_portion"):
        AugmentConfig(name="v", dataset="digits", genotype="DARTS_V2", no_test=True).check()
