"""visualize.py: cell GIFs, alpha heatmaps, op weights, metrics log and curves, the CLI."""

import os

import pytest
import torch
from conftest import needs_dot
from PIL import Image, ImageStat

import genotypes as gt
import utils
import visualize

N_NODES = 4  # DARTS' cell


def random_alphas(seed: int, n_nodes: int = N_NODES) -> list[torch.Tensor]:
    """Softmaxed alphas of one cell type: (2 + i, n_ops) per node, as search.py logs them."""
    g = torch.Generator().manual_seed(seed)
    return [
        torch.softmax(torch.randn(2 + i, len(gt.PRIMITIVES), generator=g), -1)
        for i in range(n_nodes)
    ]


def assert_real_image(path) -> None:
    """A PNG that PIL reads and that is not a blank page."""
    assert os.path.isfile(path)
    with Image.open(path) as im:
        assert im.format == "PNG"
        rgb = im.convert("RGB")
    assert len(rgb.getcolors(maxcolors=1 << 24)) > 10
    assert max(ImageStat.Stat(rgb).var) > 0


def gif_frames(path) -> list[Image.Image]:
    with Image.open(path) as im:
        frames = []
        for k in range(im.n_frames):
            im.seek(k)
            frames.append(im.convert("RGB"))
        return frames


# --------------------------------------------------------------------------------------------
# GIFs
# --------------------------------------------------------------------------------------------
def test_make_gif_pads_frames_to_common_size_with_captions(tmp_path):
    sizes = [(120, 40), (60, 90), (80, 50)]
    colors = ["red", "green", "blue"]
    paths = []
    for k, (size, color) in enumerate(zip(sizes, colors)):
        path = tmp_path / f"f{k}.png"
        Image.new("RGB", size, color).save(path)
        paths.append(str(path))
    out = tmp_path / "sub" / "anim.gif"  # the folder is created
    got = visualize.make_gif(paths, str(out), captions=[f"Epoch {k + 1}" for k in range(3)])
    assert got == str(out)
    with Image.open(out) as im:
        assert im.format == "GIF"
        assert im.n_frames == 3
        assert im.info.get("loop") == 0  # loops forever
    frames = gif_frames(out)
    expected = (120, 90 + visualize.CAPTION_HEIGHT)
    assert all(f.size == expected for f in frames)
    for f, color in zip(frames, colors):
        # The centre shows the frame's own colour; the caption strip is white with black text.
        cx, cy = expected[0] // 2, visualize.CAPTION_HEIGHT + 45
        assert f.getpixel((cx, cy)) == Image.new("RGB", (1, 1), color).getpixel((0, 0))
        strip = f.crop((0, 0, expected[0], visualize.CAPTION_HEIGHT))
        assert strip.getpixel((expected[0] - 1, 0)) == (255, 255, 255)
        assert min(min(c) for _, c in strip.getcolors(maxcolors=1 << 16)) < 100  # text drawn
    assert not [p for p in os.listdir(out.parent) if p.endswith(".tmp")]


def test_make_gif_single_frame_and_no_caption(tmp_path):
    src = tmp_path / "one.png"
    Image.new("RGB", (30, 20), "red").save(src)
    out = visualize.make_gif([str(src)], str(tmp_path / "one.gif"))
    with Image.open(out) as im:
        assert im.n_frames == 1
        assert im.size == (30, 20)
    with pytest.raises(ValueError):
        visualize.make_gif([], str(tmp_path / "none.gif"))
    with pytest.raises(ValueError):
        visualize.make_gif([str(src)], str(tmp_path / "x.gif"), captions=["a", "b"])


