"""Candidate operations of DARTS (paper, section 3.1.1) and the mixed operation of the supernet.

Every op maps (N, C, H, W) -> (N, C, H/stride, W/stride). ``OPS[name](C, stride, affine)``
builds one; the supernet uses ``affine=False`` BNs, the evaluated network ``affine=True``.

The ops that start with a ReLU (separable and dilated convs, FactorizedReduce) also expose
``forward_relu(x_relu)``: the op applied to an input that is already ReLU'd. The supernet edge
(:class:`MixedOp`) uses it so that the ReLU those ops share is computed, stored for backward and
differentiated once per edge input instead of once per op; the module structure, parameter names
and the ``OPS`` registry are unchanged, so the evaluated network and checkpoints do not notice.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, cast

import torch
import torch.nn as nn
import torch.nn.functional as F

from genotypes import PRIMITIVES

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


def centers_batch(x: torch.Tensor) -> bool:
    """Whether :func:`scaled_batch_norm` centres ``x`` before normalising it: a channels-last
    4-d CPU tensor. PyTorch's channels-last CPU BN kernel adds the N * H * W values of a channel
    one after the other in float32, so its statistics lose digits in proportion to the channel's
    mean over its spread: for a channel of mean 100 and std 1 its output is ~1e-4 off the
    float64 result (NCHW: 3e-7), and the supernet's float32 gradient went from 0.7e-3 (NCHW) to
    2.8e-3 (relative L2, docs/benchmarks.md). BN is shift invariant, so subtracting the batch
    mean (an accurate torch.sum) first changes nothing but the rounding: back to 0.9e-3, for
    about 6% of a weight step."""
    return (
        x.device.type == "cpu"
        and x.dim() == 4
        and x.is_contiguous(memory_format=torch.channels_last)
        and not x.is_contiguous()
    )


def scaled_batch_norm(
    bn: nn.BatchNorm2d,
    x: torch.Tensor,
    scale: torch.Tensor | None = None,
    fresh: bool = False,
) -> torch.Tensor:
    """``scale * bn(x)`` (``bn(x)`` for None), accurate on channels-last CPU tensors too.

    The scale (a 0-dim tensor) is given to F.batch_norm as the affine weight of a BN without
    affine parameters: the supernet's mixing weight w_o of an op ending in BN costs no extra
    pass over the activations, and autograd keeps nothing more for its gradient (w * bn(x)
    would keep bn(x)); BN's backward returns it. Batch statistics of a channels-last CPU tensor
    are taken after centring it (:func:`centers_batch`). The running statistics are updated as
    ``bn(x)`` updates them.

    ``fresh``: ``x`` is a temporary that nothing else holds or saved for backward (the output
    of a conv or a pooling that only this BN reads), so it may be centred in place: no second
    activation-sized tensor, which on the second-order step saved ~1.3 GiB of peak memory.
    """
    weight: torch.Tensor | None = bn.weight
    bias: torch.Tensor | None = bn.bias
    if scale is not None:
        if bn.affine:
            raise ValueError(
                "scaled_batch_norm folds the scale into a BN without affine parameters"
            )
        weight = scale.expand(x.shape[1]).contiguous()  # a stride-0 weight takes a slow kernel
    # nn.BatchNorm2d.forward's bookkeeping, unchanged.
    momentum = 0.0 if bn.momentum is None else bn.momentum
    if bn.training and bn.track_running_stats and bn.num_batches_tracked is not None:
        bn.num_batches_tracked.add_(1)
        momentum = 1.0 / float(bn.num_batches_tracked) if bn.momentum is None else bn.momentum
    training = bn.training or (bn.running_mean is None and bn.running_var is None)
    stats = not bn.training or bn.track_running_stats
    running_mean = bn.running_mean if stats else None
    shift = None
    if training and centers_batch(x):
        with torch.no_grad():
            shift = x.sum((0, 2, 3), keepdim=True).div_(x.numel() // x.shape[1])
        # The gradient of BN with respect to the shift is zero: it is a constant.
        x = x.sub_(shift) if fresh else x - shift
        if running_mean is not None:  # BN updates (and autograd keeps) this one; see below
            running_mean = running_mean.clone()
    out = F.batch_norm(
        x,
        running_mean,
        bn.running_var if stats else None,
        weight,
        bias,
        training,
        momentum,
        bn.eps,
    )
    if shift is not None and running_mean is not None and bn.running_mean is not None:
        with torch.no_grad():  # the copy was updated with the mean of x - shift
            torch.add(running_mean, shift.view(-1), alpha=momentum, out=bn.running_mean)
    return out


class BatchNorm2d(nn.BatchNorm2d):
    """nn.BatchNorm2d (same parameters, buffers and state-dict keys) computed by
    :func:`scaled_batch_norm`: accurate on channels-last CPU tensors."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return scaled_batch_norm(self, x)


