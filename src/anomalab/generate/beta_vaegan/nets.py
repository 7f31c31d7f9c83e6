"""Networks for 64x64 images (dSprites): the beta-VAE encoder/decoder of Burgess et al. 2018
("Understanding disentangling in beta-VAE", appendix A.1) and a label-conditioned discriminator.

Encoder: 4 x [Conv 32, 4x4, stride 2, ReLU] (64 -> 4), FC 256, FC 256, FC 2k (mean, log-variance).
Decoder: the mirror, FC 256, FC 256, FC 32*4*4, 4 x ConvTranspose 4x4 stride 2, logits out.
Discriminator D(x, y): the label y is broadcast as an extra input channel (conditional GAN, Mirza 2014);
Conv 32/32/64 (4x4, stride 2, LeakyReLU 0.2) give the intermediate features f(x, y) (64 x 8 x 8) used
for the feature-space reconstruction (VAEGAN, Larsen 2016), then Conv 64 and a linear logit.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn


class Encoder64(nn.Module):
    """x (N, C, 64, 64) -> (mean, logvar), each (N, latent_dim)."""

    def __init__(self, channels: int = 1, latent_dim: int = 5, hidden: int = 256):
        super().__init__()
        layers: list[nn.Module] = []
        c = channels
        for _ in range(4):
            layers += [nn.Conv2d(c, 32, 4, 2, 1), nn.ReLU()]
            c = 32
        self.conv = nn.Sequential(*layers)
        self.fc = nn.Sequential(nn.Flatten(), nn.Linear(32 * 4 * 4, hidden), nn.ReLU(),
                                nn.Linear(hidden, hidden), nn.ReLU())
        self.head = nn.Linear(hidden, 2 * latent_dim)
        self.latent_dim = latent_dim

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        mean, logvar = self.head(self.fc(self.conv(x))).chunk(2, dim=1)
        return mean, logvar


class Decoder64(nn.Module):
    """z (N, latent_dim) -> logits (N, C, 64, 64); images are sigmoid(logits)."""

    def __init__(self, channels: int = 1, latent_dim: int = 5, hidden: int = 256):
        super().__init__()
        self.fc = nn.Sequential(nn.Linear(latent_dim, hidden), nn.ReLU(), nn.Linear(hidden, hidden), nn.ReLU(),
                                nn.Linear(hidden, 32 * 4 * 4), nn.ReLU())
        layers: list[nn.Module] = []
        for _ in range(3):
            layers += [nn.ConvTranspose2d(32, 32, 4, 2, 1), nn.ReLU()]
        layers.append(nn.ConvTranspose2d(32, channels, 4, 2, 1))
        self.deconv = nn.Sequential(*layers)
        self.latent_dim = latent_dim

    def forward(self, z: Tensor) -> Tensor:
        return self.deconv(self.fc(z).view(-1, 32, 4, 4))


class Discriminator64(nn.Module):
    """D(x (N, C, 64, 64), y (N,) in {0, 1}) -> logit (N,); `features(x, y)` -> f (N, 64*8*8)."""

    def __init__(self, channels: int = 3):
        super().__init__()
        act = nn.LeakyReLU(0.2)
        self.body = nn.Sequential(nn.Conv2d(channels + 1, 32, 4, 2, 1), act, nn.Conv2d(32, 32, 4, 2, 1), act,
                                  nn.Conv2d(32, 64, 4, 2, 1), act)
        self.head = nn.Sequential(nn.Conv2d(64, 64, 4, 2, 1), act, nn.Flatten(), nn.Linear(64 * 4 * 4, 1))

    def _input(self, x: Tensor, y: Tensor) -> Tensor:
        label = y.to(x.dtype).view(-1, 1, 1, 1).expand(-1, 1, *x.shape[2:])
        return torch.cat([x, label], dim=1)

    def features(self, x: Tensor, y: Tensor) -> Tensor:
        return self.body(self._input(x, y)).flatten(1)

    def forward(self, x: Tensor, y: Tensor) -> tuple[Tensor, Tensor]:
        """-> (logit (N,), features (N, F))."""
        h = self.body(self._input(x, y))
        return self.head(h).squeeze(1), h.flatten(1)
