"""The discrete network of the augment stage (DARTS.md, section 2), for CIFAR and ImageNet.

The searched cell (a :class:`genotypes.Genotype`) is repeated ``n_layers`` times with the
supernet's macro-structure: stem, normal cells, reduction cells at 1/3 and 2/3 depth
(models/macro.py, shared with the supernet), global average pooling and a linear classifier.
Unlike the supernet every BN is affine, and a pooling op is the bare pooling layer (no BN after
it): that is the network whose size the paper reports. Training adds drop path on every
non-identity op and an auxiliary head after the second reduction cell.

The ImageNet network (``imagenet=True``; the paper's appendix A.2, the mobile setting) differs
only at its ends: two stride-2 stems that bring a 224 input to 28x28 before the first cell
(:func:`imagenet_stems`), the cells starting from C channels, 7x7 average pooling before the
classifier, and an auxiliary head for 7x7 maps. Its modules are registered in the order of the
authors' ``NetworkImageNet`` (stem0, stem1, cells, auxiliary head, classifier), as those of the
CIFAR network are in the order of their ``NetworkCIFAR``: official.py maps their released
tensors onto these networks by that order.

Here: :func:`drop_path`, :class:`AugmentCell` (the genotype's ops on the shared cell inputs),
:class:`AuxiliaryHead`, :func:`imagenet_stems` and :class:`AugmentCNN`.
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
    # Divide by keep, a Python float, rather than multiply by a mask holding 1/keep: in
    # bfloat16 1/keep itself rounds to 1.0 for p below about 0.004 (and is 0.25% off at
    # p = 0.01), while each x / keep rounds on its own, so the mean keeps the scale. (Below
    # p of about 0.002 the scale is under half a bfloat16 step of every element and is lost
    # either way.) In place on the product, which autograd does not keep.
    return (x * mask).div_(keep)


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


def _paper_pool_fits(spatial: int, stride: int = 3) -> bool:
    """True when AvgPool2d(5, stride) maps ``spatial`` to exactly 2x2 (stride 3: 8 to 10,
    the CIFAR head; stride 2: 7 or 8, the ImageNet head)."""
    return spatial >= 5 and (spatial - 5) // stride + 1 == 2


class AuxiliaryHead(nn.Module):
    """Auxiliary classifier on the output of the second reduction cell (DARTS.md, section 2).

    ReLU, 5x5 avg-pool stride 3, 1x1 conv to 128, BN, ReLU, 2x2 conv to 768, BN, ReLU, linear.
    On CIFAR-10 it sees 8x8 and the pool gives 2x2: the paper's layers exactly. Where the
    paper's pool does not give 2x2 (MNIST: 7x7 -> 1x1, too small for the 2x2 conv; 8x8 digits:
    2x2, too small for the pool; larger inputs: more than 2x2, too large for the linear), the
    pool is an adaptive average pool to 2x2 instead, so every other layer and the parameter
    count stay those of the paper. ``spatial`` is the side of the feature map it receives.

    ``imagenet``: the head of the authors' ImageNet network, on 7x7 maps at 224: the pool has
    stride 2 (7x7 -> 2x2), and there is no BN after the 2x2 conv (the authors' code has it
    commented out). 1,260,776 parameters at 768 input channels and 1000 classes.
    """

    def __init__(self, spatial: int, C: int, n_classes: int, imagenet: bool = False) -> None:
        super().__init__()
        self.spatial = spatial
        stride = 2 if imagenet else 3
        pool: nn.Module = (
            nn.AvgPool2d(5, stride=stride, padding=0, count_include_pad=False)
            if _paper_pool_fits(spatial, stride)
            else nn.AdaptiveAvgPool2d(2)
        )
        bn_768: list[nn.Module] = [] if imagenet else [BatchNorm2d(768)]
        self.features = nn.Sequential(
            nn.ReLU(inplace=False),
            pool,  # (N, C, s, s) -> (N, C, 2, 2)
            nn.Conv2d(C, 128, 1, bias=False),
            BatchNorm2d(128),
            nn.ReLU(),
            nn.Conv2d(128, 768, 2, bias=False),  # (N, 128, 2, 2) -> (N, 768, 1, 1)
            *bn_768,
            nn.ReLU(),
        )
        self.linear = nn.Linear(768, n_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: (N, C, s, s) -> logits (N, n_classes)."""
        return self.linear(self.features(x).flatten(1))


def _stride2_side(side: int) -> int:
    """The side after a 3x3 conv with stride 2 and padding 1 (and after FactorizedReduce)."""
    return (side + 1) // 2


