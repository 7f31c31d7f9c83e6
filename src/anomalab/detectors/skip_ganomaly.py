"""Skip-GANomaly (Akcay, Atapour-Abarghouei & Breckon, IJCNN 2019; docs/detectors/skip_ganomaly.md).

Generator = U-Net with skip connections (x -> x_hat), discriminator = DCGAN discriminator with
features f(.). Losses (official code):
    L_G = w_adv * BCE(D(x_hat), 1) + w_con * mean|x - x_hat| + w_lat * mean((f(x) - f(x_hat))^2)
    L_D = 0.5 * (BCE(D(x), 1) + BCE(D(x_hat), 0)),  D re-initialised when L_D < 1e-5.
Score = lam * mean((x - x_hat)^2) + (1 - lam) * mean((f(x) - f(x_hat))^2), lam = 0.9.
Map = |x - x_hat| (the image part of the score, per pixel).
"""

from __future__ import annotations

from torch import Tensor, nn

from anomalab.detectors._gan import PairedGANDetector, bce_logits, discriminator_loss, to_signed
from anomalab.nets.unet import UNetGenerator


def skip_generator_loss(x: Tensor, x_hat: Tensor, logit_fake: Tensor, feat_real: Tensor, feat_fake: Tensor,
                        w_adv: float = 1.0, w_con: float = 50.0, w_lat: float = 1.0
                        ) -> tuple[Tensor, dict[str, Tensor]]:
    """Skip-GANomaly's L_G. Returns (total, {"adv", "con", "lat"})."""
    adv = bce_logits(logit_fake, 1.0)
    con = (x - x_hat).abs().mean()
    lat = (feat_real - feat_fake).pow(2).mean()
    return w_adv * adv + w_con * con + w_lat * lat, {"adv": adv, "con": con, "lat": lat}


def skip_score(x: Tensor, x_hat: Tensor, feat_real: Tensor, feat_fake: Tensor, lam: float = 0.9) -> Tensor:
    """Per-image lam * mean((x - x_hat)^2) + (1 - lam) * mean((f(x) - f(x_hat))^2) -> (N,)."""
    rec = (x - x_hat).pow(2).flatten(1).mean(1)
    lat = (feat_real - feat_fake).pow(2).flatten(1).mean(1)
    return lam * rec + (1 - lam) * lat


class SkipGANomaly(PairedGANDetector):
    """score(images (N,C,H,W) in [0,1]) -> (N,), higher = more anomalous. Works at a square power-of-two
    size >= 16 (MNIST 28x28 is resized to 32x32)."""

    name = "skip_ganomaly"
    distributable = True  # every loss a mean over the batch's images (anomalab.distributed)
    onnx_exportable = True

    def __init__(self, width: int = 64, w_adv: float = 1.0, w_con: float = 50.0, w_lat: float = 1.0,
                 lam: float = 0.9, epochs: int = 15, batch_size: int = 64, lr: float = 2e-4,
                 beta1: float = 0.5, bn_recalibrate: bool = True, seed: int = 0, device: str = "cpu"):
        self.width = width  # ngf = ndf
        self.w_adv = w_adv  # w_adv: weight of the adversarial BCE loss
        self.w_con = w_con  # w_con: weight of the contextual L1 loss (official code 50; paper 40)
        self.w_lat = w_lat  # w_lat: weight of the latent (D-feature) L2 loss
        self.lam = lam  # lambda: weight of the image term in the score
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
        return UNetGenerator(s, c, self.width)

    def _train_step(self, x: Tensor) -> dict[str, float]:
        g, d = self.generator_, self.discriminator_
        x_hat = g(x)
        logit_real, feat_real = d(x)
        logit_fake, feat_fake = d(x_hat)
        loss_g, parts = skip_generator_loss(x, x_hat, logit_fake, feat_real.detach(), feat_fake,
                                            self.w_adv, self.w_con, self.w_lat)
        loss_d = discriminator_loss(logit_real, logit_fake)
        d_loss, reinit = self._update_from_one_pass(loss_g, loss_d)
        return {"loss_g": loss_g.item(), **{k: v.item() for k, v in parts.items()}, "loss_d": d_loss,
                "d_reinit": float(reinit)}

    def _reconstruct(self, x: Tensor) -> Tensor:
        return self.generator_(x)

    def _score_batch(self, x: Tensor) -> Tensor:
        x = to_signed(x)
        x_hat = self.generator_(x)
        _, feat_real = self.discriminator_(x)
        _, feat_fake = self.discriminator_(x_hat)
        return skip_score(x, x_hat, feat_real, feat_fake, self.lam)
