"""The teacher: a beta-VAE (Higgins et al. 2017) on dSprites with the Burgess et al. 2018 conv net.

Loss per image: -log p(x | z) (Bernoulli, summed over pixels) + beta * KL[q(z | x) || N(0, I)],
averaged over the batch (option of ours: `kl_warmup_steps` ramps beta up from 0, against the early
posterior collapse that costs a short CPU budget most of its steps); trained with Adam on uniformly
drawn dSprites images (rendered on demand).

Objectives (`objective`): "beta_vae" as above; "beta_tcvae" (Chen et al. 2018), beta on the total correlation of
the minibatch-weighted decomposition; "factor_vae" (Kim & Mnih 2018, "Disentangling by Factorising"): the plain
VAE loss plus beta (their gamma) times the total correlation estimated by a discriminator D that tells samples
of q(z) from samples of the product of its marginals (each latent dimension permuted across a second batch):
TC ~= E_q(z)[log D(z) / (1 - D(z))], D an MLP of 6 x 1,000 leaky-ReLU units trained with Adam(1e-4, betas
(0.5, 0.9)), as the paper's dSprites setting.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

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
                 lr: float = 5e-4, kl_warmup_steps: int = 0, objective: str = "beta_vae", tc_estimator: str = "mws",
                 tc_width: int = 1000, seed: int = 0, device: str = "cpu"):
        self.latent_dim = latent_dim  # k: the teacher's latent size (source: 5)
        self.beta = beta  # beta: weight of the KL term (Higgins et al. 2017; 4 as in Burgess et al.)
        self.steps = steps  # optimiser steps (an epoch of dSprites is 11,520 steps of 64)
        self.batch_size = batch_size
        self.lr = lr  # Adam learning rate (Burgess et al.: 5e-4)
        self.kl_warmup_steps = kl_warmup_steps  # ours: beta ramps up linearly over these steps (0 = plain)
        # "beta_vae": rec + beta KL (Higgins et al.); "beta_tcvae": rec + MI + beta TC + dimension-wise KL
        # (Chen et al. 2018, minibatch-weighted sampling): beta weighs the total correlation alone
        # "factor_vae": rec + KL + beta TC, TC from a discriminator on permuted latents (Kim & Mnih 2018)
        self.objective = objective
        # beta_tcvae's estimator of log q(z): "mws" minibatch-weighted or "mss" minibatch-stratified sampling
        self.tc_estimator = tc_estimator
        self.tc_width = tc_width  # factor_vae: units per layer of D (the paper: 1,000; 6 layers)
        self.seed = seed
        self.device = device

    def _build(self) -> None:
        if self.objective not in OBJECTIVES:
            raise ParameterError(f"objective must be one of {', '.join(map(repr, OBJECTIVES))}, got {self.objective!r}")
        if self.tc_estimator not in ("mws", "mss"):
            raise ParameterError(f"tc_estimator must be 'mws' or 'mss', got {self.tc_estimator!r}")
        self.data_ = getattr(self, "data_", None) or DSprites()
        self.encoder_ = Encoder64(self.channels, self.latent_dim)
        self.decoder_ = Decoder64(self.channels, self.latent_dim)
        params = [*self.encoder_.parameters(), *self.decoder_.parameters()]
        self.optimizer_ = torch.optim.Adam(params, lr=self.lr, fused=True)  # one kernel for all parameters
        self.tc_disc_ = self.optimizer_d_ = None
        if self.objective == "factor_vae":
            self.tc_disc_ = tc_discriminator(self.latent_dim, width=int(self.tc_width))
            self.optimizer_d_ = torch.optim.Adam(self.tc_disc_.parameters(), lr=1e-4, betas=(0.5, 0.9), fused=True)

    def _nets(self):
        nets = {"encoder": self.encoder_, "decoder": self.decoder_}
        if getattr(self, "tc_disc_", None) is not None:
            nets["tc_discriminator"] = self.tc_disc_
        return nets

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
        # FactorVAE draws two batches per step: one for the VAE, one for D's permuted samples
        return self.data_.sample(self.batch_size * (2 if self.objective == "factor_vae" else 1), rng)[0]

    def posterior(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """Prepared images (N, 1, 64, 64) on the device -> (mean, logvar)."""
        return self.encoder_(x)

    def loss(self, x: Tensor) -> tuple[Tensor, dict[str, float]]:
        """The objective's loss of a batch of prepared images and its logged terms."""
        loss, logs, _ = self._loss(x)
        return loss, logs

    def _loss(self, x: Tensor) -> tuple[Tensor, dict[str, float], Tensor]:
        """As `loss`, with the sampled codes z (FactorVAE's discriminator step reuses them)."""
        mean, logvar = self.encoder_(x)
        z = mean + torch.randn_like(mean) * (0.5 * logvar).exp()
        rec = bernoulli_nll(self.decoder_(z), x).mean()
        kl = kl_to_standard_normal(mean, logvar).mean()
        if self.objective == "factor_vae":
            logits = self.tc_disc_(z)
            tc = (logits[:, 0] - logits[:, 1]).mean()  # log D(z) / (1 - D(z)), class 0 = "from q(z)"
            loss = rec + kl + self.beta_now * tc
            return loss, {"loss": loss.item(), "rec": rec.item(), "kl": kl.item(), "tc": tc.item()}, z
        if self.objective == "beta_tcvae":
            parts = tc_decomposition(z, mean, logvar, len(self.data_), self.tc_estimator)
            loss = rec + parts["mi"] + self.beta_now * parts["tc"] + parts["dwkl"]
            return loss, {"loss": loss.item(), "rec": rec.item(), "kl": kl.item(),
                          **{k: v.item() for k, v in parts.items()}}, z
        loss = rec + self.beta_now * kl
        return loss, {"loss": loss.item(), "rec": rec.item(), "kl": kl.item()}, z

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
        batch = batch.to(self.device_).contiguous(memory_format=torch.channels_last)
        if self.objective != "factor_vae":
            self.optimizer_.zero_grad(set_to_none=True)
            loss, logs = self.loss(batch)
            loss.backward()
            self.optimizer_.step()
            return logs
        # Kim & Mnih's Algorithm 1: a VAE step on the first half (TC from D), then a D step telling the first
        # half's z from the second half's z with every dimension permuted across the batch
        first, second = batch[: self.batch_size], batch[self.batch_size :]
        self.optimizer_.zero_grad(set_to_none=True)
        loss, logs, z = self._loss(first)
        # gradients for the VAE's parameters only: D's would be discarded before its own step
        loss.backward(inputs=self.optimizer_.param_groups[0]["params"])
        self.optimizer_.step()
        with torch.no_grad():
            mean, logvar = self.encoder_(second)
            z2 = mean + torch.randn_like(mean) * (0.5 * logvar).exp()
            perm = permute_dims(z2)
        self.optimizer_d_.zero_grad(set_to_none=True)
        joint, product = self.tc_disc_(z.detach()), self.tc_disc_(perm)
        zeros = torch.zeros(len(joint), dtype=torch.long, device=joint.device)
        d_loss = 0.5 * (F.cross_entropy(joint, zeros) + F.cross_entropy(product, zeros + 1))
        d_loss.backward()
        self.optimizer_d_.step()
        logs["d_loss"] = d_loss.item()
        return logs


OBJECTIVES = ("beta_vae", "beta_tcvae", "factor_vae")


def tc_discriminator(latent_dim: int, width: int = 1000, layers: int = 6) -> nn.Module:
    """FactorVAE's total-correlation discriminator: `layers` fully connected layers of `width` leaky-ReLU (0.2)
    units, two logits (0: a sample of q(z), 1: of the product of its marginals)."""
    mods: list[nn.Module] = []
    d = latent_dim
    for _ in range(layers):
        mods += [nn.Linear(d, width), nn.LeakyReLU(0.2)]
        d = width
    return nn.Sequential(*mods, nn.Linear(d, 2))


def permute_dims(z: Tensor, generator: torch.Generator | None = None) -> Tensor:
    """(N, k) -> every column shuffled across the batch independently: samples of prod_j q(z_j)."""
    n = len(z)
    idx = torch.stack([torch.randperm(n, generator=generator, device=z.device) for _ in range(z.shape[1])], 1)
    return z.gather(0, idx)
