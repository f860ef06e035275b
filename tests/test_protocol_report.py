"""The protocol's report, byte for byte: report.json, report.md and report.png written for two
fixed sets of results (no run: the stages are replaced by what their runs would give) against
the files in tests/fixtures/protocol_report/, written by the report code as it stood before
scripts/protocol.py was split in parts (that folder's README.md says how to write them again)."""

import importlib.util
import json
import os
import sys

import matplotlib
import pytest
from conftest import ROOT

import genotypes as gt

SCRIPT = os.path.join(ROOT, "scripts", "protocol.py")
GOLDEN = os.path.join(ROOT, "tests", "fixtures", "protocol_report")
SEARCH = "--epochs 2 --layers 3 --first_order"
AUGMENT = "--layers 3 --epochs 2 --cutout_length 4"
V1, V2 = gt.to_str(gt.DARTS_V1), gt.to_str(gt.DARTS_V2)
# What each case's runs give: a search's genotype, a selection or final run's accuracy; None: the
# run failed. "full": a genotype found twice, a failed search, a tie, a failed final run.
# "none": no selection run finished, so no cell is picked, no final run, no plot.
CASES = {
    "full": {
        "args": ["--searches", "4", "--final_runs", "3"],
        "search": {1: V2, 2: V1, 3: V2, 4: None},
        "select": {"select-s1": 0.9125, "select-s2": 0.9125},
        "final": {"final-s1-1": 0.9724, "final-s1-2": 0.9731, "final-s1-3": None},
    },
    "none": {
        "args": ["--searches", "2", "--final_runs", "2"],
        "search": {1: V2, 2: V1},
        "select": {"select-s1": None, "select-s2": None},
        "final": {},
    },
}
WALL = {"search": 1234.5, "select": 321.25, "final": 4000.75}  # made up: seconds, as time.json


def load_protocol():
    spec = importlib.util.spec_from_file_location("protocol", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules["protocol"] = module  # its dataclasses look their module up
    spec.loader.exec_module(module)
    return module


def results(case):
    """The report dict of ``case``, built by the protocol's own ``run`` on made-up run rows."""
    protocol, given = load_protocol(), CASES[case]

    def stage(self, name, jobs):  # what the runs would give: their report rows
        rows = []
        for j in jobs:
            row = {"run": j.name, **j.info, "ok": False, "log": j.log}
            got = given[name][j.info["seed"]] if name == "search" else given[name][j.name]
            if got is None:
                row["error"] = f"failed (exit status 1): RuntimeError: boom; see {j.log}"
            else:
                row["ok"] = True
                row[{"search": "genotype", "select": "val_top1", "final": "test_top1"}[name]] = got
            rows.append(row)
        self.wall[name] = WALL[name]
        self.run_s[name] = WALL[name] / 2
        return rows

    protocol.Protocol.stage = stage
    argv = ["--name", f"golden-{case}", "--dataset", "cifar10", "--select_epochs", "20"]
    argv += [*given["args"], "--search_args", SEARCH, "--augment_args", AUGMENT]
    args = protocol.parser().parse_args(argv)
    first_order, _ = protocol.check(args)
    return protocol, protocol.Protocol(args, "/nowhere", [], {}).run(first_order)


def write(case, root, monkeypatch, dot=True):
    """Write ``case``'s report into ``root``; returns the genotypes drawn. graphviz is replaced
    by a recorder: what ``dot`` writes depends on its version, the report's text does not."""
    import visualize

    drawn = []
    monkeypatch.setattr(visualize, "dot_available", lambda: dot)
    monkeypatch.setattr(visualize, "plot_genotype", lambda g, out: drawn.append((g, out)))
    protocol, rep = results(case)
    protocol.write_report(root, rep, protocol.SELECT_SEED)
    return drawn


def golden(case, name, mode="r"):
    with open(os.path.join(GOLDEN, case, name), mode) as f:
        return f.read()


@pytest.mark.parametrize("case", sorted(CASES))
def test_report_md_and_json_are_the_golden_bytes(case, tmp_path, monkeypatch):
    drawn = write(case, str(tmp_path), monkeypatch)
    for name in ("report.json", "report.md"):
        assert (tmp_path / name).read_bytes() == golden(case, name, "rb"), name
    if case == "full":
        assert drawn == [(gt.from_str(V2), str(tmp_path))]  # the picked cell, drawn once
        assert json.loads(golden(case, "report.json"))["picked"]["tied_with"] == ["select-s2"]
    else:
        assert drawn == [] and not (tmp_path / "report.png").exists()


def test_without_dot_the_report_says_the_cell_is_not_drawn(tmp_path, monkeypatch):
    assert write("full", str(tmp_path), monkeypatch, dot=False) == []
    with_dot = golden("full", "report.md")
    drawn = "![normal cell](normal.png) ![reduction cell](reduce.png)"
    assert with_dot.count(drawn) == 1
    without = "(graphviz's `dot` is not installed: the cell is not drawn)"
    assert (tmp_path / "report.md").read_text() == with_dot.replace(drawn, without)


def test_report_png_is_the_golden_bytes(tmp_path, monkeypatch):
    made_with = golden("full", "matplotlib.txt").strip()
    if matplotlib.__version__ != made_with:
        pytest.skip(
            f"report.png was written by matplotlib {made_with}, this is {matplotlib.__version__}"
        )
    write("full", str(tmp_path), monkeypatch)
    assert (tmp_path / "report.png").read_bytes() == golden("full", "report.png", "rb")
