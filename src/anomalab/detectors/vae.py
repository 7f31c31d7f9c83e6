"""Convolutional VAE (Kingma & Welling 2014) on the conv28 nets (anomalab.nets.conv28, docs/section1.md).

Loss per image: BCE(x, x_hat) summed over pixels + kl_weight * KL[N(mu, sigma) || N(0, I)], averaged
over the batch. Score: mean squared error (`error="mse"`) or mean absolute error (`error="l1"`)
between x and the decoding of the posterior mean (so the score is deterministic); map: |x - x_hat|.
`arch="mlp"` replaces the conv28 nets by the fully-connected VAE of the continual-learning reference
(flattened image, 400 and 200 hidden units; docs/continual.md).
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.distributions import Normal, kl_divergence
from torch.distributions.utils import _standard_normal

from anomalab import distributed
from anomalab.detectors._autoencoder import ReconstructionDetector
from anomalab.errors import ParameterError
from anomalab.nets.conv28 import Decoder28, DecoderMLP, Encoder28, EncoderMLP, stem_depth


def vae_loss(x: Tensor, x_hat: Tensor, q: Normal, kl_weight: float = 1.0) -> tuple[Tensor, Tensor, Tensor]:
    """(total, reconstruction, kl), each averaged over the batch; reconstruction = BCE summed per image."""
    rec = F.binary_cross_entropy(x_hat, x, reduction="sum") / len(x)
    kl = kl_divergence(q, Normal(torch.zeros_like(q.loc), torch.ones_like(q.scale))).sum() / len(x)
    return rec + kl_weight * kl, rec, kl


class VAE(ReconstructionDetector):
    """Seed-2 convolutional VAE. score(images (N,C,H,W) in [0,1]) -> (N,), higher = more anomalous."""

    name = "vae"
    continual_strategies = ("finetune", "joint", "ewc", "replay")

    def __init__(self, latent_dim: int = 64, epochs: int = 20, batch_size: int = 128, lr: float = 1e-3,
                 kl_weight: float = 1.0, seed: int = 0, device: str = "cpu",
                 arch: Literal["conv28", "mlp"] = "conv28", error: Literal["mse", "l1"] = "mse"):
        self.latent_dim = latent_dim  # z: size of the latent code
        self.epochs = epochs
        self.batch_size = batch_size
        self.lr = lr  # Adam learning rate
        self.kl_weight = kl_weight  # weight of KL[q(z|x) || N(0, I)]; 1 = the plain VAE of the source
        self.seed = seed
        self.device = device
        self.arch = arch  # "conv28" (convolutional) or "mlp" (fully connected on the flattened image)
        self.error = error  # score: "mse" = mean (x - x_hat)^2, "l1" = mean |x - x_hat|

    def _make_nets(self, shape) -> None:
        if self.arch not in ("conv28", "mlp"):
            raise ParameterError(f"vae: arch must be 'conv28' or 'mlp', got {self.arch!r}")
        c, h, w = shape
        if self.arch == "mlp":
            self.encoder_ = EncoderMLP(c * h * w, self.latent_dim)
            self.decoder_ = DecoderMLP((c, h, w), self.latent_dim)
            return
        self.encoder_ = Encoder28(c, self.latent_dim, variational=True, extra=stem_depth(h))
        self.decoder_ = Decoder28(c, self.latent_dim, extra=stem_depth(h))

    def loss(self, batch: Tensor):
        q = self.encoder_.posterior(batch)
        share = distributed.batch_share()
        if share is None:
            z = q.rsample()
        else:  # over several ranks: the noise of the whole global batch, this rank's rows (as one process draws it)
            eps = _standard_normal((share.total, *q.loc.shape[1:]), dtype=q.loc.dtype, device=q.loc.device)
            z = q.loc + eps[share.start : share.stop] * q.scale
        x_hat = self.decoder_(z)
        loss, rec, kl = vae_loss(batch, x_hat, q, self.kl_weight)
        return loss, {"loss": loss.item(), "rec": rec.item(), "kl": kl.item()}

    def _reconstruct(self, x: Tensor) -> Tensor:
        mean, _ = self.encoder_(x)
        return self.decoder_(mean)

    def _score_batch(self, x: Tensor) -> Tensor:
        if self.error == "l1":
            return (x - self._reconstruct(x)).abs().flatten(1).mean(1)
        if self.error != "mse":
            raise ParameterError(f"vae: error must be 'mse' or 'l1', got {self.error!r}")
        return super()._score_batch(x)

    def embed(self, images: Tensor, batch_size: int | None = None) -> Tensor:
        """images -> posterior means (N, latent_dim)."""
        return self._batched(lambda x: self.encoder_(x)[0], images, batch_size)

    def prior_decoder(self) -> torch.nn.Module:
        """The net decoding z ~ N(0, I) (n, latent_dim) into images as the training step sees them
        ([0, 1]); replay copies it."""
        return self.decoder_

    def sample(self, n: int, generator: torch.Generator | None = None) -> Tensor:
        """n images decoded from z ~ N(0, I): (n, C, H, W) at the model's shape."""
        self._check_fitted()
        z = torch.randn(n, self.latent_dim, generator=generator).to(self.device_)
        self.decoder_.eval()
        with torch.inference_mode():
            return self.decoder_(z).cpu()
