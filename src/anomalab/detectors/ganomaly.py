"""GANomaly (Akcay, Atapour-Abarghouei & Breckon, ACCV 2018; docs/detectors/ganomaly.md).

Generator G = encoder G_E (x -> z), decoder G_D (z -> x_hat), second encoder E (x_hat -> z_hat);
discriminator D is a DCGAN discriminator with features f(.). Losses (official code):
    L_G = w_adv * mean((f(x) - f(x_hat))^2) + w_con * mean|x - x_hat| + w_enc * mean((z - z_hat)^2)
    L_D = 0.5 * (BCE(D(x), 1) + BCE(D(x_hat), 0)),  D re-initialised when L_D < 1e-5.
Score = mean((z - z_hat)^2) over the latent dimensions (the latent difference, not the image).
Map = |x - x_hat|: the reconstruction residual (the score itself has no spatial layout).
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from anomalab.detectors._gan import PairedGANDetector, discriminator_loss, to_signed
from anomalab.nets.dcgan import DCDecoder, DCEncoder


def generator_loss(x: Tensor, x_hat: Tensor, z: Tensor, z_hat: Tensor, feat_real: Tensor, feat_fake: Tensor,
                   w_adv: float = 1.0, w_con: float = 50.0, w_enc: float = 1.0) -> tuple[Tensor, dict[str, Tensor]]:
    """GANomaly's L_G (batch means, as the official code): adversarial feature matching (L2), contextual
    L1 and encoder L2 losses. Returns (total, {"adv", "con", "enc"})."""
    adv = (feat_real - feat_fake).pow(2).mean()
    con = (x - x_hat).abs().mean()
    enc = (z - z_hat).pow(2).mean()
    return w_adv * adv + w_con * con + w_enc * enc, {"adv": adv, "con": con, "enc": enc}


def latent_score(z: Tensor, z_hat: Tensor) -> Tensor:
    """(N, nz, ...) latents -> (N,) mean((z - z_hat)^2), GANomaly's anomaly score."""
    return (z - z_hat).pow(2).flatten(1).mean(1)


class GanomalyGenerator(nn.Module):
    """x (N, C, S, S) in [-1, 1] -> (x_hat, z, z_hat); z, z_hat (N, nz, 1, 1)."""

    def __init__(self, size: int, channels: int, latent_dim: int, width: int):
        super().__init__()
        self.encoder1 = DCEncoder(size, channels, latent_dim, width)  # G_E
        self.decoder = DCDecoder(size, channels, latent_dim, width)  # G_D
        self.encoder2 = DCEncoder(size, channels, latent_dim, width)  # E

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        z = self.encoder1(x)
        x_hat = self.decoder(z)
        return x_hat, z, self.encoder2(x_hat)


class GANomaly(PairedGANDetector):
    """score(images (N,C,H,W) in [0,1]) -> (N,) latent difference, higher = more anomalous. Works at a
    square power-of-two size >= 16 (MNIST 28x28 is resized to 32x32, the official isize)."""

    name = "ganomaly"
    distributable = True  # every loss a mean over the batch's images (anomalab.distributed)
    onnx_exportable = True

    def __init__(self, latent_dim: int = 100, width: int = 64, w_adv: float = 1.0, w_con: float = 50.0,
                 w_enc: float = 1.0, epochs: int = 15, batch_size: int = 64, lr: float = 2e-4,
                 beta1: float = 0.5, bn_recalibrate: bool = True, seed: int = 0, device: str = "cpu"):
        self.latent_dim = latent_dim  # nz: size of z
        self.width = width  # ngf = ndf: channels of the first conv of every net
        self.w_adv = w_adv  # w_adv: weight of the adversarial (feature-matching) loss
        self.w_con = w_con  # w_con: weight of the contextual L1 loss |x - x_hat|
        self.w_enc = w_enc  # w_enc: weight of the encoder loss (z - z_hat)^2
        self.epochs = epochs
        self.batch_size = batch_size
        self.lr = lr  # Adam learning rate of G and D
        self.beta1 = beta1  # Adam beta1 (beta2 = 0.999)
        # Not in the paper: after training, re-estimate BatchNorm statistics on the training images with the
        # final weights (see recalibrate_bn); False = the running averages of training, as the official code.
        self.bn_recalibrate = bn_recalibrate
        self.seed = seed
        self.device = device

    def _make_generator(self, channels: int, size: int) -> nn.Module:
        c, s = channels, size
        return GanomalyGenerator(s, c, self.latent_dim, self.width)

    def _train_step(self, x: Tensor) -> dict[str, float]:
        g, d = self.generator_, self.discriminator_
        x_hat, z, z_hat = g(x)
        logit_real, feat_real = d(x)
        logit_fake, feat_fake = d(x_hat)
        loss_g, parts = generator_loss(x, x_hat, z, z_hat, feat_real.detach(), feat_fake,
                                       self.w_adv, self.w_con, self.w_enc)
        loss_d = discriminator_loss(logit_real, logit_fake)
        d_loss, reinit = self._update_from_one_pass(loss_g, loss_d)
        return {"loss_g": loss_g.item(), **{k: v.item() for k, v in parts.items()}, "loss_d": d_loss,
                "d_reinit": float(reinit)}

    def _reconstruct(self, x: Tensor) -> Tensor:
        return self.generator_(x)[0]

    def _score_batch(self, x: Tensor) -> Tensor:
        _, z, z_hat = self.generator_(to_signed(x))
        return latent_score(z, z_hat)

    def latents(self, images: Tensor, batch_size: int | None = None) -> tuple[Tensor, Tensor]:
        """images (N, C, H, W) in [0, 1] -> (z, z_hat), each (N, nz)."""
        zz = self._batched(lambda x: torch.cat([t.flatten(1) for t in self.generator_(to_signed(x))[1:]], 1),
                           images, batch_size)
        return zz[:, : self.latent_dim], zz[:, self.latent_dim :]

