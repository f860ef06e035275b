"""The DARTS supernet (paper, section 2.1-2.2) and its controller.

``SearchCell``: the cell whose every edge is the mixed operation of eq. 2,
``o_bar(x_j) = sum_o softmax(alpha_(i,j))_o * o(x_j)``, and whose node i is the sum of its
edges (eq. 1), ``x_i = sum_(j<i) o_bar_(i,j)(x_j)``. It computes the edges leaving the same
node together (:class:`EdgeGroup`): one batched call per op kind where the textbook form makes
one per edge, with the edges' weights stored stacked. :meth:`SearchCell.forward_per_edge`
is the textbook form on the same parameters, kept as the reference the tests compare with.
``SearchCNN`` holds the weights w: stem, cells and classifier, laid out by models/macro.py as
the evaluated network is. ``SearchCNNController`` adds the architecture parameters alpha and is
what the search scripts and the Architect talk to.
"""

from __future__ import annotations

import contextlib
import re
from collections.abc import Iterator, Mapping
from typing import Any, cast

import torch
import torch.nn as nn
import torch.nn.functional as F

import genotypes as gt
from models.kernels import (
    BatchNorm2d,
    batches_counted,
    depthwise_conv2d,
    from_phases,
    phases_apply,
    scaled_batch_norm,
    to_phases,
)
from models.macro import Cell, cell_shapes, stem

# The conv ops, in the order of their blocks in the stacked tensors, with the (kernel,
# dilation) of their (first) depthwise conv. The sep convs come first: only they have a second
# ReLU-conv-conv-BN block.
CONV_OPS = ("sep_conv_3x3", "sep_conv_5x5", "dil_conv_3x3", "dil_conv_5x5")
SEP_OPS = CONV_OPS[:2]
_DEPTHWISE = {"sep_conv_3x3": (3, 1), "sep_conv_5x5": (5, 1), "dil_conv_3x3": (3, 2)}
_DEPTHWISE["dil_conv_5x5"] = (5, 2)
_OP = {name: i for i, name in enumerate(gt.PRIMITIVES)}  # an op's column of the alphas
# The parameter-free ops whose output is the same tensor for every edge leaving a node: the
# pools (each followed by a non-affine BN) and, at stride 1, skip_connect (identity).
_POOLS = ("max_pool_3x3", "avg_pool_3x3")
assert [_OP[o] for o in (*_POOLS, "skip_connect", *CONV_OPS)] == list(range(7))