class _DenseGrad(torch.autograd.Function):
    """Identity whose backward hands on a dense gradient in the tensor's own memory format.

    A gradient can reach a node as a strided view (a channel slice of the cell output's
    gradient, by torch.cat's backward) or in the other memory format (summed from several
    consumers); native BN's backward on the CPU takes a several times slower path for such a
    gradient. One copy per node here saves it in each of the node's consumers' BNs.
    """

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        ctx.channels_last = x.dim() == 4 and x.is_contiguous(memory_format=torch.channels_last)
        return x.view_as(x)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        fmt = torch.channels_last if ctx.channels_last else torch.contiguous_format
        return grad.contiguous(memory_format=fmt)


def dense_grad(x: torch.Tensor) -> torch.Tensor:
    """``x``, with its gradient made dense in ``x``'s memory format (see :class:`_DenseGrad`)."""
    if not (torch.is_grad_enabled() and x.requires_grad):
        return x
    return cast(torch.Tensor, _DenseGrad.apply(x))


# --------------------------------------------------------------------------------------------
# Depthwise convolution, computed the way oneDNN (PyTorch's CPU conv library) does fastest
# --------------------------------------------------------------------------------------------
# Every formulation below computes exactly the sums of F.conv2d(x, w, stride, padding, dilation,
# groups=C); only the order in which float additions happen may differ (last bits). Measured on
# a 2-core AVX-512 CPU, NHWC, batch 64 (docs/benchmarks.md): the backward of a dilated depthwise
# conv is 5-8x slower than that of a dense one, 40-80x at stride 2, and the weight gradient of a
# kernel wider than 3 columns is ~10x slower than that of a 3-wide one.


class _WideDepthwiseConv(torch.autograd.Function):
    """F.conv2d(x, w, stride, padding, groups=C) for kernels wider than 3 columns, whose weight
    gradient is assembled from column slices of at most 3 (see :func:`_depthwise_weight_grad`).
    The forward and the input gradient are F.conv2d's own. Differentiable twice: the backward
    is made of differentiable ops (the exact Hessian of the Architect goes through it)."""

    @staticmethod
    def forward(  # type: ignore[override]
        ctx: Any, x: torch.Tensor, weight: torch.Tensor, stride: int, padding: int
    ) -> torch.Tensor:
        ctx.save_for_backward(x, weight)
        ctx.stride, ctx.padding = stride, padding
        return F.conv2d(x, weight, None, stride, padding, 1, weight.shape[0])

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor | None, ...]:  # type: ignore[override]
        x, weight = ctx.saved_tensors
        s, p = ctx.stride, ctx.padding
        grad_x = grad_w = None
        if ctx.needs_input_grad[0]:
            grad_x = torch.ops.aten.convolution_backward(
                grad,
                x,
                weight,
                None,
                [s, s],
                [p, p],
                [1, 1],
                False,
                [0, 0],
                weight.shape[0],
                [True, False, False],
            )[0]
        if ctx.needs_input_grad[1]:
            grad_w = _depthwise_weight_grad(grad, x, weight, s, p)
        return grad_x, grad_w, None, None


