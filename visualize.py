"""Draw cells with graphviz.

    python visualize.py DARTS_V2 --out plots/
    python visualize.py "Genotype(normal=[[...]], ...)"
    python visualize.py searchs/demo/genotype.txt

writes ``normal.png``/``reduce.png`` and their graphviz sources (``normal``/``reduce``).

The other helpers let a user *see the search* (search.py and augment.py call them each epoch):

* :func:`make_gif` / :func:`update_cell_gifs`: the per-epoch cell plots as animated GIFs;
* :func:`plot_alpha_heatmap` / :func:`heatmap_figure`: the softmaxed alphas of one cell type;
* :func:`plot_op_weights`: the total weight of each op against the epoch (from alphas.jsonl);
* :func:`plot_curves`: the per-epoch metrics (utils.write_jsonl / read_jsonl) as curves.

The plots use matplotlib's object API (``matplotlib.figure.Figure``), never pyplot: nothing
chooses a backend or needs a display, and no figure stays registered in pyplot between epochs
(a figure is freed with its last reference).
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import sys
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any, BinaryIO

import torch
import torch.nn.functional as F

import genotypes as gt
from utils import atomic_write

if TYPE_CHECKING:  # matplotlib is imported where a plot is made, not at import
    from matplotlib.figure import Figure

NODE_COLORS = {"input": "darkseagreen2", "node": "lightblue", "output": "palegoldenrod"}


def dot_available() -> bool:
    """Whether graphviz's ``dot`` binary is on the PATH (the Python package needs it)."""
    return shutil.which("dot") is not None


def plot(
    cell: list[list[tuple[str, int]]],
    file_path: str,
    caption: str | None = None,
    concat: list[int] | range | None = None,
) -> str:
    """Render one cell (``Genotype.normal`` or ``.reduce``) to ``file_path + '.png'``; the
    graphviz source is kept at ``file_path``. Returns the PNG path."""
    import graphviz  # imported here: only plotting needs it

    g = graphviz.Digraph(
        format="png",
        edge_attr={"fontsize": "20", "fontname": "times"},
        node_attr={
            "style": "filled",
            "shape": "rect",
            "align": "center",
            "fontsize": "20",
            "height": "0.5",
            "width": "0.5",
            "penwidth": "2",
            "fontname": "times",
        },
        engine="dot",
    )
    g.body.extend(["rankdir=LR"])
    inputs = ["c_{k-2}", "c_{k-1}"]
    for name in inputs:
        g.node(name, fillcolor=NODE_COLORS["input"])
    n_nodes = len(cell)
    # Intermediate nodes carry their schema index (2, 3, ...), as in genotypes and heatmaps.
    names = inputs + [str(gt.N_INPUT_NODES + i) for i in range(n_nodes)]
    for name in names[gt.N_INPUT_NODES :]:
        g.node(name, fillcolor=NODE_COLORS["node"])
    for name, edges in zip(names[gt.N_INPUT_NODES :], cell):
        for op, j in edges:
            g.edge(names[j], name, label=op, fillcolor="gray")
    g.node("c_{k}", fillcolor=NODE_COLORS["output"])
    concat = concat if concat is not None else range(gt.N_INPUT_NODES, gt.N_INPUT_NODES + n_nodes)
    for j in concat:
        g.edge(names[j], "c_{k}", fillcolor="gray")
    if caption:
        g.attr(label=caption, overlap="false", fontsize="20", fontname="times")
    folder = os.path.dirname(file_path)
    if folder:
        os.makedirs(folder, exist_ok=True)
    return g.render(file_path, view=False)


def plot_genotype(
    genotype: gt.Genotype, out_dir: str, caption: str | None = None, prefix: str = ""
) -> list[str]:
    """Both cells of a genotype: ``<out_dir>/<prefix>normal.png`` and ``...reduce.png``."""
    return [
        plot(
            genotype.normal,
            os.path.join(out_dir, prefix + "normal"),
            caption,
            genotype.normal_concat,
        ),
        plot(
            genotype.reduce,
            os.path.join(out_dir, prefix + "reduce"),
            caption,
            genotype.reduce_concat,
        ),
    ]


