"""conv28: the convolutional encoder/decoder of the source's AE/VAE experiments on 28x28 MNIST
(docs/detectors/conv_ae_vae.md, docs/section1.md), exact at 28x28x1.

Every convolution has bias=False, as in the source. The source does not show the decoder's output
activation nor the bias of the VAE's two heads: sigmoid and bias=False are our choices.

Other inputs: channels replace the 1 in the first and last layer; sizes 28 * 2**k (56, 112, 224, ...)
get k extra stride-2 stages in front of the encoder (and k matching up-sampling stages after the
decoder), each Conv(4 -> 4, 4x4, stride 2) + BN + LeakyReLU. Detectors resize any other size to the
nearest such size (see `stem_depth`); anomaly maps are resized back to the input.
"""

from __future__ import annotations

import math

import torch.nn.functional as F
from torch import Tensor, nn
from torch.distributions import Normal


def stem_depth(size: int) -> int:
    """k such that 28 * 2**k is the supported size nearest to `size` (on a log scale)."""
    return max(0, round(math.log2(max(size, 1) / 28)))


def model_size(size: int) -> int:
    return 28 * 2 ** stem_depth(size)


class Encoder28(nn.Module):
    """x (N, C, 28*2^k, 28*2^k) -> (N, heads*z, 1, 1) before the heads; see module doc."""

    def __init__(self, channels: int = 1, latent_dim: int = 2, variational: bool = False, extra: int = 0):
        super().__init__()
        self.relu = nn.LeakyReLU()
        stem: list[nn.Module] = []
        c_in = channels
        for _ in range(extra):
            stem += [nn.Conv2d(c_in, 4, 4, 2, 1, bias=False), nn.BatchNorm2d(4), nn.LeakyReLU()]
            c_in = 4
        self.stem = nn.Sequential(*stem)
        self.conv1 = nn.Conv2d(c_in, 4, 4, 2, 1, bias=False)  # 14x14
        self.conv2 = nn.Conv2d(4, 16, 4, 2, 1, bias=False)  # 7x7
        self.bn2 = nn.BatchNorm2d(16)
        self.conv3 = nn.Conv2d(16, 64, 3, 2, 0, bias=False)  # 3x3
        self.bn3 = nn.BatchNorm2d(64)
        self.variational = variational
        if variational:
            self.conv_mean = nn.Conv2d(64, latent_dim, 3, 2, 0, bias=False)  # 1x1
            self.conv_std = nn.Conv2d(64, latent_dim, 3, 2, 0, bias=False)
        else:
            self.conv4 = nn.Conv2d(64, latent_dim, 3, 2, 0, bias=False)  # 1x1

    def features(self, x: Tensor) -> Tensor:
        x = self.relu(self.conv1(self.stem(x)))
        x = self.relu(self.bn2(self.conv2(x)))
        return self.relu(self.bn3(self.conv3(x)))

    def forward(self, x: Tensor) -> Tensor | tuple[Tensor, Tensor]:
        """AE: z (N, latent). VAE: (mean, std), each (N, latent); std = softplus(.) > 0."""
        h = self.features(x)
        if not self.variational:
            return self.conv4(h).flatten(1)
        return self.conv_mean(h).flatten(1), F.softplus(self.conv_std(h)).flatten(1)

    def posterior(self, x: Tensor) -> Normal:
        mean, std = self(x)
        return Normal(mean, std)


class Decoder28(nn.Module):
    """z (N, latent) -> x_hat (N, C, 28*2^k, 28*2^k) in (0, 1)."""

    def __init__(self, channels: int = 1, latent_dim: int = 2, extra: int = 0):
        super().__init__()
        self.relu = nn.LeakyReLU()
        self.conv4 = nn.ConvTranspose2d(latent_dim, 64, 3, 1, bias=False)  # 3x3
        self.bn4 = nn.BatchNorm2d(64)
        self.conv3 = nn.ConvTranspose2d(64, 16, 3, 2, bias=False)  # 7x7
        self.bn3 = nn.BatchNorm2d(16)
        self.conv2 = nn.ConvTranspose2d(16, 4, 4, 2, 1, bias=False)  # 14x14
        self.bn2 = nn.BatchNorm2d(4)
        c_out = channels if extra == 0 else 4
        self.conv1 = nn.ConvTranspose2d(4, c_out, 4, 2, 1, bias=False)  # 28x28
        head: list[nn.Module] = []
        for i in range(extra):
            head += [nn.BatchNorm2d(4), nn.LeakyReLU()]
            head.append(nn.ConvTranspose2d(4, channels if i == extra - 1 else 4, 4, 2, 1, bias=False))
        self.head = nn.Sequential(*head)

    def forward(self, z: Tensor) -> Tensor:
        x = self.relu(self.bn4(self.conv4(z[:, :, None, None])))
        x = self.relu(self.bn3(self.conv3(x)))
        x = self.relu(self.bn2(self.conv2(x)))
        return self.head(self.conv1(x)).sigmoid()




class EncoderMLP(nn.Module):
    """The fully-connected VAE encoder of the continual-learning reference (Wiewel & Yang 2019): the image
    flattened, Linear(C*H*W, 400) ReLU, Linear(400, 200) ReLU, then mean = Linear(200, z) and
    std = softplus(Linear(200, z)). Same interface as Encoder28(variational=True)."""

    def __init__(self, in_features: int, latent_dim: int, hidden: tuple[int, int] = (400, 200)):
        super().__init__()
        self.body = nn.Sequential(nn.Flatten(), nn.Linear(in_features, hidden[0]), nn.ReLU(),
                                  nn.Linear(hidden[0], hidden[1]), nn.ReLU())
        self.mean = nn.Linear(hidden[1], latent_dim)
        self.std = nn.Linear(hidden[1], latent_dim)

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        h = self.body(x)
        return self.mean(h), F.softplus(self.std(h))

    def posterior(self, x: Tensor) -> Normal:
        mean, std = self(x)
        return Normal(mean, std)


class DecoderMLP(nn.Module):
    """z (N, latent) -> Linear(z, 200) ReLU, Linear(200, 400) ReLU, Linear(400, C*H*W) sigmoid, reshaped
    to (N, C, H, W): the mirror of EncoderMLP."""

    def __init__(self, shape: tuple[int, int, int], latent_dim: int, hidden: tuple[int, int] = (400, 200)):
        super().__init__()
        self.shape = tuple(shape)
        n = self.shape[0] * self.shape[1] * self.shape[2]
        self.body = nn.Sequential(nn.Linear(latent_dim, hidden[1]), nn.ReLU(), nn.Linear(hidden[1], hidden[0]),
                                  nn.ReLU(), nn.Linear(hidden[0], n))

    def forward(self, z: Tensor) -> Tensor:
        return self.body(z).sigmoid().view(len(z), *self.shape)
