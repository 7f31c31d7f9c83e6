"""DCGAN building blocks (Radford 2016) as used by GANomaly's official code (Akcay 2018) and AnoGAN.

All three nets work on square images of a power-of-two size S >= 16 with any channel count, scaled to
[-1, 1] (the decoder ends in tanh). `width` is the official `ngf` / `ndf` (64).

- `DCEncoder`: Conv(C -> w, 4x4 s2) + LeakyReLU(0.2), then Conv(4x4 s2) + BN + LeakyReLU(0.2) stages
  doubling the channels until the map is 4x4, then a Conv(4x4, valid) head to `out_dim` x 1 x 1.
- `DCDecoder`: the mirror image: ConvT(4x4) 1x1 -> 4x4, ConvT(4x4 s2) + BN + ReLU stages halving the
  channels, ConvT(4x4 s2) to C channels and tanh.
- `DCDiscriminator`: a `DCEncoder` with a one-logit head; returns (logit, features) where features
  are the last 4x4 map before the head (the f(.) of feature matching and of AnoGAN's Dl).
"""

from __future__ import annotations

import math

from torch import Tensor, nn


def check_size(size: int) -> int:
    if size < 16 or 2 ** round(math.log2(size)) != size:
        raise ValueError(f"DCGAN nets need a power-of-two image size >= 16, got {size}")
    return size


def dcgan_init(module: nn.Module) -> None:
    """DCGAN initialisation (official GANomaly `weights_init`): conv weights N(0, 0.02), BatchNorm
    weights N(1, 0.02) and biases 0. Apply with `net.apply(dcgan_init)`."""
    if isinstance(module, (nn.Conv2d, nn.ConvTranspose2d, nn.Linear)):
        nn.init.normal_(module.weight, 0.0, 0.02)
        if module.bias is not None:
            nn.init.zeros_(module.bias)
    elif isinstance(module, (nn.BatchNorm2d, nn.BatchNorm1d)):
        nn.init.normal_(module.weight, 1.0, 0.02)
        nn.init.zeros_(module.bias)


class DCEncoder(nn.Module):
    """x (N, C, S, S) -> (N, out_dim, 1, 1); `features(x)` -> (N, feature_channels, 4, 4)."""

    def __init__(self, size: int, channels: int, out_dim: int, width: int = 64):
        super().__init__()
        check_size(size)
        layers: list[nn.Module] = [nn.Conv2d(channels, width, 4, 2, 1, bias=False), nn.LeakyReLU(0.2, True)]
        s, c = size // 2, width
        while s > 4:
            layers += [nn.Conv2d(c, 2 * c, 4, 2, 1, bias=False), nn.BatchNorm2d(2 * c), nn.LeakyReLU(0.2, True)]
            s, c = s // 2, 2 * c
        self.features = nn.Sequential(*layers)
        self.head = nn.Conv2d(c, out_dim, 4, 1, 0, bias=False)
        self.feature_channels = c

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.features(x))


class DCDecoder(nn.Module):
    """z (N, in_dim) or (N, in_dim, 1, 1) -> x (N, C, S, S) in [-1, 1]."""

    def __init__(self, size: int, channels: int, in_dim: int, width: int = 64):
        super().__init__()
        check_size(size)
        c = width * size // 8  # channels of the 4x4 map (the official `cngf`)
        layers: list[nn.Module] = [nn.ConvTranspose2d(in_dim, c, 4, 1, 0, bias=False), nn.BatchNorm2d(c),
                                   nn.ReLU(True)]
        s = 4
        while s < size // 2:
            layers += [nn.ConvTranspose2d(c, c // 2, 4, 2, 1, bias=False), nn.BatchNorm2d(c // 2), nn.ReLU(True)]
            s, c = 2 * s, c // 2
        layers += [nn.ConvTranspose2d(c, channels, 4, 2, 1, bias=False), nn.Tanh()]
        self.main = nn.Sequential(*layers)
        self.in_dim = in_dim

    def forward(self, z: Tensor) -> Tensor:
        return self.main(z.reshape(-1, self.in_dim, 1, 1))


class DCDiscriminator(nn.Module):
    """x (N, C, S, S) in [-1, 1] -> (logit (N,), features (N, F, 4, 4)); sigmoid(logit) = P(real)."""

    def __init__(self, size: int, channels: int, width: int = 64):
        super().__init__()
        body = DCEncoder(size, channels, 1, width)
        self.features, self.head = body.features, body.head

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        f = self.features(x)
        return self.head(f).reshape(-1), f