# --------------------------------------------------------------------------------------------
# Animated cells
# --------------------------------------------------------------------------------------------
CAPTION_HEIGHT = 40  # pixels of the caption strip above each GIF frame
_CELL_FRAME = re.compile(r"epoch_(\d+)-(normal|reduce)\.png")


def make_gif(
    frames: list[str],
    out_path: str,
    captions: list[str] | None = None,
    duration_ms: int = 700,
) -> str:
    """Animate PNG files into a GIF that loops forever; one GIF frame per PNG.

    Frames of different sizes are centred on a white canvas of the largest width and height;
    with ``captions`` a strip of ``CAPTION_HEIGHT`` pixels above each frame holds its caption.
    Returns ``out_path``.
    """
    from PIL import Image, ImageDraw, ImageFont

    if not frames:
        raise ValueError("make_gif needs at least one frame")
    if captions is not None and len(captions) != len(frames):
        raise ValueError(f"{len(captions)} captions for {len(frames)} frames")
    images = []
    for path in frames:
        with Image.open(path) as im:
            images.append(im.convert("RGB"))
    width = max(im.width for im in images)
    height = max(im.height for im in images)
    strip = CAPTION_HEIGHT if captions is not None else 0
    try:
        font: Any = ImageFont.load_default(size=CAPTION_HEIGHT * 3 // 5)
    except TypeError:  # Pillow < 10.1 has only the small bitmap font
        font = ImageFont.load_default()
    canvases = []
    for k, frame in enumerate(images):
        canvas = Image.new("RGB", (width, height + strip), "white")
        canvas.paste(frame, ((width - frame.width) // 2, strip + (height - frame.height) // 2))
        if captions is not None:
            draw = ImageDraw.Draw(canvas)
            top = draw.textbbox((0, 0), captions[k], font=font)
            y = (strip - (top[3] - top[1])) // 2 - top[1]
            draw.text((10, y), captions[k], fill="black", font=font)
        canvases.append(canvas)

    # One palette for all frames, from a small mosaic of them: quantizing each frame on its own
    # (what Pillow does with RGB frames) costs ~20 ms a frame and a GIF is rewritten each epoch.
    step = max(1, int((len(canvases) * width * (height + strip) / 2**20) ** 0.5))
    thumbs = [c.reduce(step) for c in canvases]
    mosaic = Image.new("RGB", (thumbs[0].width, sum(t.height for t in thumbs)), "white")
    for k, t in enumerate(thumbs):
        mosaic.paste(t, (0, k * thumbs[0].height))
    palette = mosaic.quantize(256, method=Image.Quantize.MEDIANCUT)
    # Median cut averages the background with the anti-aliasing greys (off-white 252): snap the
    # entries near white and black to them, so the background and the text stay exact.
    colors = palette.getpalette() or []
    rgb = [colors[i : i + 3] for i in range(0, len(colors), 3)]
    rgb = [[255] * 3 if min(c) >= 248 else [0] * 3 if max(c) <= 7 else c for c in rgb]
    palette.putpalette([v for c in rgb for v in c])
    indexed = [c.quantize(palette=palette, dither=Image.Dither.NONE) for c in canvases]

    def save(path: str) -> None:
        indexed[0].save(
            path,
            format="GIF",
            save_all=True,
            append_images=indexed[1:],
            duration=duration_ms,
            loop=0,
        )

    return atomic_write(out_path, save)


def update_cell_gifs(plots_dir: str) -> list[str]:
    """(Re)write ``plots_dir/normal.gif`` and ``reduce.gif`` from the per-epoch cell plots
    ``epoch_XXX-normal.png`` / ``epoch_XXX-reduce.png`` (as search.py names them), in epoch
    order, captioned "Epoch N". Returns the paths written (none when there are no frames)."""
    found: dict[str, list[tuple[int, str]]] = {"normal": [], "reduce": []}
    if os.path.isdir(plots_dir):
        for name in os.listdir(plots_dir):
            m = _CELL_FRAME.fullmatch(name)
            if m:
                found[m.group(2)].append((int(m.group(1)), os.path.join(plots_dir, name)))
    written = []
    for kind, items in found.items():
        if items:
            items.sort()
            written.append(
                make_gif(
                    [path for _, path in items],
                    os.path.join(plots_dir, f"{kind}.gif"),
                    captions=[f"Epoch {epoch}" for epoch, _ in items],
                )
            )
    return written


# --------------------------------------------------------------------------------------------
# Alphas
# --------------------------------------------------------------------------------------------
AlphaList = Sequence[torch.Tensor] | Sequence[Sequence[Sequence[float]]]


def edge_labels(n_nodes: int) -> list[str]:
    """Row labels of the alphas of a cell with ``n_nodes`` intermediate nodes, in the order of
    genotypes.py's schema: node ``i`` (index ``2 + i``) takes inputs ``0 .. i + 1``, so
    ``["2<-0", "2<-1", "3<-0", "3<-1", "3<-2", ...]`` (14 edges for DARTS' 4 nodes)."""
    return [
        f"{gt.N_INPUT_NODES + i}<-{j}" for i in range(n_nodes) for j in range(gt.N_INPUT_NODES + i)
    ]


def _edge_matrix(alphas: AlphaList, n_ops: int, softmax: bool) -> torch.Tensor:
    """Stack the per-node alphas into one (n_edges, n_ops) matrix, checking the schema."""
    rows = []
    for i, a in enumerate(alphas):
        t = torch.as_tensor(a, dtype=torch.float32).detach().cpu()  # (2 + i, n_ops)
        if t.dim() != 2 or t.shape != (gt.N_INPUT_NODES + i, n_ops):
            raise ValueError(
                f"alphas of node {gt.N_INPUT_NODES + i} have shape {tuple(t.shape)}, "
                f"expected ({gt.N_INPUT_NODES + i}, {n_ops})"
            )
        rows.append(F.softmax(t, dim=-1) if softmax else t)
    if not rows:
        raise ValueError("no alphas: a cell needs at least one node")
    return torch.cat(rows)


def heatmap_figure(
    alphas: AlphaList,
    primitives: Sequence[str],
    title: str,
    softmax: bool = False,
    annotate: bool = True,
) -> Figure:
    """The alphas of one cell type as a heatmap: one row per edge ("3<-1": node 3 from input 1),
    one column per op. ``alphas[i]`` has shape (2 + i, n_ops), as
    ``SearchCNNController.softmax_alphas()`` and alphas.jsonl give them (already softmaxed);
    pass ``softmax=True`` for raw alphas. Returns a matplotlib figure."""
    from matplotlib.figure import Figure

    w = _edge_matrix(alphas, len(primitives), softmax).numpy()
    labels = edge_labels(len(alphas))
    fig = Figure(figsize=(1.0 + 0.8 * len(primitives), 1.6 + 0.32 * len(labels)), dpi=100)
    ax = fig.add_subplot()
    im = ax.imshow(w, cmap="viridis", aspect="auto", vmin=0.0, vmax=max(float(w.max()), 1e-6))
    ax.set_xticks(range(len(primitives)), list(primitives), rotation=45, ha="right")
    ax.set_yticks(range(len(labels)), labels)
    ax.set_xlabel("operation")
    ax.set_ylabel("edge (node <- input)")
    ax.set_title(title)
    if annotate:
        threshold = 0.6 * float(w.max())
        for r in range(w.shape[0]):
            for c in range(w.shape[1]):
                ax.text(
                    c,
                    r,
                    f"{w[r, c]:.2f}",
                    ha="center",
                    va="center",
                    fontsize=7,
                    color="black" if w[r, c] > threshold else "white",
                )
    fig.colorbar(im, ax=ax, label="softmax weight")
    fig.tight_layout()
    return fig


def _save_figure(fig: Figure, out_path: str) -> str:
    try:
        return atomic_write(out_path, lambda p: fig.savefig(p, format="png"))
    finally:
        fig.clear()  # drop the artists now rather than at garbage collection


def plot_alpha_heatmap(
    alphas: AlphaList,
    primitives: Sequence[str],
    title: str,
    out_path: str,
    softmax: bool = False,
) -> str:
    """Write :func:`heatmap_figure` to the PNG ``out_path``; returns ``out_path``."""
    return _save_figure(heatmap_figure(alphas, primitives, title, softmax), out_path)


def read_png(path: str | BinaryIO) -> Any:
    """The pixels of the PNG ``path`` (a file name or a binary file) as an (H, W, 3) uint8
    array (e.g. for tensorboard's ``add_image(..., dataformats="HWC")``: the image already
    drawn, not drawn again)."""
    import numpy as np
    from PIL import Image

    with Image.open(path) as img:
        return np.asarray(img.convert("RGB"))


def op_weight_totals(history: Sequence[dict], kind: str) -> tuple[list[int], torch.Tensor]:
    """Epochs and the (n_epochs, n_ops) total softmax weight of each op summed over all edges
    of the ``kind`` cell, from alphas.jsonl rows ``{"epoch": e, "normal": ..., "reduce": ...}``.
    With several rows for one epoch (a resumed run appends again) the last wins.
    """
    by_epoch: dict[int, torch.Tensor] = {}
    for k, row in enumerate(history):
        if kind in row:
            edges = torch.cat([torch.as_tensor(a, dtype=torch.float32) for a in row[kind]])
            by_epoch[int(row.get("epoch", k + 1))] = edges.sum(0)  # (n_edges, n_ops) -> (n_ops,)
    epochs = sorted(by_epoch)
    totals = torch.stack([by_epoch[e] for e in epochs]) if epochs else torch.empty(0, 0)
    return epochs, totals


def plot_op_weights(history: Sequence[dict], primitives: Sequence[str], out_path: str) -> str:
    """Total softmax weight of each op over all edges against the epoch, one subplot per cell
    type, from the alphas.jsonl rows (see :func:`op_weight_totals`). Returns ``out_path``."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(11, 4.2), dpi=100)
    axes = fig.subplots(1, 2, sharey=True)
    for ax, kind in zip(axes, ("normal", "reduce")):
        epochs, totals = op_weight_totals(history, kind)
        if totals.numel() and totals.shape[1] != len(primitives):
            raise ValueError(
                f"{kind} alphas have {totals.shape[1]} ops, but {len(primitives)} primitives"
            )
        for c, op in enumerate(primitives):
            if totals.numel():
                ax.plot(
                    epochs,
                    totals[:, c].tolist(),
                    marker="." if len(epochs) < 20 else None,
                    label=op,
                )
        ax.set_title(f"{kind} cell")
        ax.set_xlabel("epoch")
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("softmax weight summed over edges")
    handles, labels = axes[0].get_legend_handles_labels()
    if handles:
        fig.legend(handles, labels, loc="center right", fontsize=8)
    fig.tight_layout(rect=(0, 0, 0.84, 1))
    return _save_figure(fig, out_path)


# --------------------------------------------------------------------------------------------
# Metrics and curves
# --------------------------------------------------------------------------------------------
def _by_epoch(rows: Sequence[dict[str, Any]]) -> dict[int, dict[str, Any]]:
    """Metrics rows by epoch; with several rows for one epoch (a resumed run) the last wins."""
    by_epoch: dict[int, dict[str, Any]] = {}
    for k, row in enumerate(rows):
        by_epoch[int(row.get("epoch", k + 1))] = dict(row)
    return by_epoch


def _number(row: dict[str, Any], key: str) -> bool:
    return isinstance(row.get(key), (int, float)) and not isinstance(row.get(key), bool)


def plot_skip_counts(rows: Sequence[dict[str, Any]], out_path: str) -> str | None:
    """The skip-connect count of each epoch's normal and reduce genotypes (metrics keys
    ``normal_skip`` / ``reduce_skip``) against the epoch: the collapse of DARTS shows as the
    normal cell filling with skips. None (nothing drawn) when no row holds the counts."""
    from matplotlib.figure import Figure
    from matplotlib.ticker import MaxNLocator

    by_epoch = _by_epoch(rows)
    fig = Figure(figsize=(6, 4), dpi=100)
    ax = fig.subplots()
    drawn = False
    for kind in ("normal", "reduce"):
        points = [
            (e, int(r[f"{kind}_skip"]))
            for e, r in sorted(by_epoch.items())
            if _number(r, f"{kind}_skip")
        ]
        if points:
            xs, ys = zip(*points)
            ax.plot(xs, ys, marker="." if len(xs) < 30 else None, drawstyle="steps-mid", label=kind)
            drawn = True
    if not drawn:
        return None
    ax.set_xlabel("epoch")
    ax.set_ylabel("skip-connects in the derived cell")
    ax.yaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_ylim(bottom=0)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    return _save_figure(fig, out_path)


def plot_curves(rows: Sequence[dict[str, Any]], out_path: str, held_out: str) -> str:
    """Loss and top-1 (a fraction in [0, 1]) against the epoch for the training split and the
    ``held_out`` one ("val": search's selection split, "test": augment), from metrics rows.
    Missing keys are skipped; with several rows for one epoch (a resumed run) the last wins.
    Returns ``out_path``."""
    from matplotlib.figure import Figure
    from matplotlib.ticker import PercentFormatter

    by_epoch = _by_epoch(rows)
    epochs = sorted(by_epoch)
    # A third axis for the dominant Hessian eigenvalue (search --hessian_eigen), when measured.
    eigen = [
        (e, float(by_epoch[e]["hessian_eigen"]))
        for e in epochs
        if _number(by_epoch[e], "hessian_eigen")
    ]
    fig = Figure(figsize=(15 if eigen else 10, 4), dpi=100)
    axes = fig.subplots(1, 3 if eigen else 2)
    if eigen:
        ax = axes[2]
        xs, ys = zip(*eigen)
        ax.plot(xs, ys, marker="." if len(xs) < 30 else None, color="tab:red")
        ax.set_xlabel("epoch")
        ax.set_title("dominant eigenvalue of the alpha Hessian")
        ax.grid(alpha=0.3)
    for ax, metric in zip(axes, ("loss", "top1")):
        for split in ("train", held_out):
            key = f"{split}_{metric}"
            points = [
                (e, float(by_epoch[e][key]))
                for e in epochs
                if isinstance(by_epoch[e].get(key), (int, float))
            ]
            if points:
                xs, ys = zip(*points)
                ax.plot(xs, ys, marker="." if len(xs) < 30 else None, label=split)
        ax.set_xlabel("epoch")
        ax.set_title("top-1 accuracy" if metric == "top1" else "loss")
        if metric == "top1":
            ax.yaxis.set_major_formatter(PercentFormatter(1.0))
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend()
    fig.tight_layout()
    return _save_figure(fig, out_path)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        description="Draw the cells of a genotype with graphviz.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("genotype", help="genotype string, published name or genotype file")
    p.add_argument("--out", default=".", help="output folder")
    args = p.parse_args(argv)
    try:
        genotype = gt.load(args.genotype)
    except gt.GenotypeError as e:
        print(f"visualize.py: error: {e}", file=sys.stderr)
        return 2
    if not dot_available():
        print(
            "visualize.py: error: graphviz's `dot` is not installed "
            "(Debian/Ubuntu: apt-get install graphviz; macOS: brew install graphviz)",
            file=sys.stderr,
        )
        return 2
    try:
        for path in plot_genotype(genotype, args.out):
            print(path)
    except OSError as e:
        print(f"visualize.py: error: cannot write to {args.out}: {e.strerror}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
