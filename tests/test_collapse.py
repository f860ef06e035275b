"""Watching for the collapse (DARTS.md section 9): cell statistics, the alpha Hessian's dominant
eigenvalue, the early-stopping rules and the skip limit at derivation."""

import json

import collapse
import genotypes as gt
import search
import visualize

TINY = [
    "--dataset", "digits", "--layers", "3", "--init_channels", "4", "--nodes", "2",
    "--batch_size", "128", "--workers", "0", "--first_order", "--no_progress",
]  # fmt: skip


def tiny_search(tmp_path, monkeypatch, name, epochs, *flags):
    """An in-process digits search in ``tmp_path``; returns its run folder."""
    monkeypatch.chdir(tmp_path)
    assert search.main(["--name", name, "--epochs", str(epochs), *TINY, *flags]) == 0
    return tmp_path / "searchs" / name


def metrics(run):
    return [json.loads(ln) for ln in (run / "metrics.jsonl").read_text().splitlines()]


# --------------------------------------------------------------------------------------------
# Cell statistics
# --------------------------------------------------------------------------------------------
def test_op_counts_of_darts_v2():
    stats = collapse.cell_stats(gt.DARTS_V2)
    assert stats["normal_ops"] == {
        "max_pool_3x3": 0, "avg_pool_3x3": 0, "skip_connect": 2, "sep_conv_3x3": 5,
        "sep_conv_5x5": 0, "dil_conv_3x3": 1, "dil_conv_5x5": 0,
    }  # fmt: skip
    assert stats["reduce_ops"]["max_pool_3x3"] == 5 and stats["reduce_ops"]["skip_connect"] == 3
    assert (stats["normal_skip"], stats["reduce_skip"]) == (2, 3)
    assert sum(stats["reduce_ops"].values()) == 8


def test_skip_count_plot(tmp_path):
    rows = [{"epoch": e, "normal_skip": e // 2, "reduce_skip": 1} for e in range(1, 6)]
    out = visualize.plot_skip_counts(rows, str(tmp_path / "skip.png"))
    assert out and (tmp_path / "skip.png").stat().st_size > 1000
    assert visualize.plot_skip_counts([{"epoch": 1}], str(tmp_path / "none.png")) is None
    assert not (tmp_path / "none.png").exists()


def test_search_records_the_cell_statistics_every_epoch(tmp_path, monkeypatch):
    run = tiny_search(tmp_path, monkeypatch, "stats", 2)
    rows = metrics(run)
    assert [r["epoch"] for r in rows] == [1, 2]
    for r in rows:
        genotype = gt.from_str(r["genotype"])
        assert r["normal_ops"] == collapse.op_counts(genotype.normal)
        assert r["reduce_ops"] == collapse.op_counts(genotype.reduce)
        assert sum(r["normal_ops"].values()) == 2 * 2  # 2 nodes of 2 inputs
        assert r["normal_skip"] == r["normal_ops"]["skip_connect"]
        assert "hessian_eigen" not in r  # off by default
    assert (run / "plots" / "skip_counts.png").stat().st_size > 1000
