"""GAN nets and procedures: shapes at several sizes, GANomaly's D re-initialisation, AnoGAN's batched
latent search, EGBAD's weight averages."""

from __future__ import annotations

import pytest
import torch

import anomalab.detectors._gan as gan_module
from anomalab.detectors._gan import power_of_two_size, to_signed
from anomalab.detectors.anogan import anogan_loss, latent_search
from anomalab.detectors.egbad import EGBAD
from anomalab.detectors.ganomaly import GANomaly
from anomalab.nets.bigan import BiGANDiscriminator, BiGANEncoder, BiGANGenerator
from anomalab.nets.dcgan import DCDecoder, DCDiscriminator, DCEncoder
from anomalab.nets.unet import UNetGenerator


@pytest.mark.parametrize("size, channels", [(16, 1), (32, 3), (64, 1)])
def test_dcgan_and_unet_shapes(size, channels):
    x = torch.rand(2, channels, size, size) * 2 - 1
    assert DCEncoder(size, channels, 7, width=4)(x).shape == (2, 7, 1, 1)
    out = DCDecoder(size, channels, 7, width=4)(torch.randn(2, 7))
    assert out.shape == (2, channels, size, size) and out.abs().max() <= 1
    logit, feat = DCDiscriminator(size, channels, width=4)(x)
    assert logit.shape == (2,) and feat.shape[-2:] == (4, 4)
    assert UNetGenerator(size, channels, width=4)(x).shape == x.shape


def test_nets_refuse_sizes_that_are_not_powers_of_two():
    with pytest.raises(ValueError, match="power-of-two"):
        DCEncoder(24, 1, 8)
    with pytest.raises(ValueError, match="power-of-two"):
        UNetGenerator(8, 1)


def test_model_sizes():
    assert power_of_two_size(28, 28) == 32
    assert power_of_two_size(8, 8) == 16
    assert power_of_two_size(100, 90) == 128
    assert GANomaly()._model_shape((3, 28, 28)) == (3, 32, 32)
    assert EGBAD()._model_shape((1, 28, 28)) == (1, 28, 28)


@pytest.mark.parametrize("h, w", [(28, 28), (32, 32)])
def test_bigan_shapes(h, w):
    x = torch.rand(3, 1, h, w) * 2 - 1
    z = BiGANEncoder(1, h, w, 5)(x)
    assert z.shape == (3, 5)
    assert BiGANGenerator(1, h, w, 5)(z).shape == x.shape
    logit, feat = BiGANDiscriminator(1, h, w, 5)(x, z)
    assert logit.shape == (3,) and feat.shape == (3, 1024)


def test_ganomaly_fits_rgb_at_another_size():
    det = GANomaly(latent_dim=4, width=4, epochs=1, batch_size=4)
    det.progress = False
    det.fit(torch.rand(8, 3, 60, 60))
    assert det.input_shape_ == (3, 64, 64)
    assert det.score(torch.rand(2, 3, 60, 60)).shape == (2,)
    assert det.score_map(torch.rand(2, 3, 60, 60)).shape == (2, 60, 60)
    assert det.reconstruct(torch.rand(2, 3, 60, 60)).shape == (2, 3, 64, 64)
    z, z_hat = det.latents(torch.rand(2, 3, 60, 60))
    assert z.shape == z_hat.shape == (2, 4)


def _one_step(monkeypatch, collapse: float):
    monkeypatch.setattr(gan_module, "D_COLLAPSE", collapse)
    det = GANomaly(latent_dim=4, width=4, epochs=1, batch_size=4)
    det.input_shape_ = (1, 16, 16)
    det._build(det.input_shape_)
    det.optimizers_ = det._make_optimizers()
    torch.manual_seed(0)
    logs = det._train_step(to_signed(torch.rand(4, 1, 16, 16, generator=torch.Generator().manual_seed(1))))
    return logs, det.discriminator_.head.weight.detach().clone()