@needs_dot
def test_update_cell_gifs_from_real_cell_plots(tmp_path, monkeypatch):
    plots = tmp_path / "plots"
    assert visualize.update_cell_gifs(str(plots)) == []  # no folder yet
    # Written out of order, as search.py names them; epoch 10 must sort after epoch 2.
    for epoch, genotype in [(10, gt.DARTS_V1), (1, gt.DARTS_V2), (2, gt.DARTS_V1)]:
        visualize.plot_genotype(
            genotype, str(plots), caption=f"Epoch {epoch}", prefix=f"epoch_{epoch:03d}-"
        )
    calls = []
    make_gif = visualize.make_gif

    def spy(frames, out_path, captions=None, **kw):
        calls.append((os.path.basename(out_path), [os.path.basename(f) for f in frames], captions))
        return make_gif(frames, out_path, captions, **kw)

    monkeypatch.setattr(visualize, "make_gif", spy)
    written = visualize.update_cell_gifs(str(plots))
    assert sorted(written) == sorted([str(plots / "normal.gif"), str(plots / "reduce.gif")])
    assert sorted(calls) == [
        (
            f"{kind}.gif",
            [f"epoch_{e:03d}-{kind}.png" for e in (1, 2, 10)],
            ["Epoch 1", "Epoch 2", "Epoch 10"],
        )
        for kind in ("normal", "reduce")
    ]
    for kind in ("normal", "reduce"):
        frames = gif_frames(plots / f"{kind}.gif")
        assert len(frames) == 3
        assert len({f.size for f in frames}) == 1
        assert frames[0].tobytes() != frames[1].tobytes()


# --------------------------------------------------------------------------------------------
# Alphas
# --------------------------------------------------------------------------------------------
def test_edge_labels_follow_the_genotype_schema():
    labels = visualize.edge_labels(N_NODES)
    assert labels[:5] == ["2<-0", "2<-1", "3<-0", "3<-1", "3<-2"]
    assert labels[-1] == "5<-4"
    assert len(labels) == 14
    assert visualize.edge_labels(1) == ["2<-0", "2<-1"]


@pytest.mark.parametrize("as_lists", [False, True])
def test_alpha_heatmap_is_a_real_image(tmp_path, as_lists):
    alphas = random_alphas(0)
    arg = [a.tolist() for a in alphas] if as_lists else alphas
    out = tmp_path / "a" / "heat.png"
    assert visualize.plot_alpha_heatmap(arg, gt.PRIMITIVES, "normal", str(out)) == str(out)
    assert_real_image(out)


def test_heatmap_figure_rows_columns_and_softmax():
    raw = [torch.randn(2 + i, len(gt.PRIMITIVES)) for i in range(N_NODES)]
    fig = visualize.heatmap_figure(raw, gt.PRIMITIVES, "raw", softmax=True)
    ax = fig.axes[0]
    assert [t.get_text() for t in ax.get_yticklabels()] == visualize.edge_labels(N_NODES)
    assert [t.get_text() for t in ax.get_xticklabels()] == gt.PRIMITIVES
    shown = ax.images[0].get_array()
    assert shown.shape == (14, len(gt.PRIMITIVES))
    expected = torch.cat([torch.softmax(a, -1) for a in raw]).numpy()
    assert abs(shown - expected).max() < 1e-6
    with pytest.raises(ValueError, match="node 3"):
        visualize.heatmap_figure([raw[0], raw[0]], gt.PRIMITIVES, "bad")


def test_plot_op_weights_from_history(tmp_path):
    history = [
        {
            "epoch": e,
            "normal": [a.tolist() for a in random_alphas(e)],
            "reduce": [a.tolist() for a in random_alphas(10 + e)],
        }
        for e in (1, 2, 3, 3)
    ]  # epoch 3 twice: a resumed run, the last row wins
    history[-1]["normal"] = [[[1.0] + [0.0] * 7] * (2 + i) for i in range(N_NODES)]
    epochs, totals = visualize.op_weight_totals(history, "normal")
    assert epochs == [1, 2, 3]
    assert totals[2].tolist() == [14.0] + [0.0] * 7
    assert totals.shape == (3, len(gt.PRIMITIVES))
    assert torch.allclose(totals.sum(1), torch.full((3,), 14.0))  # 14 edges, each sums to 1
    out = tmp_path / "ops.png"
    assert visualize.plot_op_weights(history, gt.PRIMITIVES, str(out)) == str(out)
    assert_real_image(out)


