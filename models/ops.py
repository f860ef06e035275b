"""Candidate operations of DARTS (paper, section 3.1.1) and the mixed operation of the supernet.

Every op maps (N, C, H, W) -> (N, C, H/stride, W/stride). ``OPS[name](C, stride, affine)``
builds one; the supernet uses ``affine=False`` BNs, the evaluated network ``affine=True``.

The ops that start with a ReLU (separable and dilated convs, FactorizedReduce) also expose
``forward_relu(x_relu)``: the op applied to an input that is already ReLU'd. The supernet edge
(:class:`MixedOp`) uses it so that the ReLU those ops share is computed, stored for backward and
differentiated once per edge input instead of once per op; the module structure, parameter names
and the ``OPS`` registry are unchanged, so the evaluated network and checkpoints do not notice.
The kernels these use (BN with a folded scale, depthwise convs on pixel phases) live in
models/kernels.py, each with a plain twin it is tested against.
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
    depthwise_conv2d,
    from_phases,
    phases_apply,
    scaled_batch_norm,
    to_phases,
)

OPS: dict[str, Callable[[int, int, bool], nn.Module]] = {
    "none": lambda C, stride, affine: Zero(stride),
    "avg_pool_3x3": lambda C, stride, affine: nn.AvgPool2d(
        3, stride=stride, padding=1, count_include_pad=False
    ),
    "max_pool_3x3": lambda C, stride, affine: nn.MaxPool2d(3, stride=stride, padding=1),
    "skip_connect": lambda C, stride, affine: (
        nn.Identity() if stride == 1 else FactorizedReduce(C, C, affine=affine)
    ),
    "sep_conv_3x3": lambda C, stride, affine: SepConv(C, C, 3, stride, 1, affine=affine),
    "sep_conv_5x5": lambda C, stride, affine: SepConv(C, C, 5, stride, 2, affine=affine),
    "dil_conv_3x3": lambda C, stride, affine: DilConv(C, C, 3, stride, 2, 2, affine=affine),
    "dil_conv_5x5": lambda C, stride, affine: DilConv(C, C, 5, stride, 4, 2, affine=affine),
}
assert set(OPS) == set(PRIMITIVES), "OPS and genotypes.PRIMITIVES must name the same ops"


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
            nn.ReLU(),
            nn.Conv2d(C_in, C_out, kernel_size, stride, padding, bias=False),
            BatchNorm2d(C_out, affine=affine),
        )


class DilConv(nn.Sequential):
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
        return self.forward_relu(self[0](x))

    def forward_relu(
        self,
        x_relu: torch.Tensor,
        scale: torch.Tensor | None = None,
        phases: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """``scale *`` the block without its leading ReLU: x_relu = relu(x). ``phases``:
        to_phases(x_relu), if the caller has it (it is shared by every dilated conv of a node).
        """
        dw, pw, bn = cast(nn.Conv2d, self[1]), self[2], cast(nn.BatchNorm2d, self[3])
        k, stride, dilation = dw.kernel_size[0], dw.stride[0], dw.dilation[0]
        padding = cast(tuple[int, int], dw.padding)[0]
        if dilation == 2 and padding == k - 1 and k % 2 and phases_apply(x_relu, stride):
            # The whole block on the pixel phases (see depthwise_conv2d): the pointwise conv
            # acts per pixel and BN's statistics run over all N * H * W pixels either way, so
            # the phases are reassembled once, at the end.
            if phases is None:
                phases = to_phases(x_relu)
            h = depthwise_conv2d(phases, dw.weight, 1, (k - 1) // 2, 1)
            out = from_phases(scaled_batch_norm(bn, pw(h), scale, fresh=True))  # channels-last
            if not x_relu.is_contiguous(memory_format=torch.channels_last):
                out = out.contiguous()  # an NCHW network stays NCHW
            return out
        h = depthwise_conv2d(x_relu, dw.weight, stride, padding, dilation)
        return scaled_batch_norm(bn, pw(h), scale, fresh=True)


class SepConv(nn.Sequential):
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

    def forward_relu(self, x_relu: torch.Tensor, scale: torch.Tensor | None = None) -> torch.Tensor:
        """``scale *`` the op without its leading ReLU: x_relu = relu(x)."""
        first, second = cast(DilConv, self[0]), cast(DilConv, self[1])
        return second.forward_relu(second[0](first.forward_relu(x_relu)), scale)


class FactorizedReduce(nn.Module):
    """Halve H and W without losing pixels: two 1x1 stride-2 convs, the second on the input
    shifted by one pixel, concatenated. (N, C_in, H, W) -> (N, C_out, ceil(H/2), ceil(W/2))."""

    def __init__(self, C_in: int, C_out: int, affine: bool = True) -> None:
        super().__init__()
        if C_out % 2:
            raise ValueError(f"FactorizedReduce needs an even number of channels, got {C_out}")
        self.relu = nn.ReLU()
        self.conv1 = nn.Conv2d(C_in, C_out // 2, 1, stride=2, bias=False)
        self.conv2 = nn.Conv2d(C_in, C_out // 2, 1, stride=2, bias=False)
        self.bn = BatchNorm2d(C_out, affine=affine)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_relu(self.relu(x))

    def forward_relu(self, x: torch.Tensor, scale: torch.Tensor | None = None) -> torch.Tensor:
        """``scale *`` the op without its leading ReLU: x = relu(input)."""
        # A 1x1 conv at stride 2 reads the even pixels only: it is the 1x1 conv of
        # x[:, :, ::2, ::2] (oneDNN's strided 1x1 backward is several times slower). The second
        # branch reads the odd pixels, padded right/bottom with zeros to ceil(H/2) x ceil(W/2)
        # for odd H, W (the pixels the shifted-by-one input padded with one zero row gives).
        H, W = x.shape[-2:]
        even = x[:, :, ::2, ::2]
        odd = F.pad(x[:, :, 1::2, 1::2], (0, W % 2, 0, H % 2))
        h = torch.cat([F.conv2d(even, self.conv1.weight), F.conv2d(odd, self.conv2.weight)], dim=1)
        return scaled_batch_norm(self.bn, h, scale, fresh=True)


# The ops that begin with a ReLU and take ``forward_relu(relu(x), ...)``: the cells compute
# relu(state) once for all of them.
RELU_FIRST = (SepConv, DilConv, FactorizedReduce)


class Zero(nn.Module):
    """The `none` op. Only used where a zero tensor is really needed: MixedOp skips it."""

    def __init__(self, stride: int) -> None:
        super().__init__()
        self.stride = stride

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x[:, :, :: self.stride, :: self.stride].mul(0.0)


class MixedOp(nn.Module):
    """One supernet edge: ``sum_o softmax(alpha)_o * o(x)`` over all primitives (eq. 2).

    The `none` op adds nothing to the sum, so it is not computed at all; its alpha still gets a
    gradient through the softmax that produced the other weights. Pooling ops are followed by a
    non-affine BN in the supernet only (their outputs are not normalised otherwise).

    How each op is evaluated (same values, fewer passes over memory): the ops that begin with
    a ReLU get relu(x) computed once (by the caller, which shares it between the edges leaving
    one node, or here); every op that ends in a non-affine BN (all but the identity) has its
    weight w_o folded into that BN (:func:`scaled_batch_norm`).
    """

    def __init__(self, C: int, stride: int) -> None:
        super().__init__()
        self.stride = stride
        self.ops = nn.ModuleList()
        self.op_index: list[int] = []  # column of the alphas each module belongs to
        # "dil"/"relu": op.forward_relu (with/without phases); "pool": pool, then BN; "plain"
        self.kind: list[str] = []
        for i, name in enumerate(PRIMITIVES):
            if name == "none":
                continue
            op = OPS[name](C, stride, False)
            if "pool" in name:
                op = nn.Sequential(op, BatchNorm2d(C, affine=False))
            self.ops.append(op)
            self.op_index.append(i)
            if isinstance(op, DilConv):
                self.kind.append("dil")
            elif isinstance(op, RELU_FIRST):
                self.kind.append("relu")
            else:
                self.kind.append("pool" if "pool" in name else "plain")

    def forward(
        self,
        x: torch.Tensor,
        weights: torch.Tensor,
        x_relu: torch.Tensor | None = None,
        relu_phases: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """x: (N, C, H, W); weights: (n_primitives,) softmax weights of this edge; x_relu and
        relu_phases: relu(x) and to_phases(relu(x)), if the caller has them.
        Returns (N, C, H/stride, W/stride)."""
        if x_relu is None:
            x_relu = torch.relu(x)
        out: torch.Tensor | None = None
        for i, op, kind in zip(self.op_index, self.ops, self.kind):
            w = weights[i]
            if kind == "dil":
                y = op.forward_relu(x_relu, w, relu_phases)  # type: ignore[operator]
            elif kind == "relu":
                y = op.forward_relu(x_relu, w)  # type: ignore[operator]
            elif kind == "pool":
                pool, bn = op[0], cast(nn.BatchNorm2d, op[1])  # type: ignore[index]
                y = scaled_batch_norm(bn, pool(x), w, fresh=True)
            else:
                y = w * op(x)
            # In place: the running sum is saved by no backward formula (BN's backward needs
            # its input, a product its factors, a sum nothing), so autograd allows it.
            out = y if out is None else out.add_(y)
        assert out is not None
        return out
