"""Losses and scores of the GAN detectors against independent NumPy recomputations of each formula."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from anomalab.detectors._gan import discriminator_loss
from anomalab.detectors.anogan import anogan_loss
from anomalab.detectors.egbad import bigan_losses, egbad_score, ema_decay
from anomalab.detectors.ganomaly import generator_loss, latent_score
from anomalab.detectors.skip_ganomaly import skip_generator_loss, skip_score


def _batch(seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(4, 1, 8, 8, generator=g) * 2 - 1
    x_hat = torch.rand(4, 1, 8, 8, generator=g) * 2 - 1
    z, z_hat = torch.randn(4, 10, 1, 1, generator=g), torch.randn(4, 10, 1, 1, generator=g)
    fr, ff = torch.randn(4, 6, 2, 2, generator=g), torch.randn(4, 6, 2, 2, generator=g)
    lr, lf = torch.randn(4, generator=g) * 3, torch.randn(4, generator=g) * 3
    return x, x_hat, z, z_hat, fr, ff, lr, lf


def _np(*ts):
    return [t.double().numpy() for t in ts]


def _log_sigmoid(a):
    return -np.log1p(np.exp(-a))


def test_ganomaly_generator_loss_matches_formula():
    x, x_hat, z, z_hat, fr, ff, _, _ = _batch()
    total, parts = generator_loss(x, x_hat, z, z_hat, fr, ff, w_adv=1.0, w_con=50.0, w_enc=1.0)
    nx, nxh, nz, nzh, nfr, nff = _np(x, x_hat, z, z_hat, fr, ff)
    adv = np.mean((nfr - nff) ** 2)
    con = np.mean(np.abs(nx - nxh))
    enc = np.mean((nz - nzh) ** 2)
    assert parts["adv"].item() == pytest.approx(adv, rel=1e-5)
    assert parts["con"].item() == pytest.approx(con, rel=1e-5)
    assert parts["enc"].item() == pytest.approx(enc, rel=1e-5)
    assert total.item() == pytest.approx(adv + 50 * con + enc, rel=1e-5)
    total2, _ = generator_loss(x, x_hat, z, z_hat, fr, ff, w_adv=2.0, w_con=0.0, w_enc=3.0)
    assert total2.item() == pytest.approx(2 * adv + 3 * enc, rel=1e-5)


def test_ganomaly_latent_score_is_per_image_mean_squared_latent_difference():
    _, _, z, z_hat, *_ = _batch(1)
    nz, nzh = _np(z, z_hat)
    expected = [np.mean((nz[i] - nzh[i]) ** 2) for i in range(len(nz))]
    np.testing.assert_allclose(latent_score(z, z_hat).numpy(), expected, rtol=1e-5)


def test_discriminator_loss_is_half_the_bce_of_real_and_fake():
    *_, lr, lf = _batch(2)
    nlr, nlf = _np(lr, lf)
    expected = 0.5 * (-np.mean(_log_sigmoid(nlr)) - np.mean(_log_sigmoid(-nlf)))
    assert discriminator_loss(lr, lf).item() == pytest.approx(expected, rel=1e-5)


def test_skip_ganomaly_loss_and_score_match_formula():
    x, x_hat, _, _, fr, ff, _, lf = _batch(3)
    total, parts = skip_generator_loss(x, x_hat, lf, fr, ff, w_adv=1.0, w_con=50.0, w_lat=1.0)
    nx, nxh, nfr, nff, nlf = _np(x, x_hat, fr, ff, lf)
    adv = -np.mean(_log_sigmoid(nlf))
    con = np.mean(np.abs(nx - nxh))
    lat = np.mean((nfr - nff) ** 2)
    assert parts["adv"].item() == pytest.approx(adv, rel=1e-5)
    assert total.item() == pytest.approx(adv + 50 * con + lat, rel=1e-5)
    expected = [0.9 * np.mean((nx[i] - nxh[i]) ** 2) + 0.1 * np.mean((nfr[i] - nff[i]) ** 2) for i in range(4)]
    np.testing.assert_allclose(skip_score(x, x_hat, fr, ff, lam=0.9).numpy(), expected, rtol=1e-5)


def test_anogan_loss_matches_formula_per_image():
    x, x_hat, _, _, fr, ff, _, _ = _batch(4)
    nx, nxh, nfr, nff = _np(x, x_hat, fr, ff)
    lam = 0.1
    expected = [(1 - lam) * np.abs(nx[i] - nxh[i]).sum() + lam * np.abs(nfr[i] - nff[i]).sum() for i in range(4)]
    np.testing.assert_allclose(anogan_loss(x, x_hat, fr, ff, lam).numpy(), expected, rtol=1e-5)


def test_bigan_losses_match_formula():
    *_, le, lg = _batch(5)
    nle, nlg = _np(le, lg)
    loss_d, loss_g, loss_e = bigan_losses(le, lg)
    assert loss_d.item() == pytest.approx(-np.mean(_log_sigmoid(nle)) - np.mean(_log_sigmoid(-nlg)), rel=1e-5)
    assert loss_g.item() == pytest.approx(-np.mean(_log_sigmoid(nlg)), rel=1e-5)
    assert loss_e.item() == pytest.approx(-np.mean(_log_sigmoid(-nle)), rel=1e-5)


@pytest.mark.parametrize("variant", ["fm", "cross_e"])
def test_egbad_score_matches_formula(variant):
    x, x_hat, _, _, fr, ff, _, lh = _batch(6)
    nx, nxh, nfr, nff, nlh = _np(x, x_hat, fr, ff, lh)
    w = 0.1
    if variant == "fm":
        dis = [np.abs(nfr[i] - nff[i]).sum() for i in range(4)]
    else:
        dis = [-_log_sigmoid(nlh[i]) for i in range(4)]
    expected = [(1 - w) * np.abs(nx[i] - nxh[i]).sum() + w * dis[i] for i in range(4)]
    np.testing.assert_allclose(egbad_score(x, x_hat, fr, ff, lh, variant, w).numpy(), expected, rtol=1e-5)
    with pytest.raises(ValueError, match="fm"):
        egbad_score(x, x_hat, fr, ff, lh, "l2", w)


def test_ema_decay_warms_up_then_holds():
    assert ema_decay(0.999, 0) == pytest.approx(0.1)
    assert ema_decay(0.999, 90) == pytest.approx(0.91)
    assert ema_decay(0.999, 10**6) == 0.999
