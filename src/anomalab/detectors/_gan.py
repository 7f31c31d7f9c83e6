"""Shared procedure of the GAN-based detectors (anogan, egbad, ganomaly, skip_ganomaly).

Images are scaled from [0, 1] to [-1, 1] once (generators end in tanh); training runs `_train_step`
through `train_more` (`anomalab.train.epochs`); `reconstruct` returns images back in [0, 1].
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from contextlib import contextmanager

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from anomalab import distributed
from anomalab.detector import BaseDetector
from anomalab.nets.dcgan import DCDiscriminator, dcgan_init
from anomalab.train.epochs import EpochTrained, match_state_layout
from anomalab.train.loop import Batches
from anomalab.types import ImageSet

# The official GANomaly code re-initialises D when its loss falls below this value.
D_COLLAPSE = 1e-5


def to_signed(x: Tensor) -> Tensor:
    """[0, 1] -> [-1, 1]."""
    return x * 2 - 1


def to_unit(x: Tensor) -> Tensor:
    """[-1, 1] -> [0, 1]."""
    return (x + 1) / 2


def power_of_two_size(h: int, w: int, minimum: int = 16) -> int:
    """The square power-of-two side (>= minimum) nearest on a log scale to the larger of h, w."""
    return max(minimum, 2 ** round(math.log2(max(h, w, 1))))


def bce_logits(logits: Tensor, target: float) -> Tensor:
    """Mean binary cross-entropy of logits against a constant label (1 = real, 0 = fake)."""
    return F.binary_cross_entropy_with_logits(logits, torch.full_like(logits, target))


def discriminator_loss(logit_real: Tensor, logit_fake: Tensor) -> Tensor:
    """GANomaly's D loss: 0.5 * (BCE(D(x), 1) + BCE(D(x_hat), 0))."""
    return 0.5 * (bce_logits(logit_real, 1.0) + bce_logits(logit_fake, 0.0))


def adam(net: torch.nn.Module, lr: float, beta1: float) -> torch.optim.Adam:
    """Adam(lr, betas=(beta1, 0.999)) as the GAN papers; the fused kernel updates all of a net's tensors
    in one pass (EGBAD's 12M-parameter step ran 2.5x faster with it on CPU)."""
    return torch.optim.Adam(net.parameters(), lr=lr, betas=(beta1, 0.999), fused=True)


