"""The DARTS supernet (paper, section 2.1-2.2) and its controller.

``SearchCell``: the cell whose every edge is a :class:`models.ops.MixedOp` (eq. 2).
``SearchCNN`` holds the weights w: stem, cells and classifier, laid out by models/macro.py
as the evaluated network is. ``SearchCNNController`` adds the architecture parameters alpha
and is what the search scripts and the Architect talk to.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import cast

import torch
import torch.nn as nn
import torch.nn.functional as F

import genotypes as gt
from models.kernels import dense_grad
from models.macro import Cell, cell_shapes, stem
from models.ops import EdgeInput, MixedOp


class SearchCell(Cell):
    """A cell of MixedOp edges. Node i (0-based, intermediate) takes every earlier node."""

    def __init__(
        self, n_nodes: int, C_pp: int, C_p: int, C: int, reduction_p: bool, reduction: bool
    ) -> None:
        super().__init__(C_pp, C_p, C, reduction_p, reduction, affine=False)
        self.dag = nn.ModuleList(
            nn.ModuleList(MixedOp(C, self.stride(j)) for j in range(gt.N_INPUT_NODES + i))
            for i in range(n_nodes)
        )

    def forward(
        self, s0: torch.Tensor, s1: torch.Tensor, w_dag: list[torch.Tensor]
    ) -> torch.Tensor:
        """s0, s1: outputs of cells k-2, k-1; w_dag[i]: (2 + i, n_ops) softmax weights of
        node i's edges. Returns (N, n_nodes * C, H', W')."""
        # One EdgeInput per node, (N, C, H', W'): the edges leaving it share its relu and the
        # pixel phases of that relu, computed once per node instead of once per edge and op.
        states = [EdgeInput(s) for s in self.preprocess(s0, s1)]
        for edges, w_edges in zip(cast(list[nn.ModuleList], self.dag), w_dag):
            node: torch.Tensor | None = None
            for edge, x, w in zip(edges, states, w_edges):
                h = edge(x, w)
                # In place (no backward formula needs the running sum): the same values as
                # sum(h_j), without a new tensor per edge.
                node = h if node is None else node.add_(h)
            assert node is not None
            # dense_grad: node i is read by later edges and its gradient comes back as a
            # channel slice of the cell output's (kernels._DenseGrad says why that matters).
            states.append(EdgeInput(dense_grad(node)))
        return torch.cat([s.x for s in states[gt.N_INPUT_NODES :]], dim=1)


class SearchCNN(nn.Module):
    """Stem - n_layers cells - global average pooling - linear. Weights only, no alphas."""

    def __init__(
        self,
        C_in: int,
        C: int,
        n_classes: int,
        n_layers: int,
        n_nodes: int = 4,
        stem_multiplier: int = 3,
    ) -> None:
        super().__init__()
        C_stem = stem_multiplier * C
        self.stem = stem(C_in, C_stem)  # its BN is the only affine BN of the supernet
        shapes = cell_shapes(n_layers, C_stem, C, (n_nodes, n_nodes))
        self.cells = nn.ModuleList(
            SearchCell(n_nodes, s.C_pp, s.C_p, s.C, s.reduction_p, s.reduction) for s in shapes
        )
        self.gap = nn.AdaptiveAvgPool2d(1)
        self.linear = nn.Linear(shapes[-1].C_out, n_classes)

    def forward(
        self,
        x: torch.Tensor,
        weights_normal: list[torch.Tensor],
        weights_reduce: list[torch.Tensor],
    ) -> torch.Tensor:
        """x: (N, C_in, H, W) -> logits (N, n_classes)."""
        s0 = s1 = self.stem(x)
        for cell in self.cells:
            weights = weights_reduce if cell.reduction else weights_normal
            s0, s1 = s1, cell(s0, s1, weights)
        return self.linear(self.gap(s1).flatten(1))


class SearchCNNController(nn.Module):
    """Supernet plus architecture parameters: the one object search.py and Architect use.

    Every parameter is either a weight (``weights()``: those of ``self.net``) or an alpha
    (``alphas()``: ``alpha_normal.i`` / ``alpha_reduce.i``, one (2 + i, n_ops) tensor per node).
    """

    def __init__(
        self,
        C_in: int,
        C: int,
        n_classes: int,
        n_layers: int,
        criterion: nn.Module,
        n_nodes: int = 4,
        stem_multiplier: int = 3,
    ) -> None:
        super().__init__()
        self.n_nodes = n_nodes
        self.criterion = criterion
        n_ops = len(gt.PRIMITIVES)
        # alpha init 1e-3 * N(0, 1) (paper's code release).
        self.alpha_normal = nn.ParameterList(
            nn.Parameter(1e-3 * torch.randn(gt.N_INPUT_NODES + i, n_ops)) for i in range(n_nodes)
        )
        self.alpha_reduce = nn.ParameterList(
            nn.Parameter(1e-3 * torch.randn(gt.N_INPUT_NODES + i, n_ops)) for i in range(n_nodes)
        )
        self.net = SearchCNN(C_in, C, n_classes, n_layers, n_nodes, stem_multiplier)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weights_normal = [F.softmax(a, dim=-1) for a in self.alpha_normal]
        weights_reduce = [F.softmax(a, dim=-1) for a in self.alpha_reduce]
        return self.net(x, weights_normal, weights_reduce)

    def loss(self, X: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return self.criterion(self(X), y)

    def genotype(self) -> gt.Genotype:
        concat = range(gt.N_INPUT_NODES, gt.N_INPUT_NODES + self.n_nodes)
        return gt.Genotype(
            normal=gt.parse(self.alpha_normal, k=2),
            normal_concat=concat,
            reduce=gt.parse(self.alpha_reduce, k=2),
            reduce_concat=concat,
        )

    def weights(self) -> Iterator[nn.Parameter]:
        return self.net.parameters()

    def named_weights(self) -> Iterator[tuple[str, nn.Parameter]]:
        return self.net.named_parameters(prefix="net")

    def alphas(self) -> Iterator[nn.Parameter]:
        for _, p in self.named_alphas():
            yield p

    def named_alphas(self) -> Iterator[tuple[str, nn.Parameter]]:
        for n, p in self.named_parameters():
            if "alpha" in n:
                yield n, p

    @contextlib.contextmanager
    def alphas_frozen(self) -> Iterator[None]:
        """Within the block the alphas take no gradient (the weight step needs none)."""
        alphas = list(self.alphas())
        for a in alphas:
            a.requires_grad_(False)
        try:
            yield
        finally:
            for a in alphas:
                a.requires_grad_(True)

    def softmax_alphas(self) -> dict[str, list[torch.Tensor]]:
        """The mixing weights, per cell type: {'normal': [(2 + i, n_ops)], 'reduce': [...]}."""
        return {
            "normal": [F.softmax(a.detach(), dim=-1).cpu() for a in self.alpha_normal],
            "reduce": [F.softmax(a.detach(), dim=-1).cpu() for a in self.alpha_reduce],
        }
