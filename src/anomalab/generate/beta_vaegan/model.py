"""beta-VAEGAN student with knowledge distillation (Akita & Taguchi; beta-VAEGAN of Lueer et al. 2023,
conditional filtered GAN of Kaneko et al. 2017; docs/beta_vaegan.md).

A frozen beta-VAE teacher E_t (latent k) keeps the old factors; the student encoder E_s has k + a
dims (a "added" dims for the new factor), the decoder G reads all k + a, and the discriminator
D(x, y) is conditioned on the label y (1 = added / anomalous data, 0 = data of the pre-training).

    min_{E_s, G} max_D  L_vae + L_KD + L_GAN                                                  (eq. 1)
    L_vae = w_feature * |f(x, y) - f(G(z_s), y)|^2 + w_pixel * BCE(x, G(z_s))
            + beta * KL[q_s(z_s | x) || N(0, I)]                                              (eq. 2)
    L_KD  = w_kd * KL[q_s(z_s' | x) || q_t(z_t | x)]   (z_s' = the first k dims)              (eq. 3)
    L_GAN = log D(x, y) + log(1 - D(G(z_s), y)) + gamma * log(1 - D(G(z_y), y))              (eq. 4)
    z_y   = z_p ~ Unif(-1, 1)^(k+a) with the added part replaced by |.| (y = 1) or -|.| (y = 0) (eq. 5)

Choices of ours (the source does not give them; see docs/beta_vaegan.md): the student's encoder and
decoder start from the teacher's weights (the source calls the procedure "additional training"),
extended by the added dims (new rows/columns start at zero-mean small values) and from 1 to 3 channels;
the teacher sees the sprite's shape as max over the RGB channels (the red channel is 1 for every colour
level, so it sees exactly the original binary image); w_pixel = 1 adds the usual pixel
reconstruction next to the source's feature reconstruction (w_pixel = 0 is the source's eq. 2);
each batch is half original (y = 0) and half added (y = 1) images; D and (E_s, G) are updated from
the same forward pass (simultaneous gradient steps) to save a D pass per step.
"""

from __future__ import annotations

import math

import numpy as np
import torch
from torch import Tensor

from anomalab.data.dsprites import WhiteDSprites
from anomalab.generate.beta_vaegan._base import LatentModel
from anomalab.generate.beta_vaegan.losses import (
    bernoulli_nll,
    discriminator_loss,
    feature_reconstruction,
    generator_loss,
    kl_gaussians,
    kl_to_standard_normal,
    prior_codes,
)
from anomalab.generate.beta_vaegan.nets import Decoder64, Discriminator64, Encoder64
from anomalab.generate.beta_vaegan.teacher import BetaVAE
from anomalab.types import ImageSet

DEGREE_SAMPLES = 512  # images encoded to measure the added dimension's trained range


