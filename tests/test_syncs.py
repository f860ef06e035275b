"""No host-device synchronisation inside a training step (STYLE.md, item 16).

A synchronisation is the host reading a device tensor's value: ``.item()``, ``bool()`` (a tensor
``if``), ``float()``, ``int()``, ``.tolist()``, ``.cpu()``, ``.numpy()``. The tests patch these
on torch.Tensor and count the calls made while a step runs. On the CPU every tensor is a host
tensor, so the counter leaves out the calls made from torch/optim: Adam keeps its step counter
as a CPU tensor on every device and reads it there, which never waits for a GPU.
"""

import os
import sys
import types

import pytest
import torch
import torch.nn as nn

import augment
import engine
import genotypes as gt
import search
from architect import Architect
from models.augment_cnn import AugmentCNN
from models.search_cnn import SearchCNNController

SYNC_METHODS = ("item", "__bool__", "__float__", "__int__", "tolist", "cpu", "numpy")
_OPTIM = os.sep + os.path.join("torch", "optim") + os.sep


class SyncCounter:
    """Patches the tensor methods that read a value on the host; counts their calls."""

    def __init__(self, monkeypatch):
        self.calls: list[str] = []
        for name in SYNC_METHODS:
            original = getattr(torch.Tensor, name)
            monkeypatch.setattr(torch.Tensor, name, self._wrap(name, original))

    def _wrap(self, name, original):
        def counted(t, *args, **kwargs):
            caller = sys._getframe(1).f_code.co_filename
            if _OPTIM not in caller:
                self.calls.append(f"{name} from {caller}:{sys._getframe(1).f_lineno}")
            return original(t, *args, **kwargs)

        return counted


def search_setup():
    torch.manual_seed(0)
    model = SearchCNNController(1, 4, 10, 3, nn.CrossEntropyLoss(), n_nodes=2)
    w_optim = torch.optim.SGD(model.weights(), 0.025, momentum=0.9, weight_decay=3e-4)
    alpha_optim = torch.optim.Adam(model.alphas(), 3e-4, betas=(0.5, 0.999), weight_decay=1e-3)
    X, y = torch.randn(8, 1, 8, 8), torch.randint(0, 10, (8,))
    return model, w_optim, alpha_optim, (X[:4], y[:4]), (X[4:], y[4:])


@pytest.mark.parametrize("mode", ["second_order", "first_order", "exact"])
def test_a_search_step_does_not_synchronise(mode, monkeypatch):
    model, w_optim, alpha_optim, trn, val = search_setup()
    architect = Architect(model, 0.9, 3e-4, hessian="exact" if mode == "exact" else "finite")

    def step():
        return search.search_step(
            model, architect, w_optim, alpha_optim, trn, val, 0.025, mode == "first_order", 5.0
        )

    step()  # warm-up: the optimizers' state exists
    counter = SyncCounter(monkeypatch)
    step()
    assert counter.calls == []


def test_an_augment_step_does_not_synchronise(monkeypatch):
    torch.manual_seed(0)
    net = AugmentCNN(8, 1, 4, 10, 3, True, gt.DARTS_V2)
    net.train()
    net.drop_path_prob(0.2)
    optim = torch.optim.SGD(net.parameters(), 0.025, momentum=0.9, weight_decay=3e-4)
    X, y = torch.randn(4, 1, 8, 8), torch.randint(0, 10, (4,))
    augment.train_step(net, optim, X, y, 0.4, 5.0)
    counter = SyncCounter(monkeypatch)
    augment.train_step(net, optim, X, y, 0.4, 5.0)
    assert counter.calls == []


def test_the_counter_sees_a_synchronisation(monkeypatch):
    """The mock counts what it should: the old per-step reads of the loss would be caught."""
    counter = SyncCounter(monkeypatch)
    loss = torch.tensor(1.5)
    if torch.isfinite(loss):
        loss.item()
    assert len(counter.calls) == 2 and counter.calls[0].startswith("__bool__")


# --------------------------------------------------------------------------------------------
# engine.train_one_epoch: the metrics are read every print_freq steps, not in a step
# --------------------------------------------------------------------------------------------
class FakeRun:
    """What train_one_epoch reads of engine.Run."""

    def __init__(self, print_freq, tmp_path):
        self.cfg = types.SimpleNamespace(print_freq=print_freq, no_progress=True, epochs=3)
        self.model = nn.Linear(2, 3)
        self.device = torch.device("cpu")
        self.dir = str(tmp_path)
        self.global_step = 0
        self.logged: list[str] = []
        self.scalars: list[tuple[str, float, int]] = []
        self.logger = types.SimpleNamespace(info=self.logged.append)
        self.writer = types.SimpleNamespace(add_scalar=lambda *a: self.scalars.append(a))