def test_plots_leave_no_pyplot_figures(tmp_path):
    import matplotlib.pyplot as plt

    before = plt.get_fignums()
    visualize.plot_alpha_heatmap(random_alphas(1), gt.PRIMITIVES, "t", str(tmp_path / "h.png"))
    visualize.plot_curves([{"epoch": 1, "train_loss": 1.0}], str(tmp_path / "c.png"), "val")
    assert plt.get_fignums() == before


# --------------------------------------------------------------------------------------------
# Metrics and curves
# --------------------------------------------------------------------------------------------
def test_metrics_jsonl_round_trip(tmp_path):
    path = str(tmp_path / "run" / "metrics.jsonl")
    assert utils.read_jsonl(path) == []
    rows = [
        {"epoch": 1, "train_loss": 2.3, "train_top1": 0.1, "lr": 0.025, "genotype": "G(...)"},
        {"epoch": 2, "train_loss": 2.1, "train_top1": 0.2, "val_top1": 0.15, "lr": 0.02},
    ]
    utils.write_jsonl(path, rows)
    assert utils.read_jsonl(path) == rows
    utils.write_jsonl(path, rows[:1] + [{"epoch": 3, "train_loss": torch.tensor(1.5)}])
    assert utils.read_jsonl(path) == [rows[0], {"epoch": 3, "train_loss": 1.5}]
    assert os.listdir(tmp_path / "run") == ["metrics.jsonl"]  # no temp file left


@pytest.mark.parametrize("held_out", ["val", "test"])
def test_plot_curves_is_a_real_image(tmp_path, held_out):
    rows = [
        {
            "epoch": e,
            "train_loss": 2.0 / e,
            "train_top1": 0.2 * e,
            f"{held_out}_loss": 2.2 / e,
            f"{held_out}_top1": 0.18 * e,
        }
        for e in (1, 2, 3)
    ]
    del rows[0][f"{held_out}_loss"]  # missing keys are skipped
    out = tmp_path / "curves.png"
    assert visualize.plot_curves(rows, str(out), held_out) == str(out)
    assert_real_image(out)


def test_plot_curves_draws_both_splits(monkeypatch):
    # The lines drawn are checked on the figure the function would save.
    rows = [{"epoch": e, "train_loss": 1.0, "val_loss": 2.0, "train_top1": 0.5} for e in (2, 1)]
    rows.append({"epoch": 2, "train_loss": 1.0, "val_loss": 3.0})  # resumed: the last row wins
    saved = {}

    def fake_save(fig, out_path):
        saved["fig"] = fig
        return out_path

    monkeypatch.setattr(visualize, "_save_figure", fake_save)
    visualize.plot_curves(rows, "unused.png", "val")
    loss_ax, top1_ax = saved["fig"].axes
    assert [line.get_label() for line in loss_ax.get_lines()] == ["train", "val"]
    assert [line.get_label() for line in top1_ax.get_lines()] == ["train"]
    assert list(loss_ax.get_lines()[1].get_ydata()) == [2.0, 3.0]
    assert list(top1_ax.get_lines()[0].get_xdata()) == [1]


# --------------------------------------------------------------------------------------------
# CLI
# --------------------------------------------------------------------------------------------
@needs_dot
def test_cli_writes_pngs_and_sources(tmp_path):
    assert visualize.main(["DARTS_V2", "--out", str(tmp_path)]) == 0
    for name in ("normal", "reduce"):
        assert_real_image(tmp_path / f"{name}.png")
        with open(tmp_path / name) as f:
            assert "digraph" in f.read()


def test_cli_bad_genotype_exits_2_with_one_line(tmp_path, capsys):
    bad = (
        "Genotype(normal=[[('bad_op', 0)]], normal_concat=[2], "
        "reduce=[[('max_pool_3x3', 0)]], reduce_concat=[2])"
    )
    assert visualize.main([bad, "--out", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("visualize.py: error:")
    assert "bad_op" in err
    assert len(err.strip().splitlines()) == 1
    assert os.listdir(tmp_path) == []
