"""Draw cells with graphviz.

    python visualize.py DARTS_V2 --out plots/
    python visualize.py "Genotype(normal=[[...]], ...)"
    python visualize.py searchs/demo/genotype.txt

writes ``normal.png``/``reduce.png`` and their graphviz sources (``normal``/``reduce``).
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys

import genotypes as gt

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
    names = inputs + [str(i) for i in range(n_nodes)]
    for i in range(n_nodes):
        g.node(str(i), fillcolor=NODE_COLORS["node"])
    for i, edges in enumerate(cell):
        for op, j in edges:
            g.edge(names[j], str(i), label=op, fillcolor="gray")
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
