"""CPU speed (and accuracy) kernels of the models, apart from the paper's ops that call them.

Each function here computes what a plain PyTorch expression computes (its "plain twin");
only the order of float additions may differ (the last bits). tests/test_ops.py checks each
against its twin, in float64 (values and gradients):

- batch norm: :func:`scaled_batch_norm` = ``scale * bn(x)``, with the batch centred first on
  channels-last CPU tensors (:func:`centers_batch`), and :class:`BatchNorm2d` =
  ``nn.BatchNorm2d`` computed by it (test_scaled_batch_norm_*,
  test_batch_norm_is_accurate_on_channels_last_cpu_tensors);
- gradient layout: :func:`dense_grad` = ``x`` with a dense gradient
  (test_dense_grad_is_the_identity_with_a_dense_gradient);
- depthwise convolution: :func:`depthwise_conv2d` = ``F.conv2d(x, w, ..., groups=C)``, on the
  pixel phases of a dilated conv (:func:`to_phases`, :func:`from_phases`, :func:`phases_apply`)
  and with a weight gradient of its own (in column slices of the zero-padded input) for kernels
  wider than 3 and maps smaller than the kernel (:class:`_DepthwiseConv`,
  :func:`_depthwise_weight_grad`) (test_depthwise_conv2d_equals_conv2d, test_phases_round_trip,
  test_depthwise_conv_is_twice_differentiable).

Nothing here knows about DARTS: models/ops.py and the networks import from this module, never
the other way round.

**One switch** (``--kernels`` of the scripts, :func:`set_kernels`) chooses between these
formulations and their plain twins: ``plain`` computes every function here by its twin (no
centring, no pixel phases, no custom weight gradient, no gradient copy); ``fast`` takes the
formulations above on every device; ``auto`` (the default) takes them on CPU tensors, where they
were measured to pay, and the plain twins elsewhere (CUDA). :func:`fast_kernels` says which
applies to a tensor. The plain path is the reference the fast one is tested against.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any, NamedTuple, cast

import torch
import torch.nn as nn
import torch.nn.functional as F

# --------------------------------------------------------------------------------------------
# The switch
# --------------------------------------------------------------------------------------------
KERNEL_MODES = ("auto", "fast", "plain")
_mode = "auto"


def set_kernels(mode: str) -> None:
    """Choose the formulations of this module for the whole process: auto | fast | plain."""
    global _mode
    if mode not in KERNEL_MODES:
        raise ValueError(f"kernels must be one of {', '.join(KERNEL_MODES)}, got {mode!r}")
    _mode = mode


def get_kernels() -> str:
    return _mode


@contextlib.contextmanager
def use_kernels(mode: str) -> Iterator[None]:
    """Within the block, :func:`set_kernels` ``mode``; the previous mode afterwards."""
    previous = _mode
    set_kernels(mode)
    try:
        yield
    finally:
        set_kernels(previous)


def fast_kernels(x: torch.Tensor) -> bool:
    """Whether the fast formulations apply to ``x``: ``fast``, or ``auto`` on a CPU tensor."""
    return _mode == "fast" or (_mode == "auto" and x.device.type == "cpu")


_stats_frozen = False


@contextlib.contextmanager
def running_stats_frozen() -> Iterator[None]:
    """Within the block the BNs of this module (:func:`scaled_batch_norm`,
    :class:`BatchNorm2d`) leave their running statistics and batch counter untouched. In
    training mode a BN normalises by the batch's statistics either way, so every value and
    gradient is what it would be: only the update of the buffers is left out. The Architect's
    extra passes run so, instead of saving and restoring every buffer of the supernet."""
    global _stats_frozen
    previous = _stats_frozen
    _stats_frozen = True
    try:
        yield
    finally:
        _stats_frozen = previous


_batches_counted = False


class _StatsUpdate(NamedTuple):
    """What a centred BN call in training mode owes its running statistics."""

    bn: nn.BatchNorm2d
    shift: torch.Tensor  # (1, C, 1, 1): the centring shift, subtracted before the BN
    mean: torch.Tensor  # (C,): the BN's batch mean (of the centred batch)
    invstd: torch.Tensor  # (C,): the BN's 1 / sqrt(biased variance + eps)
    n: int  # values per channel
    momentum: float


# Within bookkept(): the updates of the centred BNs, made at its end.
_deferred: list[_StatsUpdate] | None = None


@contextlib.contextmanager
def bookkept(module: nn.Module) -> Iterator[None]:
    """The BN bookkeeping of a forward pass of ``module`` within the block (in which each BN
    runs once), in a few calls for all BNs instead of a few per BN:

    - the batch counter (``num_batches_tracked``) of every BN in training mode gets its 1 now,
      in one call;
    - the running statistics of the BNs that :func:`scaled_batch_norm` centres
      (:func:`centers_batch`) are updated at the end of the block, together, from the batch
      statistics their BN calls returned (:func:`_update_running_stats`).

    Counters and statistics end as each BN's own updates would leave them (the statistics up
    to the rounding of the last bits)."""
    global _batches_counted, _deferred
    counters = [
        m.num_batches_tracked
        for m in module.modules()
        if isinstance(m, nn.BatchNorm2d)
        and m.training
        and m.track_running_stats
        and m.num_batches_tracked is not None
    ]
    if _stats_frozen or not counters:
        yield
        return
    torch._foreach_add_(counters, 1)
    previous = _batches_counted, _deferred
    _batches_counted, _deferred = True, []
    try:
        yield
        _update_running_stats(_deferred)
    finally:
        _batches_counted, _deferred = previous


def _update_running_stats(updates: list[_StatsUpdate]) -> None:
    """What each BN call in training mode does to its running statistics, for many BNs at
    once: running = (1 - m) running + m batch, where the batch mean is the centring shift plus
    the mean the BN computed (of the centred batch) and the batch variance is the unbiased
    one, from the BN's inverse standard deviation."""
    if not updates:
        return
    bns = [u.bn for u in updates]
    sizes = [bn.num_features for bn in bns]
    with torch.no_grad():
        shifts = torch.cat([u.shift for u in updates], 1).view(-1)
        means = list(shifts.add_(torch.cat([u.mean for u in updates])).split(sizes))
        var = torch.cat([u.invstd for u in updates]).pow_(-2).split(sizes)
        torch._foreach_sub_(var, [bn.eps for bn in bns])  # the biased variance
        torch._foreach_mul_(var, [u.n / max(u.n - 1, 1) for u in updates])  # unbiased
        momenta = [u.momentum for u in updates]
        running_means = [cast(torch.Tensor, bn.running_mean) for bn in bns]
        running_vars = [cast(torch.Tensor, bn.running_var) for bn in bns]
        for running, batch in ((running_means, means), (running_vars, list(var))):
            torch._foreach_mul_(running, [1.0 - m for m in momenta])
            torch._foreach_mul_(batch, momenta)
            torch._foreach_add_(running, batch)


