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
import functools
import re
from collections.abc import Iterator, Mapping
from typing import Any, cast

import torch
import torch.nn as nn
import torch.nn.functional as F

import genotypes as gt
from models.kernels import (
    BatchNorm2d,
    bookkept,
    depthwise_conv2d,
    phases_apply,
    phases_as_images,
    relu,
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
       of o(x_j) for o in CONV_OPS, every edge (i, j) of the group. (On the CPU the dil convs
       run on the pixel phases, kernels.to_phases, and their output stays in phase order up
       to the sum of step 7: the 1x1 conv and BN treat every pixel alike.)
    3. stride 2: one grouped 1x1 conv, FactorizedReduce's two convs on every edge;
    4. max and avg pooling once per source: the pooling ops, the same tensor on every edge
       leaving it (their BN is non-affine, so it is too);
    5. one BN over everything of 2-4: the BN ending a dil conv, a sep conv's first block,
       FactorizedReduce and the pools' BNs. Its scale (the affine weight of a non-affine BN,
       kernels.scaled_batch_norm) is the mixing weight w_(i,j),o of eq. 2 on the channels of
       the ops it ends (dil convs, FactorizedReduce), 1 on the others;
    6. the sep convs' second ReLU-conv-conv-BN: one ReLU, one depthwise conv per kernel size,
       one grouped pointwise conv, one BN, scaled by the sep convs' mixing weights;
    7. eq. 2 and the group's share of eq. 1, channels-last: one sum over ops and sources of
       the scaled BN outputs of 5-6 (the convs' and FactorizedReduce's w_o o(x_j)), and, for
       the ops shared by a source's edges, one product with their weights and one sum (pools),
       one product-and-add (skip_connect, stride 1): for each target t, the sum over the
       group's edges (j, t) of o_bar_(t,j)(x_j) = sum_o w_(t,j),o o(x_j). (SearchCell adds the
       groups' sums: the rest of eq. 1.)

    The mixing weights reach these calls as :meth:`SearchCell.mixing` takes them, in one call,
    from the softmax of the alphas (:meth:`weight_index` says where each one comes from).
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

    def weight_index(self, rows: list[int]) -> list[torch.Tensor]:
        """Where the mixing weights of :meth:`forward` are found in a cell type's softmax
        weights with a column of ones appended, (n_edges, n_ops + 1) (its rows: the cell's
        edges, node after node, ``rows[e]`` that of the group's edge e), as flat indices:

        - the scale of ``bn``'s channels: w_(e,o) on the channels of edge e's op o where that
          op ends in this BN (dil convs, FactorizedReduce), 1 elsewhere;
        - the scale of ``bn2``'s channels: w_(e,o), o a sep conv;
        - (2 S, k, 1): the weight of each pool of each source on each of its edges;
        - stride 1, (S, k, 1): the weight of skip_connect (identity) on each edge.
        """
        C, S, k, E = self.C, self.n_sources, self.k, self.n_edges
        n_cols = len(gt.PRIMITIVES) + 1
        one = n_cols - 1  # the column of ones

        def at(e: int, op: str | None) -> int:
            return rows[e] * n_cols + (one if op is None else _OP[op])

        bn = [at(e, None if o in SEP_OPS else o) for o in CONV_OPS for e in range(E)]
        bn += [at(e, "skip_connect") for e in range(E)] if self.stride == 2 else []
        bn += [one] * len(_POOLS) * S
        bn2 = [at(e, o) for o in SEP_OPS for e in range(E)]
        index = [torch.tensor(bn).repeat_interleave(C), torch.tensor(bn2).repeat_interleave(C)]
        shared = [_POOLS] + ([("skip_connect",)] if self.stride == 1 else [])
        for ops in shared:
            rows_ = [[[at(s * k + t, q)] for t in range(k)] for q in ops for s in range(S)]
            index.append(torch.tensor(rows_))
        return index

    def forward(self, x_n: torch.Tensor, w: list[torch.Tensor]) -> torch.Tensor:
        """x_n: (N, H, W, S C), the group's source nodes side by side, channels last (in the
        order of the dims; any memory layout); w: its weights from :meth:`SearchCell.mixing`.
        Returns (N, H', W', k, C): the sum of the group's edges into each of its k targets,
        each edge the mixed operation of eq. 2, sum_o w_o * o(x_s) (`none` adds nothing)."""
        N, H, W, _ = x_n.shape
        S, k, E, C = self.n_sources, self.k, self.n_edges, self.C
        x = x_n.permute(0, 3, 1, 2)  # (N, S C, H, W)
        r = relu(x_n)  # every conv op and FactorizedReduce start with relu(x_s)
        # (N, H, W, E C): each edge's copy of its source's relu, edge after edge.
        r_edges_n = repeat_blocks(r, S, k)
        r_edges = r_edges_n.permute(0, 3, 1, 2)  # (N, E C, H, W), channels-last
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
        phased = phases_apply(r_edges, self.stride)
        if phased:
            # The fast CPU path (kernels.depthwise_conv2d): a dilation-2 conv is the dense
            # conv of each pixel phase; both dil convs read the phases of one copy. Their
            # output stays in phase order (phases_as_images: no copy back) through the
            # pointwise conv and BN, which treat every pixel alike, to the sum below.
            ph = to_phases(r_edges_n, channels_last=True)  # (4N, E C, H/2, W/2)
            dil = [
                depthwise_conv2d(ph, wt, 1, (_DEPTHWISE[o][0] - 1) // 2, 1)
                for wt, o in zip(dw[len(SEP_OPS) :], dil_ops)
            ]
            convs.append(phases_as_images(torch.cat(dil, 1)))
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
            even = r[:, ::2, ::2]
            odd = F.pad(r[:, 1::2, 1::2], (0, 0, 0, W % 2, 0, H % 2))
            h, w_ = even.shape[1:3]
            halves = torch.cat([even.view(N, h, w_, S, 1, C), odd.view(N, h, w_, S, 1, C)], 4)
            fr_in = repeat_blocks(halves.view(N, h, w_, S * 2 * C), S, k).permute(0, 3, 1, 2)
            parts.append(F.conv2d(fr_in, self.fr, groups=2 * E))
        parts.append(self.max_pool(x))  # (N, S C, H', W') each: shared by the source's edges
        parts.append(self.avg_pool(x))
        # Every BN that ends a first block or follows a pool or FactorizedReduce: one call,
        # with the mixing weights of eq. 2 as the scale of the dil convs and FactorizedReduce.
        bn_scale, bn2_scale, w_pools, *w_skip = w
        y = scaled_batch_norm(self.bn, torch.cat(parts, 1), bn_scale, fresh=True)
        h_out, w_out = y.shape[-2:]
        # From here on channels-last (N, H', W', channels) views: the sums over edges run
        # along contiguous memory, and their gradients reach the BNs dense.
        n_conv = (3 if self.fr is not None else 2) * E * C
        sep, convs_n, pools_n = y.permute(0, 2, 3, 1).split(
            [2 * E * C, n_conv, len(_POOLS) * S * C], -1
        )
        # Second blocks of the sep convs, from relu of their first: (N, 2 E C, H', W').
        r2 = relu(sep.permute(0, 3, 1, 2)).split(E * C, 1)
        dw2 = [self.dw2[o] for o in range(len(SEP_OPS))]
        h2 = torch.cat(
            [
                depthwise_conv2d(r2[i], wt, 1, (_DEPTHWISE[o][0] - 1) // 2, 1)
                for i, (wt, o) in enumerate(zip(dw2, SEP_OPS))
            ],
            1,
        )
        conv2 = F.conv2d(h2, self.pw2, groups=len(SEP_OPS) * E)
        y2 = scaled_batch_norm(self.bn2, conv2, bn2_scale, fresh=True)
        # eq. 2 and the group's share of eq. 1: the ops ending in a scaled BN, summed over
        # ops and sources, then the shared ops times their weights.
        per_target = (N, h_out, w_out, -1, k, C)  # (..., op and source, target, channel)
        out = y2.permute(0, 2, 3, 1).reshape(per_target).sum(3)
        if phased:  # the dil convs in phase order: (p, q, N, h, w) to (N, h, p, w, q)
            h, w_ = H // 2, W // 2
            dil_sum = convs_n.reshape(2, 2, N, h, w_, -1, k, C).sum(5).permute(2, 3, 0, 4, 1, 5, 6)
            out = (out.reshape(N, h, 2, w_, 2, k, C) + dil_sum).reshape(N, H, W, k, C)
        else:
            out = out + convs_n.reshape(per_target).sum(3)
        out = out + (pools_n.reshape(N, h_out, w_out, -1, 1, C) * w_pools).sum(3)
        if w_skip and S == 1:  # one source: the product needs no sum, one call does both
            out = torch.addcmul(out, x_n.unsqueeze(3), w_skip[0])
        elif w_skip:
            out = out + (x_n.reshape(N, H, W, S, 1, C) * w_skip[0]).sum(3)
        return out  # (N, H', W', k, C)


def repeat_blocks(t_n: torch.Tensor, S: int, k: int) -> torch.Tensor:
    """(N, H, W, S C') -> (N, H, W, S k C'): each of the S channel blocks k times in a row.
    One copy; its backward one sum."""
    if k == 1:
        return t_n
    N, H, W, SC = t_n.shape
    C = SC // S
    return t_n.reshape(N, H, W, S, 1, C).expand(N, H, W, S, k, C).reshape(N, H, W, S * k * C)


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
        # The mixing weights of every group, taken from the cell type's weights in one call
        # (mixing()): each group's indices (EdgeGroup.weight_index), one after the other.
        edge_rows = [[0] * cast(EdgeGroup, group).n_edges for group in self.groups]
        for row, (i, j) in enumerate(self.edges()):
            g, e = self.edge_group(i, j)
            edge_rows[g][e] = row  # the row of the group's edge e in the cell type's weights
        index = [
            cast(EdgeGroup, group).weight_index(rows) for group, rows in zip(self.groups, edge_rows)
        ]
        self._mixing_shapes = [[tuple(t.shape) for t in group] for group in index]
        self._mixing_sizes = [t.numel() for group in index for t in group]
        flat = torch.cat([t.flatten() for group in index for t in group])
        self.register_buffer("mixing_index", flat, persistent=False)

    def mixing(self, w_cell: torch.Tensor) -> list[list[torch.Tensor]]:
        """w_cell: (n_edges, n_ops + 1), the softmax weights of the cell type's edges, node
        after node, with a column of ones appended. Returns, per group, the weights its
        forward takes (EdgeGroup.weight_index). Cells of one type and width share them."""
        index = cast(torch.Tensor, self.mixing_index)
        pieces = iter(torch.take(w_cell, index).split(self._mixing_sizes))
        return [
            [p if len(shape) == 1 else p.view(shape) for shape, p in zip(group, pieces)]
            for group in self._mixing_shapes
        ]

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
        # Group g adds to nodes g.. (eq. 1): to_node[t], the contributions to node t so far.
        to_node: list[list[torch.Tensor]] = [[] for _ in range(self.n_nodes)]
        x_n = torch.cat([x0, x1], 1).permute(0, 2, 3, 1)  # (N, H, W, 2 C)
        nodes = []
        for g, group in enumerate(self.groups):
            for t, h in enumerate(group(x_n, w[g]).unbind(3), start=g):
                to_node[t].append(h)
            # node g is complete: the sum of its edges from every group, (N, H', W', C)
            x_n = functools.reduce(torch.add, to_node[g])
            nodes.append(x_n)
        return torch.cat(nodes, -1).permute(0, 3, 1, 2)  # (N, n_nodes C, H', W')

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
        with bookkept(self):  # every BN's counter and running statistics, in a few calls
            return self._forward(x, weights_normal, weights_reduce, per_edge)

    def _forward(
        self,
        x: torch.Tensor,
        weights_normal: list[torch.Tensor],
        weights_reduce: list[torch.Tensor],
        per_edge: bool,
    ) -> torch.Tensor:
        # The softmax weights of each cell type, edges node after node, and a column of ones;
        # each cell's mixing weights are taken from them once per type and width.
        w_cells = {
            reduction: F.pad(torch.cat(w_dag), (0, 1), value=1.0)
            for reduction, w_dag in ((False, weights_normal), (True, weights_reduce))
        }
        mixing: dict[tuple[bool, int], list[list[torch.Tensor]]] = {}
        s0 = s1 = self.stem(x)
        for cell in cast(list[SearchCell], self.cells):
            if per_edge:
                w_dag = weights_reduce if cell.reduction else weights_normal
                s0, s1 = s1, cell.forward_per_edge(s0, s1, w_dag)
                continue
            key = (cell.reduction, cell.C)
            if key not in mixing:
                mixing[key] = cell.mixing(w_cells[cell.reduction])
            s0, s1 = s1, cell(s0, s1, mixing[key])
        return self.linear(self.gap(s1).flatten(1))


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
