"""The candidate operations of DARTS (paper, section 2.1) and the supernet's mixed operation.

Every op maps (N, C, H, W) -> (N, C, H/stride, W/stride). ``OPS[name](C, stride, affine)``
builds one; the supernet uses ``affine=False`` BNs, the evaluated network ``affine=True``.

Besides ``forward``, every op has ``weighted(x, w)``: ``w * op(x.x)``, where ``x`` is an
:class:`EdgeInput`, the state of the node the edge leaves. It is the term of eq. 2 that
:class:`MixedOp` sums, computed the fast way: the op takes relu(x) (and, for a stride-1 dilated
conv, the pixel phases of relu(x)) from ``x``, which computes them once for all the ops of all
the edges leaving that node, and an op ending in a non-affine BN folds ``w`` into it instead of
multiplying its output. The evaluated network calls ``weighted(x)`` (no weight) for the shared
ReLU alone. The kernels this uses (BN with a folded scale, depthwise convs on pixel phases)
live in models/kernels.py, each with a plain twin it is tested against; module structure and
parameter names are those of the plain ops, so checkpoints do not notice.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import cast

import torch
import torch.nn as nn
import torch.nn.functional as F

from genotypes import PRIMITIVES
from models.kernels import (
    BatchNorm2d,
    ReLU,
    depthwise_conv2d,
    from_phases,
    phases_apply,
    relu,
    scaled_batch_norm,
    to_phases,
)


class EdgeInput:
    """A node's state ``x`` as the edges leaving it read it, with the work their ops share.

    ``relu``: relu(x), which the separable and dilated convs and FactorizedReduce begin with.
    ``phases``: :func:`models.kernels.to_phases` of relu(x), (4N, C, H/2, W/2), on which the
    stride-1 dilated convs run on the CPU. Each is computed on first use and then kept, so
    autograd stores and differentiates it once per node instead of once per op (an input node
    of a supernet cell feeds 4 edges of 4 or 5 ReLU-first ops). Either may be handed in.
    """

    __slots__ = ("x", "_relu", "_phases")

    def __init__(
        self,
        x: torch.Tensor,
        relu: torch.Tensor | None = None,
        phases: torch.Tensor | None = None,
    ) -> None:
        self.x = x  # (N, C, H, W)
        self._relu = relu
        self._phases = phases

    @property
    def relu(self) -> torch.Tensor:
        if self._relu is None:
            self._relu = relu(self.x)
        return self._relu

    @property
    def phases(self) -> torch.Tensor:
        if self._phases is None:
            self._phases = to_phases(self.relu)
        return self._phases

    def precompute(self, stride: int) -> None:
        """Make relu(x) now, and its phases if the dilated convs of an edge of ``stride`` run
        on them: before the edge's ops (pooling comes first), as the supernet cell always has.
        The backward pass sums the gradients reaching a tensor in an order set by when its
        consumers were recorded, so this keeps every gradient bit for bit what it was."""
        if phases_apply(self.relu, stride):
            self.phases  # noqa: B018 (the property computes and keeps them)


class Op(nn.Module):
    """What every candidate op offers the cells besides ``forward``: :meth:`weighted`."""

    def weighted(self, x: EdgeInput, w: torch.Tensor | None = None) -> torch.Tensor:
        """``w * self(x.x)`` (``self(x.x)`` for None). Ops with work to share override it."""
        y = self(x.x)
        return y if w is None else w * y


class Identity(Op, nn.Identity):
    """skip_connect at stride 1."""


class MaxPool(Op, nn.MaxPool2d):
    """max_pool_3x3 (no parameters: bare in the evaluated network)."""


class AvgPool(Op, nn.AvgPool2d):
    """avg_pool_3x3, count_include_pad=False (no parameters: bare in the evaluated network)."""


class Zero(Op):
    """The `none` op. Only used where a zero tensor is really needed: MixedOp skips it."""

    def __init__(self, stride: int) -> None:
        super().__init__()
        self.stride = stride

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x[:, :, :: self.stride, :: self.stride].mul(0.0)


class StdConv(nn.Sequential):
    """ReLU - Conv - BN: the preprocessing of cell inputs."""

    def __init__(
        self,
        C_in: int,
        C_out: int,
        kernel_size: int,
        stride: int,
        padding: int,
        affine: bool = True,
    ) -> None:
        super().__init__(
            ReLU(),
            nn.Conv2d(C_in, C_out, kernel_size, stride, padding, bias=False),
            BatchNorm2d(C_out, affine=affine),
        )


class DilConv(Op, nn.Sequential):
    """ReLU - (dilated) depthwise conv - pointwise conv - BN."""

    def __init__(
        self,
        C_in: int,
        C_out: int,
        kernel_size: int,
        stride: int,
        padding: int,
        dilation: int,
        affine: bool = True,
    ) -> None:
        super().__init__(
            nn.ReLU(),
            nn.Conv2d(
                C_in, C_in, kernel_size, stride, padding, dilation=dilation, groups=C_in, bias=False
            ),
            nn.Conv2d(C_in, C_out, 1, bias=False),
            BatchNorm2d(C_out, affine=affine),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.weighted(EdgeInput(x))

    def weighted(self, x: EdgeInput, w: torch.Tensor | None = None) -> torch.Tensor:
        """``w * self(x.x)``: the block after its ReLU on x.relu (or on x.phases), with w
        folded into the BN."""
        dw, pw, bn = cast(nn.Conv2d, self[1]), self[2], cast(nn.BatchNorm2d, self[3])
        k, stride, dilation = dw.kernel_size[0], dw.stride[0], dw.dilation[0]
        padding = cast(tuple[int, int], dw.padding)[0]
        if dilation == 2 and padding == k - 1 and k % 2 and phases_apply(x.relu, stride):
            # The whole block on the pixel phases (see kernels.depthwise_conv2d): the pointwise
            # conv acts per pixel and BN's statistics run over all N * H * W pixels either way,
            # so the phases are reassembled once, at the end. (4N, C, H/2, W/2) -> (N, C, H, W)
            h = depthwise_conv2d(x.phases, dw.weight, 1, (k - 1) // 2, 1)
            out = from_phases(scaled_batch_norm(bn, pw(h), w, fresh=True))  # channels-last
            if not x.relu.is_contiguous(memory_format=torch.channels_last):
                out = out.contiguous()  # an NCHW network stays NCHW
            return out
        h = depthwise_conv2d(x.relu, dw.weight, stride, padding, dilation)
        return scaled_batch_norm(bn, pw(h), w, fresh=True)


class SepConv(Op, nn.Sequential):
    """Separable conv: the DilConv block (dilation 1) twice, the first with the edge's stride."""

    def __init__(
        self,
        C_in: int,
        C_out: int,
        kernel_size: int,
        stride: int,
        padding: int,
        affine: bool = True,
    ) -> None:
        super().__init__(
            DilConv(C_in, C_in, kernel_size, stride, padding, dilation=1, affine=affine),
            DilConv(C_in, C_out, kernel_size, 1, padding, dilation=1, affine=affine),
        )

    def weighted(self, x: EdgeInput, w: torch.Tensor | None = None) -> torch.Tensor:
        first, second = cast(DilConv, self[0]), cast(DilConv, self[1])
        return second.weighted(EdgeInput(first.weighted(x)), w)


