"""Convolutional autoencoder (the conv28 nets, anomalab.nets.conv28; docs/section1.md): score = reconstruction error."""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor

from anomalab.detectors._autoencoder import ReconstructionDetector
from anomalab.nets.conv28 import Decoder28, Encoder28, stem_depth


class ConvAE(ReconstructionDetector):
    """Seed-2 convolutional AE. score(images (N,C,H,W) in [0,1]) -> (N,) mean squared reconstruction
    error, higher = more anomalous; score_map -> (N,H,W) |x - x_hat| averaged over channels."""

    name = "conv_ae"

    def __init__(self, latent_dim: int = 64, epochs: int = 20, batch_size: int = 128, lr: float = 1e-3,
                 seed: int = 0, device: str = "cpu"):
        self.latent_dim = latent_dim  # z: size of the bottleneck
        self.epochs = epochs
        self.batch_size = batch_size
        self.lr = lr  # Adam learning rate
        self.seed = seed
        self.device = device

    def _make_nets(self, shape) -> None:
        c, h, _ = shape
        self.encoder_ = Encoder28(c, self.latent_dim, variational=False, extra=stem_depth(h))
        self.decoder_ = Decoder28(c, self.latent_dim, extra=stem_depth(h))

    def loss(self, batch: Tensor):
        x_hat = self.decoder_(self.encoder_(batch))
        loss = F.mse_loss(x_hat, batch)
        return loss, {"loss": loss.item()}

    def _reconstruct(self, x: Tensor) -> Tensor:
        return self.decoder_(self.encoder_(x))

    def embed(self, images: Tensor, batch_size: int | None = None) -> Tensor:
        """images -> latent codes z (N, latent_dim)."""
        return self._batched(self.encoder_, images, batch_size)
