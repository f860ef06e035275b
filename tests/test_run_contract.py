"""The run's contract: engine.Run.track names the checkpoint once (model=, extra=) and refuses
misuse loudly; the stages and scripts/benchmark.py go through the same step functions."""

import functools
import inspect
import json
import os

import pytest
import torch
import torch.nn as nn
from conftest import load_script

import augment
import engine
import search
from config import SearchConfig
from engine import RunOrderError
from models.kernels import set_kernels


@pytest.fixture
def open_run(tmp_path, monkeypatch):
    """A function opening a digits search Run in tmp_path (``start()`` called unless
    ``start=False``); every Run it opened is closed (its lock released) at the end."""
    monkeypatch.chdir(tmp_path)
    opened = []

    def open_run(*flags, start=True):
        cfg = SearchConfig.from_argv(["--name", "r", "--dataset", "digits", *flags])
        run = engine.Run.open(cfg, "searchs", "search")
        opened.append(run)
        if start:
            run.start("Search")
        return run

    yield open_run
    for run in opened:
        run.__exit__(None, None, None)
    set_kernels("auto")


def tiny_model():
    torch.manual_seed(0)
    model = nn.Linear(3, 2)
    return model, torch.optim.SGD(model.parameters(), 0.1, momentum=0.9)


# --------------------------------------------------------------------------------------------
# engine.Run.track: the contract, and the misuses it refuses
# --------------------------------------------------------------------------------------------
def test_extra_is_given_to_track_and_cannot_be_assigned(open_run):
    run = open_run()
    with pytest.raises(
        RunOrderError, match=r"Run\.extra assigned: give the counters to Run\.track\("
    ):
        run.extra = {"best_top1": -1.0}  # the old order: before track, restored only if present
    model, optim = tiny_model()
    run.track(model=model, optim=optim, extra={"best_top1": -1.0})
    assert run.extra == {"best_top1": -1.0} and run.model is model
    run.extra["best_top1"] = 0.5  # the values change in place
    assert run.extra == {"best_top1": 0.5}
    with pytest.raises(RunOrderError, match=r"Run\.extra assigned"):
        run.extra = {}


def test_reading_the_contract_before_track_is_refused(open_run):
    run = open_run()
    with pytest.raises(RunOrderError, match=r"Run\.model read before Run\.track\(model="):
        run.model  # noqa: B018
    with pytest.raises(RunOrderError, match=r"Run\.extra read before Run\.track"):
        run.extra  # noqa: B018
    # a loop before track would start a resumed run from fresh weights
    with pytest.raises(RunOrderError, match=r"Run\.epochs\(\) before Run\.track"):
        next(run.epochs())
    with pytest.raises(RunOrderError, match=r"Run\.end_epoch\(\) before Run\.track"):
        run.end_epoch({"epoch": 1})
    assert not os.path.exists(run.path(engine.CHECKPOINT))


def test_track_once_after_start_and_with_each_key_once(open_run):
    model, optim = tiny_model()
    early = open_run(start=False)
    with pytest.raises(RunOrderError, match=r"Run\.track\(\) called before Run\.start\(\)"):
        early.track(model=model)
    early.__exit__(None, None, None)
    run = open_run()
    with pytest.raises(TypeError, match="model"):
        run.track(optim=optim)  # model= is required
    for bad in (
        dict(extra={"epoch": 3}),  # Run's own key
        dict(extra={"optim": 0}),  # an object's key
        dict(history=nn.Linear(1, 1)),  # an object under Run's key
    ):
        with pytest.raises(RunOrderError, match="would be written twice"):
            run.track(model=model, optim=optim, **bad)
    run.track(model=model, optim=optim, scaler=None)
    with pytest.raises(RunOrderError, match=r"Run\.track\(\) called twice"):
        run.track(model=model, optim=optim)


def test_the_checkpoint_holds_the_contract_and_a_resumed_run_restores_it(open_run):
    """A checkpoint holds the tracked objects (None ones left out), extra and engine.RUN_KEYS;
    --resume restores extra's values (a counter the stage changed), the states and the epoch."""
    run = open_run("--epochs", "2")
    model, optim = tiny_model()
    run.track(model=model, optim=optim, scaler=None, extra={"best": -1.0, "name": "a"})
    for epoch in run.epochs():
        model(torch.ones(4, 3)).sum().backward()
        optim.step()
        run.extra["best"] = 0.25
        run.extra["late"] = epoch  # a key added later: saved, not restored
        run.end_epoch({"epoch": epoch})
        break
    run.__exit__(None, None, None)
    state = torch.load(run.path(engine.CHECKPOINT), weights_only=True)
    assert set(state) == {"model", "optim", "best", "name", "late", *engine.RUN_KEYS}
    assert (state["epoch"], state["best"], state["name"], state["late"]) == (1, 0.25, "a", 1)

    resumed = open_run("--epochs", "2", "--resume")
    model2, optim2 = tiny_model()
    resumed.track(model=model2, optim=optim2, scaler=None, extra={"best": -1.0, "name": "a"})
    assert resumed.extra == {"best": 0.25, "name": "a"}
    assert resumed.resumed is not None and resumed.resumed["late"] == 1
    assert torch.equal(model2.weight, model.weight) and torch.equal(model2.bias, model.bias)
    assert optim2.state_dict()["state"][0]["momentum_buffer"].abs().sum() > 0
    assert list(resumed.epochs()) == [2]


