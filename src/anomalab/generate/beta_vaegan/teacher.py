"""The teacher: a beta-VAE (Higgins et al. 2017) on dSprites with the Burgess et al. 2018 conv net.

Loss per image: -log p(x | z) (Bernoulli, summed over pixels) + beta * KL[q(z | x) || N(0, I)],
averaged over the batch (option of ours: `kl_warmup_steps` ramps beta up from 0, against the early
posterior collapse that costs a short CPU budget most of its steps); trained with Adam on uniformly
drawn dSprites images (rendered on demand).
"""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor

from anomalab.data.dsprites import DSprites
from anomalab.errors import ParameterError
from anomalab.generate.beta_vaegan._base import LatentModel
from anomalab.generate.beta_vaegan.losses import bernoulli_nll, kl_to_standard_normal, tc_decomposition
from anomalab.generate.beta_vaegan.nets import Decoder64, Encoder64
from anomalab.train.epochs import match_state_layout


class BetaVAE(LatentModel):
    """beta-VAE teacher; `encode(images)` -> posterior means (N, latent_dim)."""

    name = "beta_vae"
    channels = 1

    def __init__(self, latent_dim: int = 5, beta: float = 4.0, steps: int = 5000, batch_size: int = 64,
                 lr: float = 5e-4, kl_warmup_steps: int = 0, objective: str = "beta_vae", seed: int = 0,
                 device: str = "cpu"):
        self.latent_dim = latent_dim  # k: the teacher's latent size (source: 5)
        self.beta = beta  # beta: weight of the KL term (Higgins et al. 2017; 4 as in Burgess et al.)
        self.steps = steps  # optimiser steps (an epoch of dSprites is 11,520 steps of 64)
        self.batch_size = batch_size
        self.lr = lr  # Adam learning rate (Burgess et al.: 5e-4)
        self.kl_warmup_steps = kl_warmup_steps  # ours: beta ramps up linearly over these steps (0 = plain)
        # "beta_vae": rec + beta KL (Higgins et al.); "beta_tcvae": rec + MI + beta TC + dimension-wise KL
        # (Chen et al. 2018, minibatch-weighted sampling): beta weighs the total correlation alone
        self.objective = objective
        self.seed = seed
        self.device = device

    def _build(self) -> None:
        if self.objective not in ("beta_vae", "beta_tcvae"):
            raise ParameterError(f"objective must be 'beta_vae' or 'beta_tcvae', got {self.objective!r}")
        self.data_ = getattr(self, "data_", None) or DSprites()
        self.encoder_ = Encoder64(self.channels, self.latent_dim)
        self.decoder_ = Decoder64(self.channels, self.latent_dim)
        params = [*self.encoder_.parameters(), *self.decoder_.parameters()]
        self.optimizer_ = torch.optim.Adam(params, lr=self.lr, fused=True)  # one kernel for all parameters

    def _nets(self):
        return {"encoder": self.encoder_, "decoder": self.decoder_}

    def fit(self, data: DSprites | None = None, steps: int | None = None) -> BetaVAE:
        """Train from scratch on uniformly drawn images of `data` (default: dSprites)."""
        self.data_ = data or DSprites()
        self.start()
        self.train_more(self.steps if steps is None else steps)
        return self

    def start(self) -> BetaVAE:
        """Fresh networks and optimiser (seeded with `seed`), no step trained; `train_more(n)` then trains
        from step 0 and `save` writes a folder that `load` resumes from. Returns self."""
        self._start()
        return self

    def _draw(self, rng: np.random.Generator) -> Tensor:
        return self.data_.sample(self.batch_size, rng)[0]

    def posterior(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """Prepared images (N, 1, 64, 64) on the device -> (mean, logvar)."""
        return self.encoder_(x)

    def loss(self, x: Tensor) -> tuple[Tensor, dict[str, float]]:
        mean, logvar = self.encoder_(x)
        z = mean + torch.randn_like(mean) * (0.5 * logvar).exp()
        rec = bernoulli_nll(self.decoder_(z), x).mean()
        kl = kl_to_standard_normal(mean, logvar).mean()
        if self.objective == "beta_tcvae":
            parts = tc_decomposition(z, mean, logvar, len(self.data_))
            loss = rec + parts["mi"] + self.beta_now * parts["tc"] + parts["dwkl"]
            return loss, {"loss": loss.item(), "rec": rec.item(), "kl": kl.item(),
                          **{k: v.item() for k, v in parts.items()}}
        loss = rec + self.beta_now * kl
        return loss, {"loss": loss.item(), "rec": rec.item(), "kl": kl.item()}

    def train_more(self, steps: int) -> None:
        """As `LatentModel.train_more`, with the nets in the channels_last memory format while they train
        (about 1.2x the steps per second on a CPU: benchmarks/bench_teacher.py); they return to the default
        layout afterwards, so saved weights and encodings do not depend on it."""
        nets = list(self._nets().values())
        for net in nets:
            net.to(memory_format=torch.channels_last)
        match_state_layout([self.optimizer_])  # moments loaded from a file are in the default layout
        try:
            super().train_more(steps)
        finally:
            for net in nets:
                net.to(memory_format=torch.contiguous_format)

    def _train_step(self, batch: Tensor) -> dict[str, float]:
        self.optimizer_.zero_grad(set_to_none=True)
        loss, logs = self.loss(batch.to(self.device_).contiguous(memory_format=torch.channels_last))
        loss.backward()
        self.optimizer_.step()
        return logs