def imagenet_stems(C_in: int, C: int) -> tuple[nn.Sequential, nn.Sequential]:
    """The ImageNet network's stems (the paper's appendix A.2; the authors' NetworkImageNet).

    stem0: conv 3x3 stride 2 (C_in -> C/2), BN, ReLU, conv 3x3 stride 2 (C/2 -> C), BN:
    (N, C_in, 224, 224) -> (N, C, 56, 56), the first cell's s0.
    stem1: ReLU, conv 3x3 stride 2 (C -> C), BN: (N, C, 56, 56) -> (N, C, 28, 28), its s1.
    Convs without bias, BNs affine; the ReLUs are not in place (the authors' are, harmlessly:
    every reader of s0 begins with a ReLU).
    """
    stem0 = nn.Sequential(
        nn.Conv2d(C_in, C // 2, 3, stride=2, padding=1, bias=False),
        BatchNorm2d(C // 2),
        nn.ReLU(),
        nn.Conv2d(C // 2, C, 3, stride=2, padding=1, bias=False),
        BatchNorm2d(C),
    )
    stem1 = nn.Sequential(
        nn.ReLU(),
        nn.Conv2d(C, C, 3, stride=2, padding=1, bias=False),
        BatchNorm2d(C),
    )
    return stem0, stem1


class AugmentCNN(nn.Module):
    """Stem - n_layers cells of a genotype - global average pooling - linear (+ auxiliary head).

    ``forward`` returns ``(logits, aux_logits)``; ``aux_logits`` is None in eval mode or when
    ``auxiliary`` is False. The auxiliary head's parameters live under ``aux_head`` so that
    ``utils.count_parameters(model, exclude="aux_head")`` gives the size the paper reports.
    Cells may have any number of nodes and any concat; normal and reduction cells may differ:
    a cell outputs ``C_cell * len(concat)`` channels.

    ``imagenet``: the ImageNet network (module docstring). Its stems bring the input to 1/8 of
    its side (224 -> 28) before the first cell, which reads stem0's 56x56 output as s0 through
    FactorizedReduce and stem1's 28x28 output as s1, both at C channels (not 3C). The head
    averages the last cell's map with an AvgPool2d as large as that map: at 224 the map is 7x7
    and this is the authors' AvgPool2d(7), bit for bit (global average pooling computes the
    same mean but rounds differently, ~1e-7); at other sizes it is global average pooling,
    which AvgPool2d(7) would not be (it fails on smaller maps and keeps several positions on
    larger ones). DARTS_V2 at C=48, 14 layers, 1000 classes: 4,718,752 parameters without the
    auxiliary head (DARTS.md, section 8).
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
        imagenet: bool = False,
        stem_multiplier: int = 3,
    ) -> None:
        super().__init__()
        genotype = gt.validate(genotype)  # canonical form; GenotypeError if malformed
        self.genotype = genotype
        self.input_size, self.C_in = input_size, C_in  # what models/flops.py feeds it
        self.imagenet = imagenet
        self.n_layers = n_layers
        self.reductions = reduction_layers(n_layers)
        # The head sits after the cell at 2/3 depth, i.e. after the second reduction cell.
        self.aux_pos = self.reductions[1]

        spatial = input_size
        if imagenet:
            if C % 2:
                raise ValueError(f"the ImageNet stems need an even C, got {C}")
            C_stem = C
            # (N, C_in, H, W) -> stem0 (N, C, H/4, W/4) -> stem1 (N, C, H/8, W/8)
            self.stem0, self.stem1 = imagenet_stems(C_in, C)
            for _ in range(3):
                spatial = _stride2_side(spatial)
        else:
            C_stem = stem_multiplier * C
            self.stem = stem(C_in, C_stem)  # (N, C_in, H, W) -> (N, 3C, H, W)
        n_concat = (len(genotype.normal_concat), len(genotype.reduce_concat))
        shapes = cell_shapes(n_layers, C_stem, C, n_concat, stem_reduces=imagenet)
        self.cells = nn.ModuleList()
        aux_spatial, aux_channels = spatial, C_stem
        for s in shapes:
            if s.reduction:
                spatial = _stride2_side(spatial)  # every stride-2 op and FactorizedReduce: ceil
            nodes = genotype.reduce if s.reduction else genotype.normal
            concat = list(genotype.reduce_concat if s.reduction else genotype.normal_concat)
            self.cells.append(
                AugmentCell(nodes, concat, s.C_pp, s.C_p, s.C, s.reduction_p, s.reduction)
            )
            if s.index == self.aux_pos:
                aux_spatial, aux_channels = spatial, s.C_out
        self.final_spatial = spatial  # the side of the last cell's output

        self.aux_head = (
            AuxiliaryHead(aux_spatial, aux_channels, n_classes, imagenet=imagenet)
            if auxiliary
            else None
        )
        # (N, C_last, s, s) -> (N, C_last, 1, 1)
        self.gap = nn.AvgPool2d(spatial) if imagenet else nn.AdaptiveAvgPool2d(1)
        self.linear = nn.Linear(shapes[-1].C_out, n_classes)

    def drop_path_prob(self, p: float) -> None:
        """Set the drop-path probability of every cell (used in training mode only)."""
        if not 0.0 <= p < 1.0:
            raise ValueError(f"drop-path probability must be in [0, 1), got {p}")
        for cell in self.cells:
            cell.drop_prob = float(p)  # type: ignore[assignment]

    def stems(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """x: (N, C_in, H, W) -> the first cell's (s0, s1): the stem's (N, 3C, H, W) twice, or
        for the ImageNet network stem0's (N, C, H/4, W/4) and stem1's (N, C, H/8, W/8)."""
        if self.imagenet:
            s0 = self.stem0(x)
            return s0, self.stem1(s0)
        s = self.stem(x)
        return s, s

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """x: (N, C_in, H, W) -> (logits (N, n_classes), aux_logits (N, n_classes) or None)."""
        s0, s1 = self.stems(x)
        aux_logits = None
        for i, cell in enumerate(self.cells):
            s0, s1 = s1, cell(s0, s1)
            if i == self.aux_pos and self.aux_head is not None and self.training:
                aux_logits = self.aux_head(s1)
        logits = self.linear(self.gap(s1).flatten(1))
        return logits, aux_logits
