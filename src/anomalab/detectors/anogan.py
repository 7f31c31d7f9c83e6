"""AnoGAN (Schlegl et al., IPMI 2017; docs/detectors/anogan.md).

A DCGAN (G: z -> x, D with features f(.)) is trained on normal images. For a query x, z is optimised
for `n_steps` Adam steps to minimise
    L(z) = (1 - lam) * R(z) + lam * Dl(z),  R = sum|x - G(z)|,  Dl = sum|f(x) - f(G(z))|,
and the score is L at the final z*; the map is |x - G(z*)|. The latents of a whole batch of queries
are optimised together by one Adam over an (N, nz) tensor: with the nets in eval mode every row's loss
depends on its own z only, and Adam acts element-wise, so each row follows the same path as alone.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor, nn

from anomalab import distributed
from anomalab.data.transforms import check_images, prepare, resize_maps
from anomalab.detectors._gan import PairedGANDetector, bce_logits, discriminator_loss, to_signed, to_unit
from anomalab.nets.dcgan import DCDecoder
from anomalab.nets.fold import fold_batchnorm


def anogan_loss(x: Tensor, x_hat: Tensor, feat_x: Tensor, feat_hat: Tensor, lam: float = 0.1) -> Tensor:
    """Per-image L = (1 - lam) * sum|x - x_hat| + lam * sum|f(x) - f(x_hat)|  -> (N,)."""
    residual = (x - x_hat).abs().flatten(1).sum(1)
    discrimination = (feat_x - feat_hat).abs().flatten(1).sum(1)
    return (1 - lam) * residual + lam * discrimination


def latent_search(generator: Callable[[Tensor], Tensor], features: Callable[[Tensor], Tensor], x: Tensor,
                  z0: Tensor, n_steps: int, lam: float = 0.1, lr: float = 0.01) -> tuple[Tensor, Tensor, Tensor]:
    """Optimise z for every row of x (N, C, S, S) in [-1, 1] from z0 (N, nz) with one Adam.
    Returns (z* (N, nz), L(z*) (N,), G(z*) (N, C, S, S)). The nets' parameters get no gradients."""
    with torch.inference_mode(False), torch.enable_grad():
        x = x.clone()
        feat_x = features(x).detach()
        z = z0.clone().requires_grad_(True)
        opt = torch.optim.Adam([z], lr=lr)
        for _ in range(n_steps):
            x_hat = generator(z)
            loss = anogan_loss(x, x_hat, feat_x, features(x_hat), lam).sum()  # a sum keeps rows independent
            opt.zero_grad(set_to_none=True)
            loss.backward(inputs=[z])
            opt.step()
        with torch.no_grad():
            x_hat = generator(z)
            final = anogan_loss(x, x_hat, feat_x, features(x_hat), lam)
    return z.detach(), final, x_hat


