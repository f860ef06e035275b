"""The discrete network of the augment stage (DARTS.md, section 2).

The searched cell (a :class:`genotypes.Genotype`) is repeated ``n_layers`` times with the
supernet's macro-structure: stem, normal cells, reduction cells at 1/3 and 2/3 depth
(models/macro.py, shared with the supernet), global average pooling and a linear classifier.
Unlike the supernet every BN is affine, and a pooling op is the bare pooling layer (no BN after
it): that is the network whose size the paper reports. Training adds drop path on every
non-identity op and an auxiliary head after the second reduction cell.

Here: :func:`drop_path`, :class:`AugmentCell` (the genotype's ops on the shared cell inputs),
:class:`AuxiliaryHead` and :class:`AugmentCNN`.
"""

from __future__ import annotations

from typing import cast

import torch
import torch.nn as nn

import genotypes as gt
from models.kernels import BatchNorm2d
from models.macro import Cell, cell_shapes, reduction_layers, stem
from models.ops import OPS, EdgeInput, Op


def drop_path(x: torch.Tensor, p: float) -> torch.Tensor:
    """Zero whole samples of ``x`` with probability ``p``, scale the kept ones by 1/(1-p).

    x: (N, ...) -> same shape. The expectation is unchanged. The mask is made on ``x``'s device
    and dtype (``x.new_empty``), so it runs on the CPU and any GPU alike; out of place, so the
    op's output can still be needed by autograd.
    """
    if p <= 0.0:
        return x
    keep = 1.0 - p
    mask = x.new_empty((x.size(0),) + (1,) * (x.dim() - 1)).bernoulli_(keep)  # (N, 1, 1, 1)
    return x * mask.div_(keep)  # one pass over x: the (N, 1, 1, 1) mask carries the 1/(1-p)


class AugmentCell(Cell):
    """One discrete cell. Node indexing and the genotype schema are those of genotypes.py.

    ``nodes[i]`` lists the (op, input) pairs of intermediate node 2 + i; the node is the sum of
    its ops' outputs. The cell outputs the channel-wise concatenation of the nodes in
    ``concat``: (N, len(concat) * C, H', W'), with H' = ceil(H/2) in a reduction cell.
    """

    def __init__(
        self,
        nodes: list[list[tuple[str, int]]],
        concat: list[int],
        C_pp: int,
        C_p: int,
        C: int,
        reduction_p: bool,
        reduction: bool,
    ) -> None:
        super().__init__(C_pp, C_p, C, reduction_p, reduction, affine=True)
        self.concat = list(concat)
        self.drop_prob = 0.0
        self.dag = nn.ModuleList(
            nn.ModuleList(OPS[op](C, self.stride(src), True) for op, src in node) for node in nodes
        )
        self.inputs: list[list[int]] = [[src for _, src in node] for node in nodes]

    def forward(self, s0: torch.Tensor, s1: torch.Tensor) -> torch.Tensor:
        """s0, s1: outputs of cells k-2 and k-1 (their sizes match after preprocessing)."""
        # One EdgeInput per node (2 + i of them, each (N, C, H', W')): the ops reading it share
        # its relu (separable and dilated convs, FactorizedReduce begin with one), computed and
        # kept for backward once instead of once per op.
        states = [EdgeInput(s) for s in self.preprocess(s0, s1)]
        drop = self.drop_prob if self.training else 0.0
        for ops, inputs in zip(self.dag, self.inputs, strict=True):
            node: torch.Tensor | None = None
            for op, src in zip(cast(list[Op], ops), inputs, strict=True):
                h = op.weighted(states[src])
                if drop > 0.0 and not isinstance(op, nn.Identity):
                    h = drop_path(h, drop)  # DARTS.md section 2: every op but the identity
                node = h if node is None else node + h
            assert node is not None  # genotypes.validate rejects a node without inputs
            states.append(EdgeInput(node))
        return torch.cat([states[i].x for i in self.concat], dim=1)


def _paper_pool_fits(spatial: int) -> bool:
    """True when AvgPool2d(5, stride=3) maps ``spatial`` to exactly 2x2 (8 <= spatial <= 10)."""
    return spatial >= 5 and (spatial - 5) // 3 + 1 == 2


