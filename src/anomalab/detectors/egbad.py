"""EGBAD: efficient GAN-based anomaly detection (Zenati et al. 2018; docs/detectors/egbad.md).

A BiGAN: encoder E (x -> z), generator G (z -> x) and discriminator D(x, z) on pairs, trained with
    L_D = BCE(D(x, E(x)), 1) + BCE(D(G(z), z), 0),  L_G = BCE(D(G(z), z), 1),  L_E = BCE(D(x, E(x)), 0),
(one Adam each; a D step, then a G and E step on a fresh z, as the official code). Exponential
moving averages (decay 0.999) of the weights are used at test time. Score (official, degree 1):
    A(x) = (1 - w) * |x - G(E(x))|_1 + w * Dl,   w = 0.1,
with Dl = |f(x, E(x)) - f(G(E(x)), E(x))|_1 ("fm") or BCE(D(G(E(x)), E(x)), 1) ("cross_e").
"""

from __future__ import annotations

import copy

import torch
from torch import Tensor, nn

from anomalab.detectors._gan import GANDetector, adam, bce_logits, to_signed
from anomalab.nets.bigan import BiGANDiscriminator, BiGANEncoder, BiGANGenerator
from anomalab.nets.dcgan import dcgan_init


def bigan_losses(logit_encoder: Tensor, logit_generator: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """(L_D, L_G, L_E) from D's logits on encoder pairs (x, E(x)) and generator pairs (G(z), z)."""
    loss_d = bce_logits(logit_encoder, 1.0) + bce_logits(logit_generator, 0.0)
    return loss_d, bce_logits(logit_generator, 1.0), bce_logits(logit_encoder, 0.0)


def egbad_score(x: Tensor, x_hat: Tensor, feat_x: Tensor, feat_hat: Tensor, logit_hat: Tensor,
                variant: str = "fm", weight: float = 0.1) -> Tensor:
    """Per-image A(x) = (1 - weight) * sum|x - x_hat| + weight * Dl -> (N,); Dl = sum|f(x) - f(x_hat)|
    ("fm") or BCE(logit_hat, 1) ("cross_e")."""
    residual = (x - x_hat).abs().flatten(1).sum(1)
    if variant == "fm":
        dis = (feat_x - feat_hat).abs().flatten(1).sum(1)
    elif variant == "cross_e":
        dis = nn.functional.binary_cross_entropy_with_logits(logit_hat, torch.ones_like(logit_hat), reduction="none")
    else:
        raise ValueError(f"score variant must be 'fm' or 'cross_e', got {variant!r}")
    return (1 - weight) * residual + weight * dis


def ema_decay(decay: float, step: int) -> float:
    """TensorFlow's ExponentialMovingAverage with num_updates: min(decay, (1 + t) / (10 + t)). The
    warm-up keeps short runs from averaging in the random initial weights."""
    return min(decay, (1 + step) / (10 + step))


class EGBAD(GANDetector):
    """score(images (N,C,H,W) in [0,1]) -> (N,), higher = more anomalous. Works at the data's size
    rounded to a multiple of 4 (MNIST: 28x28, the paper's architecture)."""

    name = "egbad"
    onnx_exportable = True
    _fitted_json = ("history_", "ema_steps_")

    def __init__(self, latent_dim: int = 200, score_variant: str = "fm", weight: float = 0.1,
                 ema: float = 0.999, epochs: int = 100, batch_size: int = 100, lr: float = 1e-5,
                 beta1: float = 0.5, bn_recalibrate: bool = True, seed: int = 0, device: str = "cpu"):
        self.latent_dim = latent_dim  # z: size of the BiGAN latent
        self.score_variant = score_variant  # Dl: "fm" (feature matching) or "cross_e" (cross-entropy)
        self.weight = weight  # 1 - alpha: weight of Dl in the score (alpha = 0.9 on the residual)
        self.ema = ema  # decay of the moving average of the weights used at test time
        self.epochs = epochs
        self.batch_size = batch_size
        self.lr = lr  # Adam learning rate of E, G and D
        self.beta1 = beta1  # Adam beta1 (beta2 = 0.999)
        # Not in the paper: after training, re-estimate the BatchNorm statistics of the averaged (test-time)
        # nets on the training images with their own weights (recalibrate_bn); False = the live nets' running
        # averages copied into the averaged nets, as the official code.
        self.bn_recalibrate = bn_recalibrate
        self.seed = seed
        self.device = device

    def _model_shape(self, data_shape):
        c, h, w = data_shape
        return (c, max(4, 4 * round(h / 4)), max(4, 4 * round(w / 4)))

    def _make_nets(self, shape) -> None:
        if self.score_variant not in ("fm", "cross_e"):
            raise ValueError(f"score_variant must be 'fm' or 'cross_e', got {self.score_variant!r}")
        c, h, w = shape
        self.encoder_ = BiGANEncoder(c, h, w, self.latent_dim)
        self.generator_ = BiGANGenerator(c, h, w, self.latent_dim)
        self.discriminator_ = BiGANDiscriminator(c, h, w, self.latent_dim)
        for net in (self.encoder_, self.generator_, self.discriminator_):
            net.apply(dcgan_init)  # N(0, 0.02) weights, as the official code
        self.encoder_ema_ = copy.deepcopy(self.encoder_)
        self.generator_ema_ = copy.deepcopy(self.generator_)
        self.discriminator_ema_ = copy.deepcopy(self.discriminator_)
        self.ema_steps_ = 0

    def _nets(self):
        return {"encoder": self.encoder_, "generator": self.generator_, "discriminator": self.discriminator_,
                "encoder_ema": self.encoder_ema_, "generator_ema": self.generator_ema_,
                "discriminator_ema": self.discriminator_ema_}

    def _make_optimizers(self):
        nets = {"e": self.encoder_, "g": self.generator_, "d": self.discriminator_}
        return {k: adam(net, self.lr, self.beta1) for k, net in nets.items()}

    def _train_step(self, x: Tensor) -> dict[str, float]:
        e, g, d, opt = self.encoder_, self.generator_, self.discriminator_, self.optimizers_
        z = torch.randn(len(x), self.latent_dim, device=x.device)
        loss_d, _, _ = bigan_losses(d(x, e(x).detach())[0], d(g(z).detach(), z)[0])
        opt["d"].zero_grad(set_to_none=True)
        loss_d.backward()
        opt["d"].step()
        z = torch.randn(len(x), self.latent_dim, device=x.device)
        _, loss_g, loss_e = bigan_losses(d(x, e(x))[0], d(g(z), z)[0])
        opt["g"].zero_grad(set_to_none=True)
        opt["e"].zero_grad(set_to_none=True)
        (loss_g + loss_e).backward(inputs=[*g.parameters(), *e.parameters()])  # L_G reaches only G, L_E only E
        opt["g"].step()
        opt["e"].step()
        self._update_ema()
        return {"loss_d": loss_d.item(), "loss_g": loss_g.item(), "loss_e": loss_e.item()}

    @torch.no_grad()
    def _update_ema(self) -> None:
        decay = ema_decay(self.ema, self.ema_steps_)
        for net, avg in ((self.encoder_, self.encoder_ema_), (self.generator_, self.generator_ema_),
                         (self.discriminator_, self.discriminator_ema_)):
            for p, q in zip(net.parameters(), avg.parameters()):
                q.lerp_(p, 1 - decay)
            for b, c in zip(net.buffers(), avg.buffers()):  # BN statistics are not averaged (as in TF)
                c.copy_(b)
        self.ema_steps_ += 1

    def _bn_forward(self, x: Tensor, z: Tensor) -> None:
        """A training step's forward passes, D(x, E(x)) and D(G(z), z), through the live and the averaged nets."""
        for e, g, d in ((self.encoder_, self.generator_, self.discriminator_),
                        (self.encoder_ema_, self.generator_ema_, self.discriminator_ema_)):
            d(x, e(x))
            d(g(z), z)

    def _reconstruct(self, x: Tensor) -> Tensor:
        return self.generator_ema_(self.encoder_ema_(x))

    def _score_batch(self, x: Tensor) -> Tensor:
        x = to_signed(x)
        z = self.encoder_ema_(x)
        x_hat = self.generator_ema_(z)
        _, feat_x = self.discriminator_ema_(x, z)
        logit_hat, feat_hat = self.discriminator_ema_(x_hat, z)
        return egbad_score(x, x_hat, feat_x, feat_hat, logit_hat, self.score_variant, self.weight)

    def embed(self, images: Tensor, batch_size: int | None = None) -> Tensor:
        """images -> E(x) with the averaged weights, (N, latent_dim)."""
        return self._batched(lambda x: self.encoder_ema_(to_signed(x)), images, batch_size)
