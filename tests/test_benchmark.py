"""scripts/benchmark.py: every figure is measured and reported with its conditions.

Tiny shapes; no timing is asserted (the figures depend on the machine)."""

import json

import pytest
from conftest import load_script

TINY = ["--size", "8", "--channels", "4", "--layers", "3", "--batch", "4"]
TINY += ["--steps", "1", "--warmup", "0"]


def load_benchmark():
    return load_script("scripts/benchmark.py")


def check_record(r, figure):
    assert r["figure"] == figure
    assert r["seconds"] > 0 and len(r["times"]) == 1
    assert r["peak_memory_bytes"] > 0 and r["memory"] == "peak_rss"
    assert r["device"] == "cpu" and r["torch"] and r["threads"] >= 1
    assert r["dtype"] == "float32" and r["input"] == "4x3x8x8"
    assert (r["batch"], r["channels"], r["layers"]) == (4, 4, 3)


def test_every_figure_in_process(capsys):
    bench = load_benchmark()
    for figure in bench.FIGURES:
        assert bench.main([*TINY, "--only", figure, "--json"]) == 0
        check_record(json.loads(capsys.readouterr().out.strip().splitlines()[-1]), figure)


def test_text_line_names_the_conditions(capsys):
    bench = load_benchmark()
    assert bench.main([*TINY, "--only", "weight", "--memory_format", "contiguous"]) == 0
    line = capsys.readouterr().out.strip()
    assert line.startswith("weight") and "s/step" in line and "peak RSS" in line
    for word in ("cpu", "PyTorch", "threads", "float32", "contiguous", "input 4x3x8x8", "C=4"):
        assert word in line, word


@pytest.mark.slow
def test_orchestrated_run_measures_each_figure_in_a_fresh_process(capsys):
    bench = load_benchmark()
    assert bench.main([*TINY, "--json"]) == 0
    records = [json.loads(line) for line in capsys.readouterr().out.strip().splitlines()]
    assert [r["figure"] for r in records] == list(bench.FIGURES)
    for r in records:
        check_record(r, r["figure"])


def test_bfloat16_is_refused_on_the_cpu():
    bench = load_benchmark()
    with pytest.raises(SystemExit):
        bench.main([*TINY, "--only", "weight", "--dtype", "bfloat16"])


def test_hessian_check_reports_every_eps_scale(capsys):
    """scripts/hessian_check.py on a tiny supernet: one line per eps scale. In float64 the
    central difference at a small eps must agree with the exact product (it converges as
    eps -> 0 while rounding stays far below): the script compares what it says it compares."""
    module = load_script("scripts/hessian_check.py")
    args = ["--data", "digits", "--batch", "16", "--channels", "4", "--layers", "3"]
    args += ["--train_steps", "1", "--dtype", "float64", "--scales", "0.01,1e-7"]
    assert module.main(args) == 0
    lines = [ln for ln in capsys.readouterr().out.splitlines() if "cosine(finite, exact)" in ln]
    assert len(lines) == 2
    cos = [float(ln.split("cosine(finite, exact) = ")[1].split(",")[0]) for ln in lines]
    rel = [float(ln.split("||finite - exact|| / ||exact|| = ")[1].split(",")[0]) for ln in lines]
    assert all(-1 <= c <= 1 for c in cos)
    assert cos[1] > 0.9999 and rel[1] < 1e-3


def test_profile_prints_the_top_ops(capsys):
    bench = load_benchmark()
    assert bench.main([*TINY, "--only", "weight", "--profile"]) == 0
    err = capsys.readouterr().err
    assert "Self CPU" in err and "aten::convolution_backward" in err
    with pytest.raises(SystemExit, match="--profile needs --only"):
        bench.main([*TINY, "--profile"])


def test_op_counter_counts_each_aten_call_and_classifies_it():
    """A function of known calls: one add, one view, one allocation; the backward of a mul
    runs under the mode too (its calls are counted)."""
    import torch

    bench = load_benchmark()
    x = torch.ones(3)
    a = torch.ones(3, requires_grad=True)
    counter = bench.op_counter()
    with counter:
        y = x + 1
        y.view(3, 1)
        torch.empty(2)
    assert counter.counts == {"aten.add": 1, "aten.view": 1, "aten.empty": 1}
    assert (counter.total, counter.views, counter.allocs, counter.compute) == (3, 1, 1, 1)
    counter = bench.op_counter()
    with counter:
        (a * 2.0).sum().backward()
    # forward: mul, sum; backward: at least the mul's gradient (a mul) and the sum's (expand)
    assert counter.counts["aten.mul"] >= 2 and counter.counts["aten.expand"] >= 1
    assert counter.compute < counter.total


def test_count_ops_prints_every_figure_with_its_conditions(capsys):
    bench = load_benchmark()
    tiny = ["--size", "8", "--channels", "4", "--layers", "3", "--batch", "2"]
    assert bench.main([*tiny, "--count_ops", "--json"]) == 0
    records = [json.loads(line) for line in capsys.readouterr().out.strip().splitlines()]
    assert [r["figure"] for r in records] == list(bench.COUNT_FIGURES)
    calls = {r["figure"]: r["calls"] for r in records}
    # a step holds its forward: a second-order step makes 4 forwards and backwards and more
    assert calls["second_order"] > 4 * calls["forward"] and calls["weight"] > calls["forward"]
    for r in records:
        assert r["calls"] == r["compute_calls"] + r["views"] + r["allocations"]
        assert r["input"] == "2x3x8x8" and (r["channels"], r["layers"]) == (4, 3)
    assert bench.main([*tiny, "--count_ops", "--only", "forward"]) == 0
    line = capsys.readouterr().out.strip()
    assert line.startswith("forward") and "ATen calls" in line and "without views" in line
    for word in ("cpu", "PyTorch", "channels_last", "input 2x3x8x8", "C=4", "3 layers"):
        assert word in line, word