class BetaVAEGAN(LatentModel):
    """Student generator. encode -> (N, k + a) means; generate(images, degree) -> pseudo-anomalies."""

    name = "beta_vaegan"
    channels = 3
    # (code of degree 0, code of degree 1) on the added dimension, measured after training (calibrate_degree)
    degree_range_: tuple[float, float] | None = None
    extra_meta_keys = ("degree_range",)

    def __init__(self, latent_dim: int = 5, added_dims: int = 1, beta: float = 4.0, gamma: float = 1.0,
                 w_kd: float = 1.0, w_feature: float = 1.0, w_pixel: float = 1.0, w_adv: float = 1.0,
                 w_mismatch: float = 1.0,
                 added_frac: float = 0.5,
                 init_from_teacher: bool = True, zero_init_added: bool = True, added_logvar_init: float | None = None,
                 kl_warmup_steps: int = 0,
                 steps: int = 1000, batch_size: int = 32,
                 lr: float = 5e-4, lr_d: float = 2e-4, seed: int = 0, device: str = "cpu"):
        self.latent_dim = latent_dim  # k: the teacher's latent size (source: 5)
        self.added_dims = added_dims  # a: dims added for the new factor (source: 1)
        self.beta = beta  # beta: KL weight of L_vae (eq. 2); the teacher's value
        self.gamma = gamma  # gamma: weight of the filtered-prior GAN term (eq. 4); source sweeps 0, 1, 5, 10
        self.w_kd = w_kd  # weight of L_KD (eq. 3); 1 in the source
        self.w_feature = w_feature  # weight of the feature-space reconstruction (eq. 2)
        self.w_pixel = w_pixel  # weight of a pixel BCE reconstruction (ours; 0 = the source's eq. 2)
        # weight of eq. 4 in the loss of E_s and G (ours). Our reconstruction terms are sums over pixels and
        # features (hundreds of nats per image) while eq. 4's terms are log-probabilities (about 1); the
        # source's reconstruction is a mean squared error, so its gamma weighs the GAN terms against a far
        # smaller reconstruction than ours. w_adv puts them back on a comparable scale (1 = as summed)
        self.w_adv = w_adv
        # weight of D's wrong-label term: real x with label 1 - y is a negative (the source's text at eq. 4:
        # D says 1 only when x is real AND y is correct); 0 = eq. 4's three terms alone
        self.w_mismatch = w_mismatch
        self.added_frac = added_frac  # share of added (y = 1) images per batch (ours)
        self.init_from_teacher = init_from_teacher  # start E_s, G from the teacher's weights (ours)
        # ours: the added dims' encoder mean rows and decoder input columns start at zero. Then the first
        # consistent gradient the decoder's new column gets is the filtered prior's (eq. 5: z_add > 0 must
        # look like y = 1), so the added dim's sign is set by eq. 5, not by the random init; the encoder
        # follows once the decoder reads the dim. False = the layers' default (random) init.
        self.zero_init_added = zero_init_added
        # ours: start the added dims' posterior sharp (log-variance bias, zero weights) so that they carry
        # information from the first step; None = the layer's default init (posterior variance ~ 1)
        self.added_logvar_init = added_logvar_init
        self.kl_warmup_steps = kl_warmup_steps  # ours: beta of L_vae ramps up from 0 over these steps (0 = off)
        self.steps = steps
        self.batch_size = batch_size
        self.lr = lr  # Adam learning rate of E_s and G
        self.lr_d = lr_d  # Adam learning rate of D (betas 0.5, 0.999 as usual for GANs)
        self.seed = seed
        self.device = device

    @property
    def added_dim(self) -> int:
        """Index of the (first) added latent dimension."""
        return self.latent_dim

    # ---- networks ------------------------------------------------------------------------------
    def _build(self) -> None:
        d = self.latent_dim + self.added_dims
        self.encoder_ = Encoder64(self.channels, d)
        self.decoder_ = Decoder64(self.channels, d)
        self.discriminator_ = Discriminator64(self.channels)
        self.optimizer_ = torch.optim.Adam([*self.encoder_.parameters(), *self.decoder_.parameters()], lr=self.lr)
        self.optimizer_d_ = torch.optim.Adam(self.discriminator_.parameters(), lr=self.lr_d, betas=(0.5, 0.999))

    def _nets(self):
        return {"encoder": self.encoder_, "decoder": self.decoder_, "discriminator": self.discriminator_}

    def _init_from(self, teacher: BetaVAE) -> None:
        """Copy the teacher's encoder/decoder into the wider student (k -> k + a dims, 1 -> 3 channels)."""
        k, a = self.latent_dim, self.added_dims
        te, se = teacher.encoder_.state_dict(), self.encoder_.state_dict()
        for name, w in te.items():
            if name == "conv.0.weight":  # 1 -> 3 input channels: the teacher's filter on the mean of RGB
                se[name] = w.repeat(1, self.channels, 1, 1) / self.channels
            elif name.startswith("head."):  # rows [mean k | logvar k] -> [mean k, new a | logvar k, new a]
                new = se[name].clone()
                new[:k], new[k + a : 2 * k + a] = w[:k], w[k:]
                if self.zero_init_added:
                    new[k : k + a] = 0.0
                if self.added_logvar_init is not None:
                    new[2 * k + a :] = self.added_logvar_init if name.endswith("bias") else 0.0
                se[name] = new
            else:
                se[name] = w
        self.encoder_.load_state_dict(se)
        td, sd = teacher.decoder_.state_dict(), self.decoder_.state_dict()
        for name, w in td.items():
            if name == "fc.0.weight":  # new input columns for the added dims
                new = sd[name].clone()
                new[:, :k] = w
                if self.zero_init_added:
                    new[:, k:] = 0.0
                sd[name] = new
            elif name.startswith(f"deconv.{len(teacher.decoder_.deconv) - 1}."):  # 1 -> 3 output channels
                sd[name] = w.repeat(1, self.channels, 1, 1) if w.ndim == 4 else w.repeat(self.channels)
            else:
                sd[name] = w
        self.decoder_.load_state_dict(sd)

    # ---- training ------------------------------------------------------------------------------
    def fit(self, teacher: BetaVAE, added: ImageSet, original: WhiteDSprites | None = None,
            steps: int | None = None) -> BetaVAEGAN:
        """Train on `original` images (y = 0, drawn uniformly from the grid, default white dSprites)
        and the `added` images (y = 1), distilling the frozen `teacher`."""
        if teacher.latent_dim != self.latent_dim:
            raise ValueError(f"teacher has latent_dim {teacher.latent_dim}, student expects {self.latent_dim}")
        if added.images.shape[1:] != (self.channels, 64, 64):
            raise ValueError(f"added images must be (N, 3, 64, 64), got {tuple(added.images.shape)}")
        self.set_training_data(teacher, added, original)
        self._start()
        if self.init_from_teacher:
            self._init_from(teacher)
        self.train_more(self.steps if steps is None else steps)
        return self

    def set_training_data(self, teacher: BetaVAE, added: ImageSet, original: WhiteDSprites | None = None) -> None:
        """Attach the teacher and data (used by `fit`, and to train a loaded student further)."""
        self.teacher_ = teacher
        self.added_ = (added.images * 255).round().to(torch.uint8)  # 4x smaller; the colour levels are exact
        self.original_ = original or WhiteDSprites()

    def _draw(self, rng: np.random.Generator) -> tuple[Tensor, Tensor]:
        n_add = int(round(self.batch_size * self.added_frac))
        n_orig = self.batch_size - n_add
        x_orig = self.original_.sample(n_orig, rng)[0]
        x_add = self.added_[torch.from_numpy(rng.integers(0, len(self.added_), size=n_add))].float() / 255
        y = torch.cat([torch.zeros(n_orig, dtype=torch.long), torch.ones(n_add, dtype=torch.long)])
        return torch.cat([x_orig, x_add]), y

    def losses(self, x: Tensor, y: Tensor, generator: torch.Generator | None = None
               ) -> tuple[Tensor, Tensor, dict[str, float]]:
        """(loss of E_s and G, loss of D, logs) for one batch, from one forward pass."""
        n, k = len(x), self.latent_dim
        self.teacher_.encoder_.eval()
        with torch.no_grad():
            mean_t, logvar_t = self.teacher_.encoder_(x.amax(1, keepdim=True))
        mean, logvar = self.encoder_(x)
        z = mean + torch.randn_like(mean) * (0.5 * logvar).exp()
        logits_rec = self.decoder_(z)
        images, labels = [x, torch.sigmoid(logits_rec)], [y, y]
        if self.gamma:  # the filtered-prior samples G(z_y) only enter eq. 4 through gamma
            z_y, y_p = prior_codes(n, k, self.added_dims, generator)
            images.append(torch.sigmoid(self.decoder_(z_y.to(x.device))))
            labels.append(y_p.to(x.device))
        if self.w_mismatch:  # real images with the wrong label (D only: no gradient reaches E_s, G)
            images.append(x)
            labels.append(1 - y)
        d_logit, d_feat = self.discriminator_(torch.cat(images), torch.cat(labels))
        parts = list(d_logit.split(n))
        real_logit, rec_logit = parts[0], parts[1]
        prior_logit = parts[2] if self.gamma else None
        mismatch_logit = parts[-1] if self.w_mismatch else None
        feat_x, feat_rec = d_feat[:n], d_feat[n : 2 * n]

        feat = feature_reconstruction(feat_x.detach(), feat_rec).mean()
        pixel = bernoulli_nll(logits_rec, x).mean()
        kl = kl_to_standard_normal(mean, logvar).mean()
        kd = kl_gaussians(mean[:, :k], logvar[:, :k], mean_t, logvar_t).mean()
        adv = generator_loss(rec_logit, prior_logit, self.gamma)
        loss_g = self.w_feature * feat + self.w_pixel * pixel + self.beta_now * kl + self.w_kd * kd + self.w_adv * adv
        loss_d = discriminator_loss(real_logit, rec_logit, prior_logit, self.gamma, mismatch_logit, self.w_mismatch)
        logs = {"loss": loss_g.item(), "feature": feat.item(), "pixel": pixel.item(), "kl": kl.item(),
                "kd": kd.item(), "adv": adv.item(), "loss_d": loss_d.item()}
        return loss_g, loss_d, logs

    def _train_step(self, batch: tuple[Tensor, Tensor]) -> dict[str, float]:
        x, y = (t.to(self.device_) for t in batch)
        self.optimizer_.zero_grad(set_to_none=True)
        self.optimizer_d_.zero_grad(set_to_none=True)
        loss_g, loss_d, logs = self.losses(x, y)
        # both losses are differentiated at the same point: D's gradient reaches only D's weights,
        # E_s/G's gradient only theirs (the `inputs=` restriction), then both optimisers step
        loss_d.backward(inputs=list(self.discriminator_.parameters()), retain_graph=True)
        loss_g.backward(inputs=[*self.encoder_.parameters(), *self.decoder_.parameters()])
        self.optimizer_.step()
        self.optimizer_d_.step()
        return logs

    def train_more(self, steps: int) -> None:
        super().train_more(steps)
        if getattr(self, "teacher_", None) is not None:  # the training data is attached: measure the range
            self.degree_range_ = self.calibrate_degree()

    @torch.no_grad()
    def calibrate_degree(self, n: int = DEGREE_SAMPLES) -> tuple[float, float]:
        """Where the trained data sit on the added dimension: (the median code of n original images, the
        code of the strongest added level, read as the 95th percentile of the added images' codes in the
        direction away from the originals'). `generate_degree` maps degree 0 .. 1 onto that range."""
        rng = np.random.default_rng([self.seed, 7])
        originals = self.original_.sample(n, rng)[0]
        added = self.added_[torch.from_numpy(rng.integers(0, len(self.added_), size=n))].float() / 255
        lo = float(self.encode(originals)[:, self.added_dim].median())
        codes = self.encode(added)[:, self.added_dim]
        up = float(codes.median()) >= lo
        hi = float(torch.quantile(codes, 0.95 if up else 0.05))
        return lo, hi

    def _meta_extra(self) -> dict:
        return {"degree_range": None if self.degree_range_ is None else list(self.degree_range_)}

    def _load_meta_extra(self, meta: dict, meta_file) -> None:
        from anomalab.errors import LoadError

        value = meta.get("degree_range")
        if value is None:
            self.degree_range_ = None
            return
        finite = isinstance(value, list) and all(
            isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) for v in value)
        if not finite or len(value) != 2:
            raise LoadError(f"{meta_file}: degree_range must be two finite numbers, got {value!r}")
        self.degree_range_ = (float(value[0]), float(value[1]))

    def degree_code(self, degree: float) -> float:
        """The added dimension's code for a user degree in [0, 1]: 0 = where the normal images sit, 1 = the
        strongest trained level (`degree_range_`), linear in between."""
        from anomalab.errors import NotFittedError, ParameterError

        if isinstance(degree, bool) or not isinstance(degree, (int, float)) or not math.isfinite(degree) \
                or not 0 <= degree <= 1:
            raise ParameterError(f"degree must be a number from 0 (as the normal images) to 1 (the strongest "
                                 f"trained level of the added feature), got {degree!r}")
        if self.degree_range_ is None:
            raise NotFittedError(f"this {self.name} model has no degree range (saved before it was recorded, or "
                                 "never trained with its data): train it further, or call generate(images, code) "
                                 "with a code of the added dimension")
        lo, hi = self.degree_range_
        return lo + float(degree) * (hi - lo)

    def generate_degree(self, images: Tensor, degree: float) -> Tensor:
        """Pseudo-anomalies of a user degree in [0, 1] (see `degree_code`) -> (N, 3, 64, 64)."""
        return self.generate(images, self.degree_code(degree))

    # ---- generation ----------------------------------------------------------------------------
    def generate(self, images: Tensor, degree: float | Tensor) -> Tensor:
        """Pseudo-anomalies: encode normal `images` (N, C, H, W) in [0, 1], set the added dimension to
        `degree` (a float or (N,); larger = stronger added feature) and decode -> (N, 3, 64, 64).

        The degree is the dim's absolute value, as in the source. Where normal images sit on it is learnt:
        `encode(images)[:, added_dim]` tells (in our dSprites runs white sprites sit at ~1.7-1.9 and the
        reddest added level at ~2.8-2.9, so degrees 2 .. 5 go from white to red; values far below the data's codes
        decode to artefacts)."""
        z = self.encode(images)
        z[:, self.added_dim] = torch.as_tensor(degree, dtype=z.dtype)
        return self.decode(z)