def test_ganomaly_reinitialises_d_only_when_its_loss_collapses(monkeypatch):
    logs, after_step = _one_step(monkeypatch, 1e-5)
    assert logs["d_reinit"] == 0.0 and logs["loss_d"] > 1e-5
    logs, after_reinit = _one_step(monkeypatch, 1e9)  # every loss counts as collapsed
    assert logs["d_reinit"] == 1.0
    assert not torch.allclose(after_step, after_reinit)
    assert after_reinit.std().item() == pytest.approx(0.02, rel=0.3)  # a fresh N(0, 0.02) draw


def test_anogan_batched_search_equals_one_row_at_a_time():
    torch.manual_seed(0)
    g = DCDecoder(16, 1, 6, width=4).eval()
    d = DCDiscriminator(16, 1, width=4).eval()
    for p in [*g.parameters(), *d.parameters()]:
        p.requires_grad_(False)
    x = torch.rand(3, 1, 16, 16) * 2 - 1
    z0 = torch.randn(3, 6)
    z, score, x_hat = latent_search(g, lambda t: d(t)[1], x, z0, n_steps=15, lam=0.1, lr=0.05)
    for i in range(3):
        zi, si, _ = latent_search(g, lambda t: d(t)[1], x[i : i + 1], z0[i : i + 1], n_steps=15, lam=0.1, lr=0.05)
        torch.testing.assert_close(zi[0], z[i], rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(si[0], score[i], rtol=1e-4, atol=1e-4)
    before = anogan_loss(x, g(z0), d(x)[1], d(g(z0))[1], 0.1)
    assert (score < before).all()  # the search lowers every row's loss
    assert all(p.grad is None for p in g.parameters())


def test_egbad_averages_weights_with_warm_up():
    det = EGBAD(latent_dim=4, epochs=1, batch_size=4, lr=1e-3)
    det.input_shape_ = (1, 8, 8)
    det._build(det.input_shape_)
    det.optimizers_ = det._make_optimizers()
    start = det.encoder_ema_.net[0].weight.detach().clone()
    det._train_step(torch.rand(4, 1, 8, 8) * 2 - 1)
    live = det.encoder_.net[0].weight.detach()
    assert not torch.equal(live, start)
    torch.testing.assert_close(det.encoder_ema_.net[0].weight, 0.1 * start + 0.9 * live)  # decay 0.1 at t=0


def test_bn_recalibration_averages_training_batches_with_final_weights():
    det = GANomaly(latent_dim=4, width=4, epochs=1, batch_size=4, bn_recalibrate=True)
    det.progress = False
    x = torch.rand(8, 1, 16, 16, generator=torch.Generator().manual_seed(0))
    det.fit(x)
    enc = det.generator_.encoder1.features
    bn = enc[3]
    with torch.no_grad():
        h = enc[:3](to_signed(x))  # the input of encoder1's first BatchNorm, final weights
    torch.testing.assert_close(bn.running_mean, h.mean((0, 2, 3)), rtol=1e-4, atol=1e-6)
    assert bn.momentum == 0.1 and int(bn.num_batches_tracked) == 2


def _no_dropout_train(net):
    net.train()
    for m in net.modules():
        if isinstance(m, torch.nn.Dropout):
            m.eval()
    return net


@pytest.mark.parametrize("name", ["ganomaly", "skip_ganomaly", "egbad", "anogan"])
def test_bn_recalibration_is_the_default_and_recomputes_the_discriminators_statistics(name):
    """Every BN-using GAN re-estimates its BatchNorm statistics after training by default: the first
    BatchNorm of the (test-time) discriminator holds the mean over the recalibration's forward passes
    (real batches and the step's fakes, in order) of its inputs, recomputed here from the final weights;
    with bn_recalibrate=False (negative control) it does not."""
    from anomalab.registry import create

    kw = {"ganomaly": {"latent_dim": 4, "width": 4}, "skip_ganomaly": {"width": 4},
          "egbad": {"latent_dim": 4}, "anogan": {"latent_dim": 4, "width": 4, "n_steps": 2}}[name]
    x = torch.rand(8, 1, 16, 16, generator=torch.Generator().manual_seed(0))
    means = {}
    for recal in (True, False):
        det = create(name, epochs=1, batch_size=4, seed=3, **kw, **({} if recal else {"bn_recalibrate": False}))
        assert det.bn_recalibrate is recal
        det.progress = False
        det.fit(x)
        if name == "egbad":
            e, g, d = (_no_dropout_train(n) for n in (det.encoder_ema_, det.generator_ema_, det.discriminator_ema_))
            first, bn = d.x_path[:4], d.x_path[4]
        else:
            g, d = _no_dropout_train(det.generator_), _no_dropout_train(det.discriminator_)
            first, bn = d.features[:3], d.features[3]
        latent = torch.Generator().manual_seed(3)
        inputs = []
        with torch.no_grad():
            for b in (to_signed(x[:4]), to_signed(x[4:])):
                z = torch.randn(len(b), kw.get("latent_dim", 1), generator=latent)
                fake = g(b)[0] if name == "ganomaly" else g(b) if name == "skip_ganomaly" else g(z)
                inputs += [first(b), first(fake)]
        expected = torch.stack([h.mean((0, 2, 3)) for h in inputs]).mean(0)
        means[recal] = (bn.running_mean.clone(), expected)
        if recal:
            torch.testing.assert_close(bn.running_mean, expected, rtol=1e-4, atol=1e-5)
            assert bn.momentum == 0.1 and int(bn.num_batches_tracked) == 4
    running, expected = means[False]
    assert not torch.allclose(running, expected, rtol=1e-3, atol=1e-4)  # training's running averages differ


def test_folded_batchnorm_nets_compute_the_same_function_and_search():
    from anomalab.detectors.anogan import AnoGAN
    from anomalab.nets.fold import fold_batchnorm

    torch.manual_seed(0)
    g, d = DCDecoder(16, 1, 8, 8).eval(), DCDiscriminator(16, 1, 8).eval()
    for m in [*g.modules(), *d.modules()]:
        if isinstance(m, torch.nn.BatchNorm2d):  # statistics far from the identity, so folding matters
            m.running_mean.normal_()
            m.running_var.uniform_(0.3, 3.0)
            m.weight.data.uniform_(0.5, 1.5)
            m.bias.data.normal_()
    gf, ff = fold_batchnorm(g), fold_batchnorm(d.features)
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in [*gf.modules(), *ff.modules()])
    assert sum(isinstance(m, torch.nn.BatchNorm2d) for m in g.modules()) == 2  # the originals are untouched
    z, x = torch.randn(5, 8), torch.rand(5, 1, 16, 16) * 2 - 1
    with torch.no_grad():
        torch.testing.assert_close(gf(z), g(z), rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(ff(x), d(x)[1], rtol=1e-5, atol=1e-5)
        assert not torch.allclose(torch.nn.Sequential(*[m for m in g.main if not isinstance(m, torch.nn.BatchNorm2d)])(
            z.reshape(-1, 8, 1, 1)), g(z), atol=1e-3)  # negative control: dropping BatchNorm is another function
    z0 = torch.randn(5, 8, generator=torch.Generator().manual_seed(0))
    for p in [*g.parameters(), *d.parameters()]:
        p.requires_grad_(False)
    plain = latent_search(g, lambda t: d(t)[1], x, z0, 10)
    folded = latent_search(gf, ff, x, z0, 10)
    torch.testing.assert_close(folded[1], plain[1], rtol=1e-4, atol=1e-4)
    det = AnoGAN(latent_dim=8, width=8, n_steps=10, epochs=1, batch_size=4)
    det.progress = False
    det.fit(torch.rand(8, 1, 16, 16, generator=torch.Generator().manual_seed(1)))
    imgs = torch.rand(3, 1, 16, 16, generator=torch.Generator().manual_seed(2))
    g2, d2 = det.generator_.eval(), det.discriminator_.eval()
    for p in [*g2.parameters(), *d2.parameters()]:
        p.requires_grad_(False)
    z1 = torch.randn(3, 8, generator=torch.Generator().manual_seed(det.seed))
    expected = latent_search(g2, lambda t: d2(t)[1], imgs * 2 - 1, z1, 10)[1]
    torch.testing.assert_close(det.score(imgs), expected, rtol=1e-4, atol=1e-4)