class AnoGAN(PairedGANDetector):
    """score(images (N,C,H,W) in [0,1]) -> (N,) AnoGAN loss after the latent search, higher = more anomalous.
    Scoring is an optimisation (n_steps forward/backward passes per image): `search` returns score,
    G(z*) and map in one go."""

    name = "anogan"
    distributable = True  # every loss a batch mean, z drawn for the whole global batch (anomalab.distributed)
    onnx_refusal = ("anogan cannot be exported to ONNX: it scores each image by an optimisation (gradient steps "
                    "on a latent code per image), not by a fixed graph")
    # latent-search queries per Adam: 32-128 run fastest on a CPU, 512 1.4x slower (benchmarks/bench_ganomaly.py)
    score_batch_size = 64
    # a DCGAN samples from its prior: replay appends images of a frozen copy of G to D's real batches
    # (deep generative replay, Shin et al. 2017), which changes the data only
    continual_strategies = ("finetune", "joint", "replay")

    def __init__(self, latent_dim: int = 100, width: int = 64, lam: float = 0.1, n_steps: int = 500,
                 latent_lr: float = 0.01, epochs: int = 15, batch_size: int = 64, lr: float = 2e-4,
                 beta1: float = 0.5, bn_recalibrate: bool = True, seed: int = 0, device: str = "cpu"):
        self.latent_dim = latent_dim  # z: size of the DCGAN latent
        self.width = width  # ngf = ndf
        self.lam = lam  # lambda: weight of the discrimination loss Dl in L(z)
        self.n_steps = n_steps  # Gamma: latent-optimisation steps per query
        self.latent_lr = latent_lr  # Adam learning rate of the latent search (our choice)
        self.epochs = epochs
        self.batch_size = batch_size
        self.lr = lr  # Adam learning rate of the DCGAN
        self.beta1 = beta1  # Adam beta1 (beta2 = 0.999)
        # Not in the paper: after training, re-estimate BatchNorm statistics on the training images (and G's
        # samples) with the final weights (recalibrate_bn); False = the running averages of training.
        self.bn_recalibrate = bn_recalibrate
        self.seed = seed
        self.device = device

    def _make_generator(self, channels: int, size: int) -> nn.Module:
        c, s = channels, size
        return DCDecoder(s, c, self.latent_dim, self.width)

    def _train_step(self, x: Tensor) -> dict[str, float]:
        g, d, opt = self.generator_, self.discriminator_, self.optimizers_
        z = distributed.batch_randn(len(x), self.latent_dim, device=x.device)  # torch.randn in one process
        fake = g(z)
        # DCGAN: a D step on real vs (detached) fake, then a non-saturating G step against the updated D.
        loss_d = discriminator_loss(d(x)[0], d(fake.detach())[0])
        opt["d"].zero_grad(set_to_none=True)
        loss_d.backward()
        opt["d"].step()
        loss_g = bce_logits(d(fake)[0], 1.0)
        opt["g"].zero_grad(set_to_none=True)
        loss_g.backward(inputs=list(g.parameters()))
        opt["g"].step()
        return {"loss_g": loss_g.item(), "loss_d": loss_d.item()}

    def _bn_forward(self, x: Tensor, z: Tensor) -> None:
        """A training step's forward passes: G(z), D(x), D(G(z))."""
        self.discriminator_(x)
        self.discriminator_(self.generator_(z))

    def prior_decoder(self) -> nn.Module:
        """The net decoding z ~ N(0, I) (n, latent_dim) into images as the training step sees them
        ([-1, 1]): G; replay copies it."""
        return self.generator_

    def sample(self, n: int, generator: torch.Generator | None = None) -> Tensor:
        """n images G(z), z ~ N(0, I): (n, C, S, S) in [0, 1]."""
        self._check_fitted()
        z = torch.randn(n, self.latent_dim, generator=generator).to(self.device_)
        self.generator_.eval()
        with torch.inference_mode():
            return to_unit(self.generator_(z)).cpu()

    def search(self, images: Tensor, batch_size: int | None = None, n_steps: int | None = None) -> dict[str, Tensor]:
        """images (N, C, H, W) in [0, 1] -> {"score" (N,), "reconstruction" G(z*) (N, C', S, S) in [0, 1],
        "map" (N, H, W) = |x - G(z*)| at input resolution, "z" (N, nz)}. Initial z ~ N(0, I) drawn from
        a generator seeded with `seed` for every batch, so scores are reproducible."""
        self._check_fitted()
        check_images(images, what=f"{self.name}.score")
        # eval-mode copies with BatchNorm folded into the convs: the same function, about twice as fast
        # through the search's forward/backward passes (anomalab.nets.fold); their weights need no gradients
        g, features = fold_batchnorm(self.generator_), fold_batchnorm(self.discriminator_.features)
        bs = batch_size or self.score_batch_size
        out: dict[str, list[Tensor]] = {"score": [], "reconstruction": [], "map": [], "z": []}
        for i in range(0, len(images), bs):
            x = prepare(images[i : i + bs], self.input_shape_).to(self.device_)
            z0 = torch.randn(len(x), self.latent_dim, generator=torch.Generator().manual_seed(self.seed))
            z, score, x_hat = latent_search(g, features, to_signed(x), z0.to(self.device_),
                                            self.n_steps if n_steps is None else n_steps, self.lam,
                                            self.latent_lr)
            rec = to_unit(x_hat)
            out["score"].append(score.cpu())
            out["reconstruction"].append(rec.cpu())
            out["map"].append((x - rec).abs().mean(1).cpu())
            out["z"].append(z.cpu())
        result = {k: torch.cat(v) if v else torch.empty(0) for k, v in out.items()}
        result["map"] = resize_maps(result["map"], tuple(images.shape[-2:]))
        return result

    def score(self, images: Tensor, batch_size: int | None = None) -> Tensor:
        return self.search(images, batch_size)["score"]

    def score_map(self, images: Tensor, batch_size: int | None = None) -> Tensor:
        return self.search(images, batch_size)["map"]

    def reconstruct(self, images: Tensor, batch_size: int | None = None) -> Tensor:
        """G(z*) after the latent search, (N, C', S, S) in [0, 1]."""
        return self.search(images, batch_size)["reconstruction"]