class EdgeGroup(nn.Module):
    """The edges leaving the source nodes of one group, computed together.

    A group is one node of a cell or, for the two input nodes (available together), both. Each
    of its S sources feeds the same k target nodes; edge e = s * k + t goes from source s to the
    group's t-th target. With C channels per node and E = S * k edges, the weights of the
    paper's per-edge ops are stored stacked along dim 0, edge after edge (SearchCell.edge_slices
    names every slice):

    - ``dw[o]`` (E C, 1, k_o, k_o), o over CONV_OPS: rows [e C, (e + 1) C) are the depthwise
      conv of edge e's op o (for a sep conv, of its first ReLU-conv-conv-BN block);
    - ``pw`` (4 E C, C, 1, 1): rows [(o E + e) C, (o E + e + 1) C), the pointwise conv after it;
    - ``dw2[o]``, ``pw2`` (o over SEP_OPS): the same for the sep convs' second block;
    - ``fr`` (E C, C, 1, 1), stride 2 only: rows [e C, e C + C/2) and [e C + C/2, (e + 1) C) are
      conv1 and conv2 of edge e's skip_connect (FactorizedReduce);
    - ``bn``: the non-affine BNs over pw's 4 E C channels, then fr's E C, then the pools'
      2 S C (max then avg, source after source: shared by the k edges of a source);
      ``bn2``: the sep convs' second BNs, over pw2's 2 E C channels.

    BN normalises each channel on its own, so one BN over stacked channels computes every
    per-edge BN at once; a grouped conv computes every edge's conv at once.

    The stacked calls of :meth:`forward`, and what each computes of the paper (section 2.1):

    1. ``relu(x)``, once per source: the ReLU that every conv op and FactorizedReduce of every
       edge leaving it begins with;
    2. per conv op kind, one depthwise conv over the E edges' copies of their source's ReLU,
       then one grouped pointwise conv for all 4 kinds and E edges: the (first) ReLU-conv-conv
       of o(x_j) for o in CONV_OPS, every edge (i, j) of the group;
    3. stride 2: one grouped 1x1 conv, FactorizedReduce's two convs on every edge;
    4. max and avg pooling once per source: the pooling ops, the same tensor on every edge
       leaving it (their BN is non-affine, so it is too);
    5. one BN over everything of 2-4: the BN ending a dil conv, a sep conv's first block,
       FactorizedReduce and the pools' BNs;
    6. the sep convs' second ReLU-conv-conv-BN: one ReLU, one depthwise conv per kernel size,
       one grouped pointwise conv, one BN;
    7. one product with the mixing weights and one sum: eq. 2, o_bar_(i,j)(x_j) =
       sum_o w_(i,j),o o(x_j), on every edge, and of eq. 1 the sum over the group's sources of
       the edges into each target. (SearchCell adds the groups' sums: the rest of eq. 1.)
    """

    def __init__(self, C: int, n_sources: int, k: int, stride: int) -> None:
        super().__init__()
        self.C, self.n_sources, self.k, self.stride = C, n_sources, k, stride
        E = self.n_edges = n_sources * k

        def conv(rows: int, cols: int, size: int) -> nn.Parameter:
            # NaN until SearchCell initialises every edge's rows
            return nn.Parameter(torch.full((rows, cols, size, size), float("nan")))

        self.dw = nn.ParameterList(conv(E * C, 1, _DEPTHWISE[o][0]) for o in CONV_OPS)
        self.pw = conv(len(CONV_OPS) * E * C, C, 1)
        self.dw2 = nn.ParameterList(conv(E * C, 1, _DEPTHWISE[o][0]) for o in SEP_OPS)
        self.pw2 = conv(len(SEP_OPS) * E * C, C, 1)
        self.fr = conv(E * C, C, 1) if stride == 2 else None
        n_bn = len(CONV_OPS) * E * C + (E * C if stride == 2 else 0) + len(_POOLS) * n_sources * C
        self.bn = BatchNorm2d(n_bn, affine=False)
        self.bn2 = BatchNorm2d(len(SEP_OPS) * E * C, affine=False)
        self.max_pool = nn.MaxPool2d(3, stride, 1)
        self.avg_pool = nn.AvgPool2d(3, stride, 1, count_include_pad=False)

    def mixing(self, w: torch.Tensor) -> torch.Tensor:
        """w: (E, n_ops) softmax weights of the group's edges, in edge order. Returns
        (7, S, k, 1, 1, 1): the weight of each op but `none` on each edge, ops in PRIMITIVES
        order (the same for every cell of a type: computed once per forward)."""
        n = len(gt.PRIMITIVES) - 1  # `none` adds nothing
        return w[:, :n].t().reshape(n, self.n_sources, self.k, 1, 1, 1)

    def forward(self, x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        """x: (N, S C, H, W), the group's source nodes side by side; w: :meth:`mixing`.
        Returns (N, k, C, H', W'): the sum of the group's edges into each of its k targets,
        each edge the mixed operation of eq. 2, sum_o w_o * o(x_s) (`none` adds nothing)."""
        N, _, H, W = x.shape
        S, k, E, C = self.n_sources, self.k, self.n_edges, self.C
        r = relu(x)  # every conv op and FactorizedReduce start with relu(x_s)
        # (N, E C, H, W): each edge's copy of its source's relu, edge after edge.
        r_edges = repeat_blocks(r, S, k)
        # First blocks of all conv ops of all edges: one depthwise conv per op kind
        # (groups = E C), then one grouped pointwise conv (groups = 4 E): (N, 4 E C, H', W').
        # (Indexing, not slicing, self.dw: a slice of a ParameterList is a new one, whose
        # Parameters would not be the tensors torch.func.functional_call put in.)
        dw = [self.dw[o] for o in range(len(CONV_OPS))]
        convs = [
            depthwise_conv2d(r_edges, wt, self.stride, d * (kk - 1) // 2, d)
            for wt, (kk, d) in zip(dw[: len(SEP_OPS)], (_DEPTHWISE[o] for o in SEP_OPS))
        ]
        dil_ops = CONV_OPS[len(SEP_OPS) :]
        if phases_apply(r_edges, self.stride):
            # The fast CPU path (kernels.depthwise_conv2d): a dilation-2 conv is the dense
            # conv of each pixel phase; both dil convs read the phases of one copy.
            ph = to_phases(r_edges)  # (4N, E C, H/2, W/2)
            dil = [
                depthwise_conv2d(ph, wt, 1, (_DEPTHWISE[o][0] - 1) // 2, 1)
                for wt, o in zip(dw[len(SEP_OPS) :], dil_ops)
            ]
            convs.append(from_phases(torch.cat(dil, 1)))
        else:
            convs += [
                depthwise_conv2d(r_edges, wt, self.stride, d * (kk - 1) // 2, d)
                for wt, (kk, d) in zip(dw[len(SEP_OPS) :], (_DEPTHWISE[o] for o in dil_ops))
            ]
        parts = [F.conv2d(torch.cat(convs, 1), self.pw, groups=len(CONV_OPS) * E)]
        if self.fr is not None:
            # skip_connect at stride 2, FactorizedReduce: a 1x1 conv at stride 2 of relu(x)
            # is the 1x1 conv of its even pixels; the second conv reads the odd pixels, padded
            # for odd H, W. One grouped conv: group 2e + b is edge e's conv (b + 1), on
            # (N, E 2 C, h, w) = per edge, [even, odd] of its source.
            even = r[:, :, ::2, ::2]
            odd = F.pad(r[:, :, 1::2, 1::2], (0, W % 2, 0, H % 2))
            h, w_ = even.shape[-2:]
            halves = torch.cat([even.view(N, S, C, h, w_), odd.view(N, S, C, h, w_)], 2)
            fr_in = repeat_blocks(halves.view(N, S * 2 * C, h, w_), S, k)
            parts.append(F.conv2d(fr_in, self.fr, groups=2 * E))
        parts.append(self.max_pool(x))  # (N, S C, H', W') each: shared by the source's edges
        parts.append(self.avg_pool(x))
        # Every BN that ends a first block or follows a pool or FactorizedReduce: one call.
        y = scaled_batch_norm(self.bn, torch.cat(parts, 1), fresh=True)
        h_out, w_out = y.shape[-2:]
        sizes = [2 * E * C, 2 * E * C] + ([E * C] if self.fr is not None else [])
        sep, dil_out, *fr_out, pools = y.split([*sizes, len(_POOLS) * S * C], 1)
        # Second blocks of the sep convs, from relu of their first: (N, 2 E C, H', W').
        r2 = relu(sep).split(E * C, 1)
        dw2 = [self.dw2[o] for o in range(len(SEP_OPS))]
        h2 = torch.cat(
            [
                depthwise_conv2d(r2[i], wt, 1, (_DEPTHWISE[o][0] - 1) // 2, 1)
                for i, (wt, o) in enumerate(zip(dw2, SEP_OPS))
            ],
            1,
        )
        conv2 = F.conv2d(h2, self.pw2, groups=len(SEP_OPS) * E)
        y2 = scaled_batch_norm(self.bn2, conv2, fresh=True)
        # Every op's output on every edge, ops in PRIMITIVES order: (N, 7, S, k, C, H', W').
        # The pools (and skip at stride 1) are one tensor per source, read by its k edges.
        full = (N, -1, S, k, C, h_out, w_out)
        pools = pools.view(N, len(_POOLS), S, 1, C, h_out, w_out).expand(full)
        if self.fr is None:
            skip = x.view(N, 1, S, 1, C, H, W).expand(full)
        else:
            skip = fr_out[0].view(full)
        ops = torch.cat([pools, skip, y2.view(full), dil_out.view(full)], 1)
        # eq. 2 on every edge, then the edges of each target summed over the sources (eq. 1).
        return (ops * w).sum((1, 2))


def relu(x: torch.Tensor) -> torch.Tensor:
    """relu(x), the same values and gradient (zero where x <= 0), by F.threshold: its
    backward reads its input, where relu's reads its output, which autograd saves with one
    more call (a detach) per ReLU."""
    return F.threshold(x, 0.0, 0.0)


def repeat_blocks(t: torch.Tensor, S: int, k: int) -> torch.Tensor:
    """(N, S C', H, W) -> (N, S k C', H, W): each of the S channel blocks k times in a row, in
    t's memory format (channels-last stays channels-last). One copy; its backward one sum."""
    if k == 1:
        return t
    N, SC, H, W = t.shape
    C = SC // S
    if t.dim() == 4 and t.is_contiguous(memory_format=torch.channels_last):
        nhwc = t.permute(0, 2, 3, 1).reshape(N, H, W, S, 1, C).expand(N, H, W, S, k, C)
        return nhwc.reshape(N, H, W, S * k * C).permute(0, 3, 1, 2)
    return t.reshape(N, S, 1, C, H, W).expand(N, S, k, C, H, W).reshape(N, S * k * C, H, W)


class SearchCell(Cell):
    """A cell of mixed edges (eq. 1-2), computed group by group (:class:`EdgeGroup`).

    Node i (0-based, intermediate) takes every earlier node. Groups: ``groups[0]``, the edges
    leaving the two input nodes (k = n_nodes targets each); ``groups[g]``, g >= 1, the edges
    leaving intermediate node g - 1 (to nodes g..n_nodes-1). Node i is then the sum of the
    contributions of groups 0..i, one addition per group (eq. 1).
    """

    def __init__(
        self, n_nodes: int, C_pp: int, C_p: int, C: int, reduction_p: bool, reduction: bool
    ) -> None:
        super().__init__(C_pp, C_p, C, reduction_p, reduction, affine=False)
        self.n_nodes, self.C = n_nodes, C
        self.groups = nn.ModuleList(
            [EdgeGroup(C, gt.N_INPUT_NODES, n_nodes, self.stride(0))]
            + [EdgeGroup(C, 1, n_nodes - 1 - g, 1) for g in range(n_nodes - 1)]
        )
        self._init_per_edge()

    # ---------------------------------------------------------------------------------------
    # Where each edge's weights live
    # ---------------------------------------------------------------------------------------
    def edge_group(self, i: int, j: int) -> tuple[int, int]:
        """Edge from node j (0, 1: inputs; 2..: intermediate) to intermediate node i: its group
        and its index e in the group."""
        if j < gt.N_INPUT_NODES:
            return 0, j * self.n_nodes + i
        g = j - gt.N_INPUT_NODES + 1
        return g, i - g

    def edge_slices(self, i: int, j: int) -> dict[str, dict[str, tuple[str, slice]]]:
        """Every tensor of edge (i, j)'s ops, as in the per-edge modules of the paper's
        MixedOp: {op: {its state-dict key in models.ops (e.g. '0.1.weight', the depthwise
        conv of a sep conv's first block): (the stacked tensor's name in this cell, the rows
        along dim 0)}}. Parameters and BN running statistics both."""
        g, e = self.edge_group(i, j)
        group = cast(EdgeGroup, self.groups[g])
        C, E, S = self.C, group.n_edges, group.n_sources
        p = f"groups.{g}."

        def rows(block: int) -> slice:
            return slice(block * C, (block + 1) * C)

        out: dict[str, dict[str, tuple[str, slice]]] = {}
        for o, op in enumerate(CONV_OPS):
            first = "0." if op in SEP_OPS else ""
            d: dict[str, tuple[str, slice]] = {
                f"{first}1.weight": (f"{p}dw.{o}", rows(e)),
                f"{first}2.weight": (f"{p}pw", rows(o * E + e)),
            }
            for b in ("running_mean", "running_var"):
                d[f"{first}3.{b}"] = (f"{p}bn.{b}", rows(o * E + e))
            if op in SEP_OPS:
                d["1.1.weight"] = (f"{p}dw2.{o}", rows(e))
                d["1.2.weight"] = (f"{p}pw2", rows(o * E + e))
                for b in ("running_mean", "running_var"):
                    d[f"1.3.{b}"] = (f"{p}bn2.{b}", rows(o * E + e))
            out[op] = d
        s = e // group.k
        n_conv = len(CONV_OPS) * E
        if group.fr is not None:
            half = C // 2
            out["skip_connect"] = {
                "conv1.weight": (f"{p}fr", slice(e * C, e * C + half)),
                "conv2.weight": (f"{p}fr", slice(e * C + half, (e + 1) * C)),
                "bn.running_mean": (f"{p}bn.running_mean", rows(n_conv + e)),
                "bn.running_var": (f"{p}bn.running_var", rows(n_conv + e)),
            }
            n_conv += E
        for q, op in enumerate(_POOLS):  # shared by the edges of source s
            out[op] = {
                f"1.{b}": (f"{p}bn.{b}", rows(n_conv + q * S + s))
                for b in ("running_mean", "running_var")
            }
        return out

    def edge_tensors(self, i: int, j: int) -> dict[str, dict[str, torch.Tensor]]:
        """The per-edge view of :meth:`edge_slices`: the tensors themselves (views of the
        stacked parameters and buffers: writing to them writes to the cell)."""
        tensors = dict(self.named_parameters()) | dict(self.named_buffers())
        return {
            op: {key: tensors[name][rows] for key, (name, rows) in d.items()}
            for op, d in self.edge_slices(i, j).items()
        }

    def edges(self) -> Iterator[tuple[int, int]]:
        """(i, j) of every edge, in the order of the paper's cell (node after node)."""
        for i in range(self.n_nodes):
            for j in range(gt.N_INPUT_NODES + i):
                yield i, j

    def _init_per_edge(self) -> None:
        """Each edge's convs initialised as nn.Conv2d initialises its own weight, edge after
        edge and op after op in the per-edge cell's order: the same initial weights (and the
        same random stream after them) as a cell of per-edge modules."""
        order = ("skip_connect", *CONV_OPS)
        # each op's convs in the order its modules created them
        keys: tuple[str, ...] = ("conv1.weight", "conv2.weight", "0.1.weight", "0.2.weight")
        keys += ("1.1.weight", "1.2.weight", "1.weight", "2.weight")
        with torch.no_grad():
            for i, j in self.edges():
                views = self.edge_tensors(i, j)
                for op in order:
                    for key in keys:
                        if key in views.get(op, {}):
                            # nn.Conv2d.reset_parameters: fan_in of the per-edge weight
                            nn.init.kaiming_uniform_(views[op][key], a=5**0.5)
        for name, prm in self.groups.named_parameters():  # made NaN: every row was set
            assert not torch.isnan(prm).any(), name

    # ---------------------------------------------------------------------------------------
    def forward(self, s0: torch.Tensor, s1: torch.Tensor, w: list[torch.Tensor]) -> torch.Tensor:
        """s0, s1: outputs of cells k-2, k-1; w[g]: the mixing weights of group g. Returns
        (N, n_nodes * C, H', W')."""
        x0, x1 = self.preprocess(s0, s1)
        # acc[:, t]: the sum so far of the edges into intermediate node t (eq. 1).
        acc = self.groups[0](torch.cat([x0, x1], 1), w[0])  # (N, n_nodes, C, H', W')
        nodes = []
        for g in range(1, self.n_nodes):
            node = acc[:, 0]  # node g - 1 is complete: all its edges were added
            nodes.append(node)
            acc = acc[:, 1:] + self.groups[g](node, w[g])
        nodes.append(acc[:, 0])
        out = torch.cat(nodes, dim=1)
        if x1.is_contiguous(memory_format=torch.channels_last) and not x1.is_contiguous():
            out = out.contiguous(memory_format=torch.channels_last)
        return out

    def forward_per_edge(
        self, s0: torch.Tensor, s1: torch.Tensor, w_dag: list[torch.Tensor]
    ) -> torch.Tensor:
        """The textbook cell on the same weights (the reference of the tests): node i =
        sum over its edges j of sum over the ops o of w_(i,j),o * o(x_j), every op by plain
        functional calls on its per-edge weights (:meth:`edge_tensors`). w_dag[i]: (2 + i,
        n_ops). BNs in training mode use the batch's statistics and leave the running ones."""
        states = list(self.preprocess(s0, s1))
        for i in range(self.n_nodes):
            node = None
            for j in range(gt.N_INPUT_NODES + i):
                h = self._edge_per_op(i, j, states[j], w_dag[i][j])
                node = h if node is None else node + h
            states.append(cast(torch.Tensor, node))
        return torch.cat(states[gt.N_INPUT_NODES :], dim=1)

    def _edge_per_op(self, i: int, j: int, x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        t = self.edge_tensors(i, j)
        stride = self.stride(j)

        def bn(h: torch.Tensor, stats: dict[str, torch.Tensor], prefix: str) -> torch.Tensor:
            if self.training:
                return F.batch_norm(h, None, None, training=True)
            return F.batch_norm(h, stats[f"{prefix}running_mean"], stats[f"{prefix}running_var"])

        terms = [
            w[_OP["max_pool_3x3"]] * bn(F.max_pool2d(x, 3, stride, 1), t["max_pool_3x3"], "1."),
            w[_OP["avg_pool_3x3"]]
            * bn(F.avg_pool2d(x, 3, stride, 1, count_include_pad=False), t["avg_pool_3x3"], "1."),
        ]
        if stride == 1:
            terms.append(w[_OP["skip_connect"]] * x)
        else:
            fr = t["skip_connect"]
            r = torch.relu(x)
            shifted = F.pad(r[:, :, 1:, 1:], (0, 1, 0, 1))
            h = torch.cat(
                [
                    F.conv2d(r, fr["conv1.weight"], stride=2),
                    F.conv2d(shifted, fr["conv2.weight"], stride=2),
                ],
                1,
            )
            terms.append(w[_OP["skip_connect"]] * bn(h, fr, "bn."))

        def block(
            h: torch.Tensor, op: dict[str, torch.Tensor], p: str, s: int, d: int
        ) -> torch.Tensor:
            dw = op[f"{p}1.weight"]
            kk = dw.shape[-1]
            h = F.conv2d(torch.relu(h), dw, None, s, d * (kk - 1) // 2, d, dw.shape[0])
            return bn(F.conv2d(h, op[f"{p}2.weight"]), op, f"{p}3.")

        for op in CONV_OPS:
            d = _DEPTHWISE[op][1]
            if op in SEP_OPS:
                h = block(block(x, t[op], "0.", stride, 1), t[op], "1.", 1, 1)
            else:
                h = block(x, t[op], "", stride, d)
            terms.append(w[_OP[op]] * h)
        out = terms[0]
        for term in terms[1:]:
            out = out + term
        return out


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
        per_edge: bool = False,
    ) -> torch.Tensor:
        """x: (N, C_in, H, W) -> logits (N, n_classes). weights_*[i]: (2 + i, n_ops) softmax
        weights of node i's edges. ``per_edge``: the textbook cells (the tests' reference)."""
        with batches_counted(self):  # every BN's batch counter, in one call
            return self._forward(x, weights_normal, weights_reduce, per_edge)

    def _forward(
        self,
        x: torch.Tensor,
        weights_normal: list[torch.Tensor],
        weights_reduce: list[torch.Tensor],
        per_edge: bool,
    ) -> torch.Tensor:
        mixing: dict[bool, list[torch.Tensor]] = {}
        s0 = s1 = self.stem(x)
        for cell in cast(list[SearchCell], self.cells):
            w_dag = weights_reduce if cell.reduction else weights_normal
            if per_edge:
                s0, s1 = s1, cell.forward_per_edge(s0, s1, w_dag)
                continue
            if cell.reduction not in mixing:  # once per cell type: shared by its cells
                mixing[cell.reduction] = group_weights(cell, w_dag)
            s0, s1 = s1, cell(s0, s1, mixing[cell.reduction])
        return self.linear(self.gap(s1).flatten(1))


def group_weights(cell: SearchCell, w_dag: list[torch.Tensor]) -> list[torch.Tensor]:
    """The per-node softmax weights (w_dag[i]: (2 + i, n_ops), row j the edge from node j)
    regrouped by source node for the cell's groups, rows in edge order (e = s * k + t)."""
    n = cell.n_nodes
    groups = cast(list[EdgeGroup], cell.groups)
    # group 0: (2, n, n_ops) -> (2 n, n_ops), edge j * n + i from input j to node i
    rows = [torch.stack([w_dag[i][: gt.N_INPUT_NODES] for i in range(n)], 1).flatten(0, 1)]
    # group g: the edges from node g + 1 (intermediate g - 1) to nodes g..n-1
    rows += [torch.stack([w_dag[i][g + 1] for i in range(g, n)]) for g in range(1, n)]
    return [group.mixing(w) for group, w in zip(groups, rows)]


# --------------------------------------------------------------------------------------------
# Checkpoints of the per-edge layout (before the edges were stacked)
# --------------------------------------------------------------------------------------------
_PER_EDGE_KEY = re.compile(r"^(.*cells\.(\d+)\.)dag\.(\d+)\.(\d+)\.ops\.(\d+)\.(.+)$")
_PER_EDGE_OPS = [p for p in gt.PRIMITIVES if p != "none"]  # models.ops.MixedOp's order


def is_per_edge(state: Mapping[str, Any]) -> bool:
    """Whether a state dict (of the controller, or names of parameters) is in the per-edge
    layout of the checkpoints written before the edges were stacked."""
    return any(_PER_EDGE_KEY.match(k) for k in state)


def convert_per_edge(
    old: Mapping[str, torch.Tensor], new: Mapping[str, torch.Tensor], cells: list[SearchCell]
) -> dict[str, torch.Tensor]:
    """``old`` (per-edge keys ``...cells.c.dag.i.j.ops.m.<key>``) in the stacked layout of
    ``new`` (a state dict, or a subset of it such as the weights with momentum buffers: only
    its keys are filled). Every other key is taken as it is. The pools' BN statistics of the
    edges of a source are equal (same input, same updates): the last edge's are kept; a
    stacked BN counts the batches its per-edge BNs counted."""
    out = {k: v for k, v in old.items() if not _PER_EDGE_KEY.match(k)}
    filled: dict[str, torch.Tensor] = {}
    for key, value in old.items():
        m = _PER_EDGE_KEY.match(key)
        if m is None:
            continue
        prefix, c, i, j, op, rest = m[1], int(m[2]), int(m[3]), int(m[4]), int(m[5]), m[6]
        cell = cells[c]
        if rest.endswith("num_batches_tracked"):
            for name in ("bn", "bn2"):
                g = cell.edge_group(i, j)[0]
                target = f"{prefix}groups.{g}.{name}.num_batches_tracked"
                if target in new:
                    filled[target] = value.clone()
            continue
        name, rows = cell.edge_slices(i, j)[_PER_EDGE_OPS[op]][rest]
        target = prefix + name
        if target not in new:
            continue
        if target not in filled:
            filled[target] = torch.full_like(new[target], float("nan"))
        filled[target][rows] = value
    for target, t in filled.items():
        if t.is_floating_point() and torch.isnan(t).any():
            raise ValueError(f"per-edge checkpoint: {target} is not covered by its edges")
    out.update(filled)
    return out


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

    def forward(self, x: torch.Tensor, per_edge: bool = False) -> torch.Tensor:
        weights_normal = [F.softmax(a, dim=-1) for a in self.alpha_normal]
        weights_reduce = [F.softmax(a, dim=-1) for a in self.alpha_reduce]
        return self.net(x, weights_normal, weights_reduce, per_edge)

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

    # ---------------------------------------------------------------------------------------
    def load_state_dict(
        self, state_dict: Mapping[str, Any], strict: bool = True, assign: bool = False
    ) -> Any:  # type: ignore[override]
        """As nn.Module's; a state dict of the per-edge layout is converted first."""
        if is_per_edge(state_dict):
            state_dict = convert_per_edge(state_dict, self.state_dict(), self._cells())
        return super().load_state_dict(state_dict, strict, assign)

    def upgrade_checkpoint(self, state: dict[str, Any]) -> dict[str, Any]:
        """A search checkpoint (search.py's dict: ``model``, ``w_optim``, ...) of the per-edge
        layout, converted: the model's state and the weight optimizer's momentum buffers,
        which follow the weights' layout. Others are returned as they are."""
        if not is_per_edge(state.get("model", {})):
            return state
        state = dict(state)
        old_model = state["model"]
        state["model"] = convert_per_edge(old_model, self.state_dict(), self._cells())
        if "w_optim" in state:
            # The optimizer numbers the weights in the order of named_weights(), which is the
            # order of their keys in the model's state dict.
            buffers = {"running_mean", "running_var", "num_batches_tracked"}
            old_names = [
                k for k in old_model if k.startswith("net.") and k.rsplit(".", 1)[-1] not in buffers
            ]
            new = dict(self.named_weights())
            optim = state["w_optim"]
            old_state = optim["state"]
            per_name = {
                old_names[i]: s["momentum_buffer"]
                for i, s in old_state.items()
                if s.get("momentum_buffer") is not None
            }
            converted = convert_per_edge(
                per_name, {k: v.detach() for k, v in new.items()}, self._cells()
            )
            new_names = list(new)
            new_state = {
                n: {"momentum_buffer": converted[name]}
                for n, name in enumerate(new_names)
                if name in converted
            }
            groups = [dict(g) for g in optim["param_groups"]]
            assert len(groups) == 1, "search.py's weight optimizer has one parameter group"
            groups[0]["params"] = list(range(len(new_names)))
            state["w_optim"] = {"state": new_state, "param_groups": groups}
        return state

    def _cells(self) -> list[SearchCell]:
        return cast(list[SearchCell], list(self.net.cells))

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