# --------------------------------------------------------------------------------------------
# The stages and the benchmark share their step functions: what is timed is what runs
# --------------------------------------------------------------------------------------------
class FirstStepDone(Exception):
    """Raised by the wrappers after the first step: the stage has shown which function it
    calls, the rest of its epoch is not needed."""


def load_benchmark():
    return load_script("scripts/benchmark.py")


class Recording:
    """Replaces ``module.name`` with a wrapper that runs it and records its bound arguments (as
    passed: defaults not applied) in :attr:`calls`, then raises FirstStepDone while
    :attr:`stop` is set. :attr:`inside`: whether a call is under way."""

    def __init__(self, monkeypatch, module, name):
        self.calls: list[dict] = []
        self.stop, self.inside = True, False
        real = getattr(module, name)
        signature = inspect.signature(real)

        @functools.wraps(real)
        def wrapper(*args, **kwargs):
            self.inside = True
            try:
                out = real(*args, **kwargs)
            finally:
                self.inside = False
            self.calls.append(signature.bind(*args, **kwargs).arguments)
            if self.stop:
                raise FirstStepDone
            return out

        monkeypatch.setattr(module, name, wrapper)


BENCH_TINY = ["--size", "8", "--channels", "4", "--layers", "3", "--batch", "4"]
BENCH_TINY += ["--steps", "1", "--warmup", "0", "--json"]


def test_the_search_stage_and_the_benchmark_step_through_search_step(tmp_path, monkeypatch, capsys):
    rec = Recording(monkeypatch, search, "search_step")
    calls = rec.calls
    # A weight step outside search_step is a stage that bypasses it: stopped at once (the
    # search would otherwise run its whole epoch).
    weight_step = search.weight_step

    def only_inside(*args, **kwargs):
        if not rec.inside:
            raise AssertionError("a weight step outside search.search_step")
        return weight_step(*args, **kwargs)

    monkeypatch.setattr(search, "weight_step", only_inside)
    monkeypatch.chdir(tmp_path)
    argv = ["--name", "s", "--dataset", "digits", "--layers", "3", "--init_channels", "4"]
    argv += ["--nodes", "2", "--batch_size", "64", "--workers", "0", "--no_progress"]
    argv += ["--epochs", "1"]
    with pytest.raises(FirstStepDone):
        search.main(argv)
    assert len(calls) == 1  # the stage's step went through search.search_step
    stage = calls[0]
    cfg = SearchConfig()
    assert type(stage["model"]).__name__ == "SearchCNNController"  # no DDP in one process
    assert stage["architect"].net is stage["model"]  # the Architect's, unwrapped
    assert (stage["lr"], stage["first_order"], stage["grad_clip"]) == (
        cfg.w_lr,
        False,
        cfg.w_grad_clip,
    )

    rec.stop = False
    assert load_benchmark().main([*BENCH_TINY, "--only", "second_order"]) == 0
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["figure"] == "second_order"
    assert len(calls) == 2
    bench = calls[1]
    assert set(bench) == set(stage)  # every argument passed, as the stage passes them
    assert (bench["lr"], bench["first_order"], bench["grad_clip"]) == (
        cfg.w_lr,
        False,
        cfg.w_grad_clip,
    )


def test_the_augment_stage_and_the_benchmark_pass_train_step_the_same_arguments(
    tmp_path, monkeypatch, capsys
):
    rec = Recording(monkeypatch, augment, "train_step")
    calls = rec.calls
    monkeypatch.chdir(tmp_path)
    argv = ["--name", "a", "--dataset", "digits", "--genotype", "DARTS_V2", "--layers", "3"]
    argv += ["--init_channels", "4", "--batch_size", "64", "--workers", "0", "--no_progress"]
    argv += ["--epochs", "1"]  # a stage bypassing train_step would end after its one epoch
    with pytest.raises(FirstStepDone):
        augment.main(argv)
    assert len(calls) == 1
    rec.stop = False
    assert load_benchmark().main([*BENCH_TINY, "--only", "augment"]) == 0
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["figure"] == "augment"
    assert len(calls) == 2
    stage, bench = calls
    # Every parameter is passed explicitly by both (none left to a default the other sets).
    assert set(stage) == set(bench) == set(inspect.signature(augment.train_step).parameters)
    same = ("aux_weight", "grad_clip", "label_smoothing", "amp_dtype", "scaler")
    assert {k: stage[k] for k in same} == {k: bench[k] for k in same}
    assert stage["aux_weight"] == 0.4 and stage["amp_dtype"] is None