# --------------------------------------------------------------------------------------------
# Batch norm, accurate on channels-last CPU tensors, with an optional scale folded in
# --------------------------------------------------------------------------------------------


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
        fast_kernels(x)
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

    The scale (a 0-dim tensor, or one per channel) is given to F.batch_norm as the affine
    weight of a BN without affine parameters: the supernet's mixing weight w_o of an op ending
    in BN costs no extra pass over the activations, and autograd keeps nothing more for its
    gradient (w * bn(x) would keep bn(x)); BN's backward returns it. Batch statistics of a
    channels-last CPU tensor are taken after centring it (:func:`centers_batch`). The running
    statistics are updated as ``bn(x)`` updates them.

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
        if scale.dim() == 1:  # one scale per channel (C,)
            weight = scale
        else:
            weight = scale.expand(x.shape[1]).contiguous()  # stride 0 takes a slow kernel
    # nn.BatchNorm2d.forward's bookkeeping, unchanged (none within running_stats_frozen()).
    momentum = 0.0 if bn.momentum is None else bn.momentum
    frozen = _stats_frozen and bn.training
    if bn.training and bn.track_running_stats and bn.num_batches_tracked is not None and not frozen:
        if not _batches_counted:
            bn.num_batches_tracked.add_(1)
        momentum = 1.0 / float(bn.num_batches_tracked) if bn.momentum is None else bn.momentum
    training = bn.training or (bn.running_mean is None and bn.running_var is None)
    stats = (not bn.training or bn.track_running_stats) and not frozen
    running_mean = bn.running_mean if stats else None
    shift = None
    if training and centers_batch(x):
        with torch.no_grad():
            shift = x.mean((0, 2, 3), keepdim=True)
        # The gradient of BN with respect to the shift is zero: it is a constant.
        x = x.sub_(shift) if fresh else x - shift
        if running_mean is not None and _deferred is not None:
            # Within bookkept(): the statistics are updated at its end, with all others.
            out, mean, invstd = torch.native_batch_norm(
                x, weight, bias, None, None, True, momentum, bn.eps
            )
            _deferred.append(
                _StatsUpdate(bn, shift, mean, invstd, x.numel() // x.shape[1], momentum)
            )
            return out
        if running_mean is not None:  # BN updates (and autograd keeps) this one; see below
            running_mean = running_mean.clone()
    running_var = bn.running_var if stats else None
    if fast_kernels(x) and x.device.type == "cpu":
        # What F.batch_norm calls on the CPU, without its extra calls (a reserve tensor)
        out = torch.native_batch_norm(
            x, weight, bias, running_mean, running_var, training, momentum, bn.eps
        )[0]
    else:
        out = F.batch_norm(x, running_mean, running_var, weight, bias, training, momentum, bn.eps)
    if shift is not None and running_mean is not None and bn.running_mean is not None:
        with torch.no_grad():  # the copy was updated with the mean of x - shift
            torch.add(running_mean, shift.view(-1), alpha=momentum, out=bn.running_mean)
    return out


class BatchNorm2d(nn.BatchNorm2d):
    """nn.BatchNorm2d (same parameters, buffers and state-dict keys) computed by
    :func:`scaled_batch_norm`: accurate on channels-last CPU tensors."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return scaled_batch_norm(self, x)


# --------------------------------------------------------------------------------------------
# ReLU
# --------------------------------------------------------------------------------------------


def relu(x: torch.Tensor) -> torch.Tensor:
    """``torch.relu(x)``, the same values and gradient (zero where x <= 0), by F.threshold: its
    backward reads its input, where relu's reads its output, which autograd saves with one
    more call (a detach) per ReLU. (The same calls on every device: not behind the switch.)"""
    return F.threshold(x, 0.0, 0.0)


class ReLU(nn.ReLU):
    """nn.ReLU computed by :func:`relu`."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return relu(x)


# --------------------------------------------------------------------------------------------
# Gradient layout
# --------------------------------------------------------------------------------------------


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
    if not (torch.is_grad_enabled() and x.requires_grad and fast_kernels(x)):
        return x
    return cast(torch.Tensor, _DenseGrad.apply(x))


# --------------------------------------------------------------------------------------------
# Depthwise convolution, computed the way oneDNN (PyTorch's CPU conv library) does fastest
# --------------------------------------------------------------------------------------------
# Every formulation below computes exactly the sums of F.conv2d(x, w, stride, padding, dilation,
# groups=C); only the order in which float additions happen may differ (last bits). Measured on
# a 2-core AVX-512 CPU, NHWC, batch 64 (docs/benchmarks.md): the backward of a dilated depthwise
# conv is 5-8x slower than that of a dense one, 40-80x at stride 2, and the weight gradient of a
# kernel wider than 3 columns is ~10x slower than that of a 3-wide one. oneDNN's weight gradient
# of a 3x3 conv (padding 1) is slow on maps smaller than the kernel too: 6.6 ms on 64x256x2x2
# against 0.21 ms taken on the zero-padded input with no padding, 17 ms against 3.5 ms on
# 256x256x1x1 (the pixel phases of a 2x2 map; at 3x3 and larger maps oneDNN's is the faster).


def _own_weight_grad(x: torch.Tensor, k: int, stride: int, padding: int) -> bool:
    """Whether a depthwise conv (k x k, dilation 1) takes :class:`_DepthwiseConv`'s weight
    gradient: for a kernel wider than 3, or an output map smaller than the kernel."""
    h_out, w_out = ((n + 2 * padding - k) // stride + 1 for n in x.shape[-2:])
    return k > 3 or min(h_out, w_out) < k


class _DepthwiseConv(torch.autograd.Function):
    """F.conv2d(x, w, stride, padding, groups=C) whose weight gradient is assembled from column
    slices of at most 3 of the zero-padded input (see :func:`_depthwise_weight_grad`), where
    oneDNN's own is slow (:func:`_own_weight_grad`). The forward and the input gradient are
    F.conv2d's own. Differentiable twice: the backward is made of differentiable ops (the exact
    Hessian of the Architect goes through it)."""

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


def to_phases(x: torch.Tensor, channels_last: bool = False) -> torch.Tensor:
    """(N, C, H, W) -> (4N, C, H/2, W/2), channels-last: the four pixel phases (row parity p,
    column parity q) stacked on the batch, phase (p, q) at batch rows (2p + q) * N + n.
    One copy. H and W must be even. ``channels_last``: x is given as (N, H, W, C)."""
    if channels_last:
        N, H, W, C = x.shape
        nhwc = x.reshape(N, H // 2, 2, W // 2, 2, C)
    else:
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


class _PhasesAsImages(torch.autograd.Function):
    """The view of :func:`phases_as_images`, whose backward is the inverse view (autograd's own
    backward of as_strided fills a zero tensor and copies the gradient into it)."""

    @staticmethod
    def forward(ctx: Any, y: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        N4, C, h, w = y.shape
        if not y.is_contiguous(memory_format=torch.channels_last):
            raise ValueError("phases_as_images needs a dense channels-last tensor")
        ctx.shape = y.shape
        H, W = 2 * h, 2 * w
        return y.as_strided((N4 // 4, C, H, W), (H * W * C, 1, W * C, C))

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        N4, C, h, w = ctx.shape
        grad = grad.contiguous(memory_format=torch.channels_last)
        return grad.as_strided((N4, C, h, w), (h * w * C, 1, w * C, C))


def phases_as_images(y: torch.Tensor) -> torch.Tensor:
    """(4N, C, h, w), channels-last and dense (:func:`to_phases`' layout) -> (N, C, 2h, 2w): the
    same memory read as N images of 2h x 2w pixels, no copy. Each channel holds the same
    values, its pixels in phase order rather than the image's: for ops that treat every pixel
    of a channel alike (1x1 convs, batch norm, sums over pixels) a stand-in for
    :func:`from_phases`, whose copy it saves; the pixel (p, q, n, i, j) of the phases is the
    pixel (n, 2i + p, 2j + q) of the image."""
    return cast(torch.Tensor, _PhasesAsImages.apply(y))


def phases_apply(x: torch.Tensor, stride: int) -> bool:
    """Whether a dilation-2 depthwise conv of ``x`` at ``stride`` runs on pixel phases."""
    return stride == 1 and fast_kernels(x) and x.shape[-1] % 2 == x.shape[-2] % 2 == 0


def depthwise_conv2d(
    x: torch.Tensor, weight: torch.Tensor, stride: int, padding: int, dilation: int
) -> torch.Tensor:
    """F.conv2d(x, weight, None, stride, padding, dilation, groups=C): (N, C, H, W) ->
    (N, C, H', W'), weight (C, 1, k, k), by the fastest equivalent formulation.

    A dilation-2 conv with "same" padding (padding = k - 1) only ever combines pixels of one
    parity. At stride 2 it reads only the even pixels: it is the dense conv (padding (k-1)/2)
    of x[:, :, ::2, ::2]. At stride 1 (CPU, even H, W) it is the dense conv of each of the four
    pixel phases (:func:`to_phases`). On the CPU a kernel wider than 3, or a map smaller than
    the kernel, takes the weight gradient of :class:`_DepthwiseConv`.
    """
    k = weight.shape[-1]
    if not fast_kernels(x):
        return F.conv2d(x, weight, None, stride, padding, dilation, weight.shape[0])
    if dilation == 2 and padding == k - 1 and k % 2:
        if stride == 2:
            x, stride, padding, dilation = x[:, :, ::2, ::2], 1, (k - 1) // 2, 1
        elif phases_apply(x, stride):
            return from_phases(depthwise_conv2d(to_phases(x), weight, 1, (k - 1) // 2, 1))
    if dilation == 1 and _own_weight_grad(x, weight.shape[-1], stride, padding):
        if not torch.is_autocast_enabled(x.device.type):
            return cast(torch.Tensor, _DepthwiseConv.apply(x, weight, stride, padding))
    return F.conv2d(x, weight, None, stride, padding, dilation, weight.shape[0])
