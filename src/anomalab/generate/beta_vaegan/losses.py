"""Losses of the beta-VAE teacher and the beta-VAEGAN student (Akita & Taguchi, eq. 1-5; docs/beta_vaegan.md).

Every function returns per-image values (N,) unless it says otherwise; the model averages over the batch.
Posteriors are diagonal Gaussians given as (mean, logvar).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor


def kl_to_standard_normal(mean: Tensor, logvar: Tensor) -> Tensor:
    """KL[N(mean, exp(logvar)) || N(0, I)] summed over latent dims: (N,)."""
    return 0.5 * (mean.pow(2) + logvar.exp() - 1.0 - logvar).sum(1)


def kl_gaussians(mean_q: Tensor, logvar_q: Tensor, mean_p: Tensor, logvar_p: Tensor) -> Tensor:
    """KL[N(mean_q, var_q) || N(mean_p, var_p)] summed over latent dims: (N,). Eq. 3 (L_KD) with
    q = the student's posterior without the added dims, p = the teacher's posterior."""
    return 0.5 * (logvar_p - logvar_q + (logvar_q.exp() + (mean_q - mean_p).pow(2)) / logvar_p.exp() - 1.0).sum(1)


def bernoulli_nll(logits: Tensor, x: Tensor) -> Tensor:
    """-log p(x | z) for Bernoulli pixels, summed over pixels: (N,) (the beta-VAE's reconstruction term)."""
    return F.binary_cross_entropy_with_logits(logits, x, reduction="none").flatten(1).sum(1)


def feature_reconstruction(features_x: Tensor, features_rec: Tensor) -> Tensor:
    """Squared error between D's intermediate features of x and of G(z_s), summed over features: (N,).
    Eq. 2's reconstruction term as the source defines it (VAEGAN's learned similarity)."""
    return (features_x - features_rec).pow(2).flatten(1).sum(1)


def filter_added(z_add: Tensor, y: Tensor) -> Tensor:
    """Eq. 5 (conditional filtered GAN): |z_add| where y = 1, -|z_add| where y = 0. z_add (N, a), y (N,)."""
    sign = 2.0 * y.to(z_add.dtype).view(-1, *([1] * (z_add.ndim - 1))) - 1.0
    return sign * z_add.abs()


def prior_codes(n: int, latent_dim: int, added_dims: int, generator: torch.Generator | None = None
                ) -> tuple[Tensor, Tensor]:
    """z_y and y of eq. 4: z_p ~ Unif(-1, 1)^(k+a), y uniform in {0, 1}, added part filtered by eq. 5."""
    z = torch.rand(n, latent_dim + added_dims, generator=generator) * 2.0 - 1.0
    y = torch.randint(0, 2, (n,), generator=generator)
    z[:, latent_dim:] = filter_added(z[:, latent_dim:], y)
    return z, y


def discriminator_loss(real_logit: Tensor, rec_logit: Tensor, prior_logit: Tensor | None, gamma: float,
                       mismatch_logit: Tensor | None = None, mismatch_weight: float = 0.0) -> Tensor:
    """-L_GAN of eq. 4 for D (a scalar, batch means): -log D(x, y) - log(1 - D(G(z_s), y))
    - gamma * log(1 - D(G(z_y), y)) - mismatch_weight * log(1 - D(x, 1 - y)). D maximises L_GAN = minimises this.

    The last term is the source's text around eq. 4 ("D outputs 1 when x is real AND its label y is correct,
    0 otherwise"): real images given the wrong label are negatives (a matching-aware discriminator, as in
    Reed et al. 2016). Without it nothing shows D a real image with a wrong label, so D can ignore y."""
    bce = F.binary_cross_entropy_with_logits
    loss = bce(real_logit, torch.ones_like(real_logit)) + bce(rec_logit, torch.zeros_like(rec_logit))
    if gamma:
        loss = loss + gamma * bce(prior_logit, torch.zeros_like(prior_logit))
    if mismatch_weight:
        loss = loss + mismatch_weight * bce(mismatch_logit, torch.zeros_like(mismatch_logit))
    return loss


def generator_loss(rec_logit: Tensor, prior_logit: Tensor | None, gamma: float) -> Tensor:
    """The encoder/decoder side of eq. 4 in the usual non-saturating form (a scalar, batch means):
    -log D(G(z_s), y) - gamma * log D(G(z_y), y)."""
    bce = F.binary_cross_entropy_with_logits
    loss = bce(rec_logit, torch.ones_like(rec_logit))
    if gamma:
        loss = loss + gamma * bce(prior_logit, torch.ones_like(prior_logit))
    return loss


def stratified_log_weights(m: int, dataset_size: int) -> Tensor:
    """(M, M) log importance weights of minibatch-stratified sampling (Chen et al. 2018, appendix C.2): row i
    weighs its own term 1 / N, one other term (row i's successor, cyclically) (N - M + 1) / (N (M - 1)), and the
    remaining M - 2 terms 1 / (M - 1) each: the batch stands for a draw of the data set stratified around x_i."""
    n, r = dataset_size, m - 1
    w = torch.full((m, m), 1.0 / r)
    idx = torch.arange(m)
    w[idx, idx] = 1.0 / n
    w[idx, (idx + 1) % m] = (n - r) / (n * r)
    return w.log()


def tc_decomposition(z: Tensor, mean: Tensor, logvar: Tensor, dataset_size: int,
                     estimator: str = "mws") -> dict[str, Tensor]:
    """The KL term of a batch split as beta-TCVAE does (Chen et al. 2018, "Isolating Sources of
    Disentanglement in VAEs"): index-code mutual information E[log q(z|x) - log q(z)], total correlation
    E[log q(z) - sum_k log q(z_k)] and dimension-wise KL E[sum_k log q(z_k) - log p(z)]. estimator "mws"
    (minibatch-weighted sampling): log q(z_i) ~ logsumexp_j log q(z_i | x_j) - log(N M) over the batch (M
    images of a data set of N); "mss" (minibatch-stratified sampling): logsumexp_j [log w_ij + log q(z_i | x_j)]
    with `stratified_log_weights`. z, mean, logvar: (M, K). Returns {"mi", "tc", "dwkl"} (scalars); their sum
    is the single-sample estimate of E[log q(z|x) - log p(z)]."""
    m = len(z)
    log_norm = math.log(2 * math.pi)
    # log q(z_i,k | x_j) for every pair (i, j): (M, M, K)
    pair = -0.5 * (log_norm + logvar[None] + (z[:, None] - mean[None]).pow(2) * (-logvar[None]).exp())
    log_qz_x = pair.diagonal(dim1=0, dim2=1).T.sum(1)  # log q(z_i | x_i), (M,)
    if estimator == "mss" and m > 1:
        log_w = stratified_log_weights(m, dataset_size).to(pair)
        log_qz = torch.logsumexp(log_w + pair.sum(2), dim=1)
        log_prod_qzk = torch.logsumexp(log_w[..., None] + pair, dim=1).sum(1)
    elif estimator in ("mws", "mss"):
        log_mnm = math.log(dataset_size * m)
        log_qz = torch.logsumexp(pair.sum(2), dim=1) - log_mnm
        log_prod_qzk = (torch.logsumexp(pair, dim=1) - log_mnm).sum(1)
    else:
        raise ValueError(f"estimator must be 'mws' or 'mss', got {estimator!r}")
    log_pz = (-0.5 * (log_norm + z.pow(2))).sum(1)
    return {"mi": (log_qz_x - log_qz).mean(), "tc": (log_qz - log_prod_qzk).mean(),
            "dwkl": (log_prod_qzk - log_pz).mean()}
