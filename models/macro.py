"""The macro-structure the supernet and the evaluated network share (paper, section 2.1;
DARTS.md, sections 1-2).

stem -> n_layers cells -> global average pooling -> linear. Cell k reads the outputs of cells
k-2 and k-1 (the stem's output for the first cells) and outputs the concatenation of its
intermediate nodes. The reduction cells sit at 1/3 and 2/3 of the depth: they double the
channels and halve H and W. Only what happens inside a cell differs between the two networks
(models/search_cnn.py: mixed edges; models/augment_cnn.py: the genotype's ops).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn

import genotypes as gt
from models.kernels import BatchNorm2d
from models.ops import FactorizedReduce, StdConv


def reduction_layers(n_layers: int) -> tuple[int, int]:
    """Indices of the two reduction cells: at 1/3 and 2/3 of the depth."""
    return n_layers // 3, 2 * n_layers // 3


def stem(C_in: int, C_stem: int) -> nn.Sequential:
    """3x3 conv, then BN (affine in both networks): (N, C_in, H, W) -> (N, C_stem, H, W)."""
    return nn.Sequential(nn.Conv2d(C_in, C_stem, 3, 1, 1, bias=False), BatchNorm2d(C_stem))


@dataclass(frozen=True)
class CellShape:
    """Where cell ``index`` sits: it reads cells k-2 and k-1 (``C_pp``, ``C_p`` channels),
    works at ``C`` channels per node and outputs ``C_out`` = C * (nodes it concatenates)."""

    index: int
    C_pp: int
    C_p: int
    C: int
    C_out: int
    reduction_p: bool  # the previous cell reduced: s0 is twice as large as s1
    reduction: bool


def cell_shapes(
    n_layers: int,
    C_stem: int,
    C: int,
    n_concat: tuple[int, int],
    stem_reduces: bool = False,
) -> list[CellShape]:
    """The channel bookkeeping of the ``n_layers`` cells after a stem of ``C_stem`` channels.

    ``C`` is the channels per node of the first cells, doubled at each reduction cell;
    ``n_concat``: how many nodes a (normal, reduction) cell concatenates into its output.
    ``stem_reduces``: the first cell's s0 is twice as large as its s1, as after a reduction
    cell (the ImageNet network: s0 is stem0's output, s1 stem1's), so it reads s0 through
    FactorizedReduce.
    """
    if n_layers < 1:
        raise ValueError(f"a network needs at least one cell, got n_layers={n_layers}")
    shapes = []
    C_pp, C_p, C_cur = C_stem, C_stem, C
    reduction_p = stem_reduces
    for i in range(n_layers):
        reduction = i in reduction_layers(n_layers)
        if reduction:
            C_cur *= 2
        C_out = C_cur * (n_concat[1] if reduction else n_concat[0])
        shapes.append(CellShape(i, C_pp, C_p, C_cur, C_out, reduction_p, reduction))
        reduction_p = reduction
        C_pp, C_p = C_p, C_out
    return shapes


class Cell(nn.Module):
    """What every cell of both networks does with its two inputs before its DAG.

    s0 (output of cell k-2) and s1 (of cell k-1) become the input nodes 0 and 1, both
    (N, C, H, W): s1 by ReLU-conv1x1-BN, s0 likewise, unless the previous cell reduced, in
    which case s0 is twice as large and FactorizedReduce halves it. ``affine``: the BNs'
    affine parameters (the supernet has none).
    """

    def __init__(
        self, C_pp: int, C_p: int, C: int, reduction_p: bool, reduction: bool, affine: bool
    ) -> None:
        super().__init__()
        self.reduction = reduction
        self.preproc0 = (
            FactorizedReduce(C_pp, C, affine=affine)
            if reduction_p
            else StdConv(C_pp, C, 1, 1, 0, affine=affine)
        )
        self.preproc1 = StdConv(C_p, C, 1, 1, 0, affine=affine)

    def preprocess(self, s0: torch.Tensor, s1: torch.Tensor) -> list[torch.Tensor]:
        """(N, C_pp, H or 2H, W or 2W), (N, C_p, H, W) -> [node 0, node 1], 2 x (N, C, H, W)."""
        return [self.preproc0(s0), self.preproc1(s1)]

    def stride(self, src: int) -> int:
        """The stride of an edge leaving node ``src``: 2 from an input node of a reduction cell."""
        return 2 if self.reduction and src < gt.N_INPUT_NODES else 1