def make_step(losses, ran):
    """A step function returning the given losses in turn, with 2-sample batches."""

    def step(batch):
        ran.append(len(ran))
        logits = torch.tensor([[2.0, 1.0, 0.0], [0.0, 1.0, 2.0]])
        return torch.tensor(losses[len(ran) - 1]), logits, torch.tensor([0, 1])

    return step


def test_train_one_epoch_reads_the_device_once_per_window(monkeypatch, tmp_path):
    run = FakeRun(print_freq=4, tmp_path=tmp_path)
    ran: list[int] = []
    losses = [1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 7.0]
    counter = SyncCounter(monkeypatch)
    result = engine.train_one_epoch(run, make_step(losses, ran), [(torch.zeros(1),)] * 7, epoch=1)
    # reads after steps 0, 4 and 6 (the last): one .tolist() each, nothing in the steps
    assert [c.split(" ")[0] for c in counter.calls] == ["tolist"] * 3
    assert len(run.logged) == 3 and run.global_step == 7
    assert result["loss"] == pytest.approx(4.0)
    # sample 0 predicts class 0 (right), sample 1 class 2 (wrong, but within the top 5)
    assert result["top1"] == pytest.approx(0.5) and result["top5"] == pytest.approx(1.0)
    # tensorboard: each window's mean loss at the global step of its read
    assert run.scalars == [
        ("train/loss", pytest.approx(1.0), 1),
        ("train/loss", pytest.approx(3.5), 5),
        ("train/loss", pytest.approx(6.5), 7),
    ]


def test_a_non_finite_loss_stops_at_the_read_naming_the_window(tmp_path):
    run = FakeRun(print_freq=3, tmp_path=tmp_path)
    ran: list[int] = []
    losses = [1.0, 1.0, 1.0, 1.0, float("nan"), 1.0, 1.0, 1.0, 1.0, 1.0]
    with pytest.raises(engine.NonFiniteLossError) as e:
        engine.train_one_epoch(run, make_step(losses, ran), [(torch.zeros(1),)] * 10, epoch=2)
    # reads after steps 0, 3, 6: the NaN of step 4 is seen at the read of step 6
    assert len(ran) == 7
    msg = str(e.value)
    assert msg.startswith("non-finite training loss in steps 4-6 of epoch 2;")
    assert "last good checkpoint" in msg and "\n" not in msg
    for bad in (float("inf"), float("-inf")):
        run, ran = FakeRun(print_freq=5, tmp_path=tmp_path), []
        with pytest.raises(engine.NonFiniteLossError, match="in step 0 of epoch 1"):
            engine.train_one_epoch(
                run, make_step([bad, 1.0], ran), [(torch.zeros(1),)] * 2, epoch=1
            )
        assert len(ran) == 1


def test_under_ddp_every_process_stops_at_the_same_read(monkeypatch, tmp_path):
    """The non-finite count is part of the all-reduced window: a process whose own losses are
    finite stops when another's was not (here, the other process is the patched sum)."""
    calls = []

    def all_reduce_sum(values, device):
        calls.append(list(values))
        other = [0.0, 0.0, 0.0, 1.0 if len(calls) == 2 else 0.0, 2.0]  # loss, top1, top5, bad, n
        return [a + b for a, b in zip(values, other)]

    monkeypatch.setattr(engine.distributed, "all_reduce_sum", all_reduce_sum)
    run = FakeRun(print_freq=2, tmp_path=tmp_path)
    ran: list[int] = []
    with pytest.raises(engine.NonFiniteLossError, match="in steps 1-2 of epoch 1"):
        engine.train_one_epoch(run, make_step([1.0] * 6, ran), [(torch.zeros(1),)] * 6, epoch=1)
    assert len(ran) == 3 and len(calls) == 2
    assert calls[0][3] == 0.0 and calls[0][4] == 2.0  # this process's flag and sample count


def test_kernels_flag_reaches_the_models(monkeypatch, tmp_path):
    """--kernels is checked by the config and set for the process when the run opens."""
    from config import SearchConfig
    from models.kernels import get_kernels, set_kernels
    from utils import ConfigError

    with pytest.raises(
        ConfigError,
        match=r"--kernels: invalid choice: 'gpu' \(choose from 'auto', 'fast', 'plain'\)",
    ):
        SearchConfig.from_argv(["--name", "k", "--dataset", "digits", "--kernels", "gpu"])
    cfg = SearchConfig.from_argv(["--name", "k", "--dataset", "digits", "--kernels", "plain"])
    monkeypatch.chdir(tmp_path)
    try:
        engine.Run.open(cfg, "searchs", "search")
        assert get_kernels() == "plain"
    finally:
        set_kernels("auto")