class GANDetector(EpochTrained, BaseDetector):
    """Subclasses set `_make_nets(shape)`, `_make_optimizers()`, `_train_step(batch)` (batch already in
    [-1, 1]), `_reconstruct(x)` (x and result in [-1, 1]) and `_score_batch` / `_map_batch`.

    The step is adversarial: networks trained against each other, one optimiser each, so there is no
    single loss a continual strategy could extend; strategies that change only the data (finetune,
    joint, and replay for a GAN that samples from a prior) train through the detector's own step."""

    continual_strategies = ("finetune", "joint")

    def _model_shape(self, data_shape: tuple[int, int, int]) -> tuple[int, int, int]:
        c, h, w = data_shape
        s = power_of_two_size(h, w)
        return (c, s, s)

    def _build(self, shape) -> None:
        torch.manual_seed(self.seed)
        self._make_nets(shape)
        for net in self._nets().values():
            net.to(self.device_)
        self.reset_optimizers()

    def _make_nets(self, shape) -> None:
        raise NotImplementedError

    def _fit(self, x: Tensor, train: ImageSet) -> None:
        self.train_more(x)

    @contextmanager
    def _training_data(self, x: Tensor) -> Iterator[Tensor]:
        """x in [-1, 1] on the device. channels_last trains about 8 % faster on CPU here
        (benchmarks/bench_ganomaly.py); the nets go back to the default layout afterwards so that scores
        do not depend on how the detector was obtained."""
        nets = list(self._nets().values())
        for net in nets:
            net.train().to(memory_format=torch.channels_last)
        match_state_layout((self.optimizers_ or {}).values())  # the fused Adam needs moments in the same layout
        try:
            yield to_signed(x).to(self.device_).contiguous(memory_format=torch.channels_last)
        finally:
            for net in nets:
                net.to(memory_format=torch.contiguous_format)

    def _after_training(self, data: Tensor) -> None:
        if getattr(self, "bn_recalibrate", False):
            self.recalibrate_bn(data)

    @torch.no_grad()
    def recalibrate_bn(self, data: Tensor) -> None:
        """Re-estimate every BatchNorm's running statistics with the final weights: one pass of the training
        forward (`_bn_forward`) over the training images `data` in [-1, 1], cumulative averages. During
        training the running averages (momentum 0.1) trail weights that move fast; this uses training
        images only, so it stays an honest evaluation. Latents a forward needs are drawn from a generator
        seeded with `seed` (the global random state is left alone, so training continues as if uncut)."""
        nets = list(self._nets().values())
        bns = [m for net in nets for m in net.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
        momenta = [m.momentum for m in bns]
        modes = [net.training for net in nets]
        for m in bns:
            m.reset_running_stats()
            m.momentum = None  # cumulative moving average over the pass
        for net in nets:
            net.train()
            for m in net.modules():  # statistics of the activations scoring sees: no dropout
                if isinstance(m, nn.modules.dropout._DropoutNd):
                    m.eval()
        latent = torch.Generator().manual_seed(self.seed)
        try:
            for batch in Batches(data, self.batch_size, shuffle=False):
                z = torch.randn(len(batch), getattr(self, "latent_dim", 1), generator=latent).to(batch.device)
                self._bn_forward(batch, z)
        finally:
            for m, momentum in zip(bns, momenta):
                m.momentum = momentum
            for net, mode in zip(nets, modes):
                net.train(mode)  # every submodule, dropout included

    def _bn_forward(self, x: Tensor, z: Tensor) -> None:
        """The forward passes of one training step (batch x in [-1, 1], latents z ~ N(0, I) for the nets
        that decode a prior sample), for `recalibrate_bn`."""
        raise NotImplementedError(f"{self.name} does not support bn_recalibrate")

    def _reconstruct(self, x: Tensor) -> Tensor:
        raise NotImplementedError

    def _map_batch(self, x: Tensor) -> Tensor:
        """Reconstruction residual |x - x_hat|, averaged over channels."""
        return (x - to_unit(self._reconstruct(to_signed(x)))).abs().mean(1)

    def reconstruct(self, images: Tensor, batch_size: int | None = None) -> Tensor:
        """images (N, C, H, W) in [0, 1] -> x_hat (N, C', S, S) in [0, 1] at the model's shape."""
        return self._batched(lambda x: to_unit(self._reconstruct(to_signed(x))), images, batch_size)


class PairedGANDetector(GANDetector):
    """A GAN with one `generator_` and one `discriminator_` (AnoGAN, GANomaly, Skip-GANomaly)."""

    def _make_generator(self, channels: int, size: int) -> nn.Module:
        raise NotImplementedError

    def _make_nets(self, shape) -> None:
        """The method's generator and the DCGAN discriminator, both with DCGAN's N(0, 0.02) init."""
        c, s, _ = shape
        self.generator_ = self._make_generator(c, s)
        self.discriminator_ = DCDiscriminator(s, c, self.width)
        self.generator_.apply(dcgan_init)
        self.discriminator_.apply(dcgan_init)

    def _nets(self):
        return {"generator": self.generator_, "discriminator": self.discriminator_}

    def _make_optimizers(self):
        return {"g": adam(self.generator_, self.lr, self.beta1), "d": adam(self.discriminator_, self.lr, self.beta1)}

    def _update_from_one_pass(self, loss_g: Tensor, loss_d: Tensor) -> tuple[float, bool]:
        """Update G, then D, from the same forward pass, as the official GANomaly step does: each backward
        reaches only its own net's parameters. D is re-initialised when its loss collapses below
        D_COLLAPSE. Returns (D's loss, whether D was re-initialised)."""
        g, d, opt = self.generator_, self.discriminator_, self.optimizers_
        opt["g"].zero_grad(set_to_none=True)
        opt["d"].zero_grad(set_to_none=True)
        loss_g.backward(inputs=list(g.parameters()), retain_graph=True)
        loss_d.backward(inputs=list(d.parameters()))
        opt["g"].step()
        opt["d"].step()
        d_loss = loss_d.item()
        reinit = distributed.batch_mean(d_loss) < D_COLLAPSE  # the whole batch's loss decides (every rank alike)
        if reinit:
            d.apply(dcgan_init)
        return d_loss, reinit

    def _bn_forward(self, x: Tensor, z: Tensor) -> None:
        """The forward passes of one training step of an encoder-decoder GAN: G(x), D(x), D(G(x))."""
        x_hat = self._reconstruct(x)
        self.discriminator_(x)
        self.discriminator_(x_hat)