class FactorizedReduce(Op):
    """Halve H and W without losing pixels: ReLU, two 1x1 stride-2 convs, the second on the
    input shifted by one pixel, concatenated, BN.
    (N, C_in, H, W) -> (N, C_out, ceil(H/2), ceil(W/2))."""

    def __init__(self, C_in: int, C_out: int, affine: bool = True) -> None:
        super().__init__()
        if C_out % 2:
            raise ValueError(f"FactorizedReduce needs an even number of channels, got {C_out}")
        self.conv1 = nn.Conv2d(C_in, C_out // 2, 1, stride=2, bias=False)
        self.conv2 = nn.Conv2d(C_in, C_out // 2, 1, stride=2, bias=False)
        self.bn = BatchNorm2d(C_out, affine=affine)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.weighted(EdgeInput(x))

    def weighted(self, x: EdgeInput, w: torch.Tensor | None = None) -> torch.Tensor:
        """``w * self(x.x)``, from x.relu, with w folded into the BN."""
        # A 1x1 conv at stride 2 reads the even pixels only: it is the 1x1 conv of
        # r[:, :, ::2, ::2] (oneDNN's strided 1x1 backward is several times slower). The second
        # branch reads the odd pixels, padded right/bottom with zeros to ceil(H/2) x ceil(W/2)
        # for odd H, W (the pixels the shifted-by-one input padded with one zero row gives).
        r = x.relu
        H, W = r.shape[-2:]
        even = r[:, :, ::2, ::2]
        odd = F.pad(r[:, :, 1::2, 1::2], (0, W % 2, 0, H % 2))
        h = torch.cat([F.conv2d(even, self.conv1.weight), F.conv2d(odd, self.conv2.weight)], dim=1)
        return scaled_batch_norm(self.bn, h, w, fresh=True)


class PoolBN(Op, nn.Sequential):
    """A pooling op of the supernet: the pooling layer, then a non-affine BN (DARTS.md,
    section 1; the evaluated network has the bare layer). ``self[0]`` pool, ``self[1]`` BN."""

    def __init__(self, pool: nn.Module, C: int) -> None:
        super().__init__(pool, BatchNorm2d(C, affine=False))

    def weighted(self, x: EdgeInput, w: torch.Tensor | None = None) -> torch.Tensor:
        pool, bn = self[0], cast(nn.BatchNorm2d, self[1])
        return scaled_batch_norm(bn, pool(x.x), w, fresh=True)


OPS: dict[str, Callable[[int, int, bool], Op]] = {
    "none": lambda C, stride, affine: Zero(stride),
    "avg_pool_3x3": lambda C, stride, affine: AvgPool(
        3, stride=stride, padding=1, count_include_pad=False
    ),
    "max_pool_3x3": lambda C, stride, affine: MaxPool(3, stride=stride, padding=1),
    "skip_connect": lambda C, stride, affine: (
        Identity() if stride == 1 else FactorizedReduce(C, C, affine=affine)
    ),
    "sep_conv_3x3": lambda C, stride, affine: SepConv(C, C, 3, stride, 1, affine=affine),
    "sep_conv_5x5": lambda C, stride, affine: SepConv(C, C, 5, stride, 2, affine=affine),
    "dil_conv_3x3": lambda C, stride, affine: DilConv(C, C, 3, stride, 2, 2, affine=affine),
    "dil_conv_5x5": lambda C, stride, affine: DilConv(C, C, 5, stride, 4, 2, affine=affine),
}
assert set(OPS) == set(PRIMITIVES), "OPS and genotypes.PRIMITIVES must name the same ops"


class MixedOp(nn.Module):
    """One supernet edge: ``sum_o softmax(alpha)_o * o(x)`` over the primitives (eq. 2).

    The supernet computes its edges batched by source node (models/search_cnn.py, EdgeGroup);
    this per-edge form is the one the tests check the ops and that batching against.

    The `none` op adds nothing to the sum, so it is not built; its alpha still gets a gradient
    through the softmax that produced the other weights. Pooling ops are followed by a
    non-affine BN (:class:`PoolBN`) in the supernet only.
    """

    def __init__(self, C: int, stride: int) -> None:
        super().__init__()
        self.stride = stride
        self.ops = nn.ModuleList()
        self.op_index: list[int] = []  # the column of the alphas each op belongs to
        for i, name in enumerate(PRIMITIVES):
            if name == "none":
                continue
            op = OPS[name](C, stride, False)
            self.ops.append(PoolBN(op, C) if "pool" in name else op)
            self.op_index.append(i)

    def forward(self, x: EdgeInput | torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        """x: the input node's state (N, C, H, W), as the EdgeInput it shares with the other
        edges leaving that node, or a tensor; weights: (n_primitives,) softmax weights of this
        edge. Returns (N, C, H/stride, W/stride)."""
        if isinstance(x, torch.Tensor):
            x = EdgeInput(x)
        x.precompute(self.stride)
        out: torch.Tensor | None = None
        for i, op in zip(self.op_index, cast(list[Op], self.ops)):
            y = op.weighted(x, weights[i])
            # In place: the running sum is saved by no backward formula (BN's backward needs
            # its input, a product its factors, a sum nothing), so autograd allows it.
            out = y if out is None else out.add_(y)
        assert out is not None
        return out
