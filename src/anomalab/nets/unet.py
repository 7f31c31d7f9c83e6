"""U-Net generator of Skip-GANomaly (Akcay 2019), the pix2pix `UnetGenerator` its official code uses.

`depth` = log2(S) down-sampling stages (num_downs), each Conv(4x4 s2); the bottleneck is 1x1. Channel
widths from the outside in: w, 2w, 4w, 8w, 8w, ... (w = ngf = 64). Down path: LeakyReLU(0.2) ->
Conv -> BN (no activation/BN on the first conv, no BN on the innermost); up path: ReLU -> ConvT(4x4
s2) -> BN, the outermost ConvT ends in tanh. Every stage but the outermost concatenates its input with
its up-sampled output (the skip connection). Images in [-1, 1].
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn


class _Block(nn.Module):
    def __init__(self, outer: int, inner: int, sub: nn.Module | None, outermost: bool = False,
                 in_channels: int | None = None):
        super().__init__()
        in_channels = outer if in_channels is None else in_channels
        down_conv = nn.Conv2d(in_channels, inner, 4, 2, 1, bias=False)
        innermost = sub is None
        up_in = inner if innermost else 2 * inner
        if outermost:
            down = [down_conv]
            up = [nn.ReLU(True), nn.ConvTranspose2d(up_in, outer, 4, 2, 1), nn.Tanh()]
        elif innermost:
            down = [nn.LeakyReLU(0.2, True), down_conv]
            up = [nn.ReLU(True), nn.ConvTranspose2d(up_in, outer, 4, 2, 1, bias=False), nn.BatchNorm2d(outer)]
        else:
            down = [nn.LeakyReLU(0.2, True), down_conv, nn.BatchNorm2d(inner)]
            up = [nn.ReLU(True), nn.ConvTranspose2d(up_in, outer, 4, 2, 1, bias=False), nn.BatchNorm2d(outer)]
        self.model = nn.Sequential(*down, *([sub] if sub is not None else []), *up)
        self.outermost = outermost

    def forward(self, x: Tensor) -> Tensor:
        # As in pix2pix, the first LeakyReLU of a stage acts in place, so the skip carries LeakyReLU(x).
        y = self.model(x)
        return y if self.outermost else torch.cat([x, y], 1)


class UNetGenerator(nn.Module):
    """x (N, C, S, S) in [-1, 1] -> x_hat (N, C, S, S) in [-1, 1]; S a power of two >= 16."""

    def __init__(self, size: int, channels: int, width: int = 64):
        super().__init__()
        depth = round(math.log2(size))
        if size < 16 or 2**depth != size:
            raise ValueError(f"the U-Net needs a power-of-two image size >= 16, got {size}")
        widths = [width * min(2**i, 8) for i in range(depth)]  # inner width of stage i (0 = outermost)
        block = None
        for i in reversed(range(1, depth)):
            block = _Block(widths[i - 1], widths[i], block)
        self.net = _Block(channels, widths[0], block, outermost=True, in_channels=channels)
        self.depth = depth

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x)
