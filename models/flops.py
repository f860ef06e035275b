"""Mult-adds of a network: the size figure the paper gives next to the parameter count.

The rule: the multiply-accumulates of the convolutions and linear layers of one forward pass
on one input at the network's input size, in eval mode (so the auxiliary head, which runs in
training mode only, is excluded). A conv producing an (N, C_out, H', W') map with a
(C_out, C_in / groups, k, k) weight costs N * C_out * H' * W' * (C_in / groups) * k * k; a
linear layer costs in_features * out_features per sample. BN, ReLU, pooling and the
additions of the cell's nodes are not counted, nor are biases.

By this rule DARTS_V2 at 224x224 (ImageNet network, C=48, 14 layers, 1000 classes) costs
529,911,552 mult-adds. The paper reports 574M (DARTS.md, section 7); no rule we know of
reproduces that figure from the released code, so the log names the rule with the number.

The count is taken at the ATen level (``torch.utils.flop_counter.FlopCounterMode``), not with
hooks on ``nn.Conv2d``: the ops of models/ops.py run their convolutions through the kernels of
models/kernels.py (``F.conv2d`` on slices or pixel phases, custom autograd functions), which
forward hooks on the conv modules would not see. Those reformulations compute the same
products, so the count is that of the plain ops.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn as nn
from torch.utils.flop_counter import FlopCounterMode

# The ATen ops of convolutions (nn.Conv2d, F.conv2d) and linear layers (with and without bias).
_COUNTED = (torch.ops.aten.convolution, torch.ops.aten.addmm, torch.ops.aten.mm)

RULE = (
    "mult-adds of convolutions and linear layers at the input size, auxiliary head excluded; "
    "the paper's 574M cannot be reproduced from the released code"
)


def mult_adds(model: nn.Module, input_shape: Sequence[int]) -> int:
    """Mult-adds of one forward pass of ``model`` in eval mode on a zero input of shape
    (1, *input_shape), i.e. (1, C_in, H, W), on the model's device. The model's training mode
    and its state (BN statistics included) are left as they were."""
    param = next(model.parameters(), None)
    device = param.device if param is not None else torch.device("cpu")
    x = torch.zeros(1, *input_shape, device=device)
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad(), FlopCounterMode(display=False) as counter:
            model(x)
    finally:
        model.train(was_training)
    flops = counter.get_flop_counts()["Global"]
    # FlopCounterMode counts a multiply-accumulate as 2 FLOPs.
    return sum(flops.get(op, 0) for op in _COUNTED) // 2
