"""Watching for the collapse (DARTS.md section 9): cell statistics, the alpha Hessian's dominant
eigenvalue, the early-stopping rules and the skip limit at derivation."""

import json

import pytest
import torch

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


# --------------------------------------------------------------------------------------------
# --max_skip (P-DARTS) at derivation
# --------------------------------------------------------------------------------------------
def row(**logits):
    r = torch.zeros(len(gt.PRIMITIVES))
    for op, v in logits.items():
        r[gt.PRIMITIVES.index(op)] = v
    return r


# Four skip-connects in parse's cell, softmax weights 0.955 (node 2, input 0), 0.677 (node 2,
# input 1), 0.514 (node 3, input 1) and 0.792 (node 4, input 3).
HAND_NORMAL = [
    torch.stack([row(skip_connect=5), row(skip_connect=4, sep_conv_3x3=3)]),
    torch.stack([row(sep_conv_3x3=4), row(skip_connect=2), row(max_pool_3x3=1)]),
    torch.stack(
        [
            row(dil_conv_3x3=3),
            row(sep_conv_5x5=2.5),
            row(avg_pool_3x3=0.5),
            row(skip_connect=3.5, sep_conv_3x3=1),
        ]
    ),
    torch.stack([row(sep_conv_3x3=2), row(), row(), row(), row(sep_conv_5x5=2.2)]),
]


def test_max_skip_keeps_the_strongest_skips_and_rederives_the_others():
    assert gt.parse(HAND_NORMAL) == [
        [("skip_connect", 0), ("skip_connect", 1)],
        [("sep_conv_3x3", 0), ("skip_connect", 1)],
        [("skip_connect", 3), ("dil_conv_3x3", 0)],
        [("sep_conv_5x5", 4), ("sep_conv_3x3", 0)],
    ]
    cell, replaced = gt.parse_max_skip(HAND_NORMAL, 2)
    assert replaced == 2
    assert cell == [
        [("skip_connect", 0), ("sep_conv_3x3", 1)],  # 0.677 dropped: the same input's next op
        [("sep_conv_3x3", 0), ("max_pool_3x3", 2)],  # 0.514 dropped: another input is best
        [("skip_connect", 3), ("dil_conv_3x3", 0)],  # 0.792 kept
        [("sep_conv_5x5", 4), ("sep_conv_3x3", 0)],
    ]
    one, replaced = gt.parse_max_skip(HAND_NORMAL, 1)
    assert replaced == 3 and one[0][0] == ("skip_connect", 0)  # the strongest stays
    # input 0 is taken: node 4's best other pair is sep_conv_5x5 on input 1 (0.635)
    assert one[2] == [("sep_conv_5x5", 1), ("dil_conv_3x3", 0)]
    for m in (4, 5):
        assert gt.parse_max_skip(HAND_NORMAL, m) == (gt.parse(HAND_NORMAL), 0)


@pytest.mark.parametrize("seed", range(5))
def test_max_skip_on_random_alphas_keeps_the_rules(seed):
    gen = torch.Generator().manual_seed(seed)
    alpha = [torch.randn(2 + i, len(gt.PRIMITIVES), generator=gen) for i in range(4)]
    skip = gt.PRIMITIVES.index("skip_connect")
    alpha = [a + 2.0 * torch.eye(len(gt.PRIMITIVES))[skip] for a in alpha]  # skips win often
    plain = gt.parse(alpha)
    n_skip = sum(op == "skip_connect" for node in plain for op, _ in node)
    for m in range(0, 3):
        cell, replaced = gt.parse_max_skip(alpha, m)
        assert replaced == max(0, n_skip - m)
        assert sum(op == "skip_connect" for node in cell for op, _ in node) == min(m, n_skip)
        for node, old in zip(cell, plain):
            assert len({e for _, e in node}) == len(node)  # distinct inputs
            for pair, was in zip(node, old):
                assert pair == was or (was[0] == "skip_connect" and pair[0] != "none")


def test_max_skip_flag_notes_the_constraint_on_the_genotype_line():
    normal, reduce = HAND_NORMAL, [a.flip(0)[: a.shape[0]] for a in HAND_NORMAL]
    final, note = search.derive_final(normal, reduce, 2)
    assert final.normal == gt.parse_max_skip(HAND_NORMAL, 2)[0]
    assert final.reduce == gt.parse(reduce)  # the reduce cell is left alone
    assert note == " (--max_skip 2: 2 skip-connect(s) replaced)"
    assert search.derive_final(normal, reduce, 0) == (
        gt.Genotype(gt.parse(normal), range(2, 6), gt.parse(reduce), range(2, 6)),
        "",
    )  # 0: no limit
    assert search.derive_final(normal, reduce, 4)[1] == ""  # nothing to replace: no note


def test_max_skip_must_not_be_negative():
    from config import ConfigError, SearchConfig

    with pytest.raises(ConfigError, match="--max_skip must be >= 0"):
        SearchConfig.from_argv(["--name", "x", "--dataset", "digits", "--max_skip", "-1"])