class AuxiliaryHead(nn.Module):
    """Auxiliary classifier on the output of the second reduction cell (DARTS.md, section 2).

    ReLU, 5x5 avg-pool stride 3, 1x1 conv to 128, BN, ReLU, 2x2 conv to 768, BN, ReLU, linear.
    On CIFAR-10 it sees 8x8 and the pool gives 2x2: the paper's layers exactly. Where the
    paper's pool does not give 2x2 (MNIST: 7x7 -> 1x1, too small for the 2x2 conv; 8x8 digits:
    2x2, too small for the pool; larger inputs: more than 2x2, too large for the linear), the
    pool is an adaptive average pool to 2x2 instead, so every other layer and the parameter
    count stay those of the paper. ``spatial`` is the side of the feature map it receives.
    """

    def __init__(self, spatial: int, C: int, n_classes: int) -> None:
        super().__init__()
        self.spatial = spatial
        pool: nn.Module = (
            nn.AvgPool2d(5, stride=3, padding=0, count_include_pad=False)
            if _paper_pool_fits(spatial)
            else nn.AdaptiveAvgPool2d(2)
        )
        self.features = nn.Sequential(
            nn.ReLU(inplace=False),
            pool,  # (N, C, s, s) -> (N, C, 2, 2)
            nn.Conv2d(C, 128, 1, bias=False),
            BatchNorm2d(128),
            nn.ReLU(),
            nn.Conv2d(128, 768, 2, bias=False),  # (N, 128, 2, 2) -> (N, 768, 1, 1)
            BatchNorm2d(768),
            nn.ReLU(),
        )
        self.linear = nn.Linear(768, n_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: (N, C, s, s) -> logits (N, n_classes)."""
        return self.linear(self.features(x).flatten(1))


class AugmentCNN(nn.Module):
    """Stem - n_layers cells of a genotype - global average pooling - linear (+ auxiliary head).

    ``forward`` returns ``(logits, aux_logits)``; ``aux_logits`` is None in eval mode or when
    ``auxiliary`` is False. The auxiliary head's parameters live under ``aux_head`` so that
    ``utils.count_parameters(model, exclude="aux_head")`` gives the size the paper reports.
    Cells may have any number of nodes and any concat; normal and reduction cells may differ:
    a cell outputs ``C_cell * len(concat)`` channels.
    """

    def __init__(
        self,
        input_size: int,
        C_in: int,
        C: int,
        n_classes: int,
        n_layers: int,
        auxiliary: bool,
        genotype: gt.Genotype,
        stem_multiplier: int = 3,
    ) -> None:
        super().__init__()
        genotype = gt.validate(genotype)  # canonical form; GenotypeError if malformed
        self.genotype = genotype
        self.n_layers = n_layers
        self.reductions = reduction_layers(n_layers)
        # The head sits after the cell at 2/3 depth, i.e. after the second reduction cell.
        self.aux_pos = self.reductions[1]

        C_stem = stem_multiplier * C
        self.stem = stem(C_in, C_stem)  # (N, C_in, H, W) -> (N, 3C, H, W)
        n_concat = (len(genotype.normal_concat), len(genotype.reduce_concat))
        shapes = cell_shapes(n_layers, C_stem, C, n_concat)
        self.cells = nn.ModuleList()
        spatial = input_size
        aux_spatial, aux_channels = spatial, C_stem
        for s in shapes:
            if s.reduction:
                spatial = (spatial + 1) // 2  # every stride-2 op and FactorizedReduce: ceil
            nodes = genotype.reduce if s.reduction else genotype.normal
            concat = list(genotype.reduce_concat if s.reduction else genotype.normal_concat)
            self.cells.append(
                AugmentCell(nodes, concat, s.C_pp, s.C_p, s.C, s.reduction_p, s.reduction)
            )
            if s.index == self.aux_pos:
                aux_spatial, aux_channels = spatial, s.C_out

        self.aux_head = AuxiliaryHead(aux_spatial, aux_channels, n_classes) if auxiliary else None
        self.gap = nn.AdaptiveAvgPool2d(1)
        self.linear = nn.Linear(shapes[-1].C_out, n_classes)

    def drop_path_prob(self, p: float) -> None:
        """Set the drop-path probability of every cell (used in training mode only)."""
        if not 0.0 <= p < 1.0:
            raise ValueError(f"drop-path probability must be in [0, 1), got {p}")
        for cell in self.cells:
            cell.drop_prob = float(p)  # type: ignore[assignment]

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """x: (N, C_in, H, W) -> (logits (N, n_classes), aux_logits (N, n_classes) or None)."""
        s0 = s1 = self.stem(x)
        aux_logits = None
        for i, cell in enumerate(self.cells):
            s0, s1 = s1, cell(s0, s1)
            if i == self.aux_pos and self.aux_head is not None and self.training:
                aux_logits = self.aux_head(s1)
        logits = self.linear(self.gap(s1).flatten(1))
        return logits, aux_logits
