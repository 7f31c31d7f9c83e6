"""BiGAN nets of EGBAD's MNIST model (Zenati et al. 2018, official code; docs/detectors/egbad.md).

Images (N, C, H, W) in [-1, 1] with H, W divisible by 4 (MNIST: 28x28x1); `h, w` below = H/4, W/4.
- encoder E: conv32 3x3 s1 / conv64 3x3 s2 + BN / conv128 3x3 s2 + BN (LeakyReLU 0.1) / dense nz;
- generator G: dense 1024 + BN + ReLU / dense 128*h*w + BN + ReLU / deconv64 4x4 s2 + BN + ReLU /
  deconv C 4x4 s2 + tanh;
- discriminator D(x, z): x-path conv64 4x4 s2 / conv64 4x4 s2 + BN, z-path dense 512, each with
  LeakyReLU 0.1 and dropout 0.5; joint dense 1024 (+ LeakyReLU, dropout) = the feature layer f, then
  a logit. TensorFlow's 'SAME' padding is written as symmetric padding here.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

SLOPE = 0.1  # the official code's leaky-ReLU slope


class BiGANEncoder(nn.Module):
    """x (N, C, H, W) -> z (N, nz)."""

    def __init__(self, channels: int, height: int, width: int, latent_dim: int = 200):
        super().__init__()
        self.net = nn.Sequential(
            nn.Conv2d(channels, 32, 3, 1, 1), nn.LeakyReLU(SLOPE),
            nn.Conv2d(32, 64, 3, 2, 1), nn.BatchNorm2d(64), nn.LeakyReLU(SLOPE),
            nn.Conv2d(64, 128, 3, 2, 1), nn.BatchNorm2d(128), nn.LeakyReLU(SLOPE),
            nn.Flatten(), nn.Linear(128 * (height // 4) * (width // 4), latent_dim),
        )

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x)


class BiGANGenerator(nn.Module):
    """z (N, nz) -> x (N, C, H, W) in [-1, 1]."""

    def __init__(self, channels: int, height: int, width: int, latent_dim: int = 200):
        super().__init__()
        self.h, self.w = height // 4, width // 4
        self.dense = nn.Sequential(
            nn.Linear(latent_dim, 1024), nn.BatchNorm1d(1024), nn.ReLU(),
            nn.Linear(1024, 128 * self.h * self.w), nn.BatchNorm1d(128 * self.h * self.w), nn.ReLU(),
        )
        self.deconv = nn.Sequential(
            nn.ConvTranspose2d(128, 64, 4, 2, 1), nn.BatchNorm2d(64), nn.ReLU(),
            nn.ConvTranspose2d(64, channels, 4, 2, 1), nn.Tanh(),
        )

    def forward(self, z: Tensor) -> Tensor:
        return self.deconv(self.dense(z).reshape(-1, 128, self.h, self.w))


class BiGANDiscriminator(nn.Module):
    """(x (N, C, H, W), z (N, nz)) -> (logit (N,), features f (N, 1024)); sigmoid(logit) = P(pair from E)."""

    def __init__(self, channels: int, height: int, width: int, latent_dim: int = 200, dropout: float = 0.5):
        super().__init__()
        self.x_path = nn.Sequential(
            nn.Conv2d(channels, 64, 4, 2, 1), nn.LeakyReLU(SLOPE), nn.Dropout(dropout),
            nn.Conv2d(64, 64, 4, 2, 1), nn.BatchNorm2d(64), nn.LeakyReLU(SLOPE), nn.Dropout(dropout),
            nn.Flatten(),
        )
        self.z_path = nn.Sequential(nn.Linear(latent_dim, 512), nn.LeakyReLU(SLOPE), nn.Dropout(dropout))
        self.joint = nn.Sequential(nn.Linear(64 * (height // 4) * (width // 4) + 512, 1024), nn.LeakyReLU(SLOPE),
                                   nn.Dropout(dropout))
        self.head = nn.Linear(1024, 1)

    def forward(self, x: Tensor, z: Tensor) -> tuple[Tensor, Tensor]:
        f = self.joint(torch.cat([self.x_path(x), self.z_path(z)], 1))
        return self.head(f).reshape(-1), f