def _depthwise_weight_grad(
    grad: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, stride: int, padding: int
) -> torch.Tensor:
    """Weight gradient of a depthwise conv, three kernel columns at a time.

    Columns [c0, c1) of the gradient are the weight gradient of the conv of the zero-padded
    input, cropped to start at column c0, with those columns of the kernel and no padding:
    every (output pixel, tap) product of the original appears once. grad: (N, C, H', W').
    """
    kw = weight.shape[-1]
    xp = F.pad(x, (padding,) * 4)
    w_out = grad.shape[-1]
    parts = []
    for c0 in range(0, kw, 3):
        c1 = min(c0 + 3, kw)
        crop = xp[..., c0 : c0 + (w_out - 1) * stride + (c1 - c0)]
        parts.append(
            torch.ops.aten.convolution_backward(
                grad,
                crop,
                weight[..., c0:c1],
                None,
                [stride, stride],
                [0, 0],
                [1, 1],
                False,
                [0, 0],
                weight.shape[0],
                [False, True, False],
            )[1]
        )
    return torch.cat(parts, dim=-1)


def to_phases(x: torch.Tensor) -> torch.Tensor:
    """(N, C, H, W) -> (4N, C, H/2, W/2), channels-last: the four pixel phases (row parity p,
    column parity q) stacked on the batch, phase (p, q) at batch rows (2p + q) * N + n.
    One copy. H and W must be even."""
    N, C, H, W = x.shape
    nhwc = x.permute(0, 2, 3, 1).reshape(N, H // 2, 2, W // 2, 2, C)
    phases = nhwc.permute(2, 4, 0, 1, 3, 5).reshape(4 * N, H // 2, W // 2, C)
    return phases.permute(0, 3, 1, 2)


def from_phases(y: torch.Tensor) -> torch.Tensor:
    """The inverse of :func:`to_phases`: (4N, C, h, w) -> (N, C, 2h, 2w), channels-last."""
    N4, C, h, w = y.shape
    N = N4 // 4
    nhwc = y.permute(0, 2, 3, 1).reshape(2, 2, N, h, w, C).permute(2, 3, 0, 4, 1, 5)
    return nhwc.reshape(N, 2 * h, 2 * w, C).permute(0, 3, 1, 2)


def phases_apply(x: torch.Tensor, stride: int) -> bool:
    """Whether a dilation-2 depthwise conv of ``x`` at ``stride`` runs on pixel phases."""
    return stride == 1 and x.device.type == "cpu" and x.shape[-1] % 2 == x.shape[-2] % 2 == 0


def depthwise_conv2d(
    x: torch.Tensor, weight: torch.Tensor, stride: int, padding: int, dilation: int
) -> torch.Tensor:
    """F.conv2d(x, weight, None, stride, padding, dilation, groups=C): (N, C, H, W) ->
    (N, C, H', W'), weight (C, 1, k, k), by the fastest equivalent formulation.

    A dilation-2 conv with "same" padding (padding = k - 1) only ever combines pixels of one
    parity. At stride 2 it reads only the even pixels: it is the dense conv (padding (k-1)/2)
    of x[:, :, ::2, ::2]. At stride 1 (CPU, even H, W) it is the dense conv of each of the four
    pixel phases (:func:`to_phases`). On the CPU a kernel wider than 3 takes the custom weight
    gradient of :class:`_WideDepthwiseConv`.
    """
    k = weight.shape[-1]
    if dilation == 2 and padding == k - 1 and k % 2:
        if stride == 2:
            x, stride, padding, dilation = x[:, :, ::2, ::2], 1, (k - 1) // 2, 1
        elif phases_apply(x, stride):
            return from_phases(depthwise_conv2d(to_phases(x), weight, 1, (k - 1) // 2, 1))
    if dilation == 1 and weight.shape[-1] > 3 and x.device.type == "cpu":
        if not torch.is_autocast_enabled(x.device.type):
            return cast(torch.Tensor, _WideDepthwiseConv.apply(x, weight, stride, padding))
    return F.conv2d(x, weight, None, stride, padding, dilation, weight.shape[0])


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
