import json

import numpy as np
import pytest
import torch
from torch.distributions import Normal, kl_divergence

from anomalab.data.dsprites import ColouredDSprites, DSprites, added_factors
from anomalab.detector import LoadError
from anomalab.generate.beta_vaegan import BetaVAE, BetaVAEGAN
from anomalab.generate.beta_vaegan import losses as L
from anomalab.generate.beta_vaegan.nets import Decoder64, Discriminator64, Encoder64
from anomalab.types import ImageSet


def _gauss(n=6, d=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, d, generator=g), torch.randn(n, d, generator=g) * 0.5


def test_kl_losses_match_torch_distributions():
    m, lv = _gauss()
    ref = kl_divergence(Normal(m, (0.5 * lv).exp()), Normal(0.0, 1.0)).sum(1)
    torch.testing.assert_close(L.kl_to_standard_normal(m, lv), ref)
    m2, lv2 = _gauss(seed=1)
    ref = kl_divergence(Normal(m, (0.5 * lv).exp()), Normal(m2, (0.5 * lv2).exp())).sum(1)
    torch.testing.assert_close(L.kl_gaussians(m, lv, m2, lv2), ref)
    assert L.kl_gaussians(m, lv, m, lv).abs().max() < 1e-6


def test_reconstruction_losses_match_formula():
    g = torch.Generator().manual_seed(0)
    logits, x = torch.randn(3, 2, 4, 4, generator=g), torch.rand(3, 2, 4, 4, generator=g).round()
    p = torch.sigmoid(logits)
    ref = -(x * p.log() + (1 - x) * (1 - p).log()).flatten(1).sum(1)
    torch.testing.assert_close(L.bernoulli_nll(logits, x), ref)
    fa, fb = torch.randn(3, 10, generator=g), torch.randn(3, 10, generator=g)
    torch.testing.assert_close(L.feature_reconstruction(fa, fb), ((fa - fb) ** 2).sum(1))


def test_filter_and_prior_codes_follow_eq5():
    z = torch.tensor([[-0.5], [0.3], [-0.2], [0.7]])
    y = torch.tensor([1, 1, 0, 0])
    torch.testing.assert_close(L.filter_added(z, y), torch.tensor([[0.5], [0.3], [-0.2], [-0.7]]))
    z, y = L.prior_codes(2000, 5, 1, torch.Generator().manual_seed(0))
    assert z.shape == (2000, 6) and z.abs().max() <= 1.0
    assert (z[y == 1, 5] >= 0).all() and (z[y == 0, 5] <= 0).all()
    assert 0.4 < y.float().mean() < 0.6 and z[:, :5].mean().abs() < 0.05


def test_gan_losses_match_eq4():
    real, rec, prior = torch.tensor([2.0, -1.0]), torch.tensor([0.5, -0.3]), torch.tensor([1.5, 0.1])
    d = torch.sigmoid
    ref = -(d(real).log().mean() + (1 - d(rec)).log().mean() + 5 * (1 - d(prior)).log().mean())
    torch.testing.assert_close(L.discriminator_loss(real, rec, prior, 5.0), ref)
    torch.testing.assert_close(L.discriminator_loss(real, rec, None, 0.0),
                               -(d(real).log().mean() + (1 - d(rec)).log().mean()))
    ref = -(d(rec).log().mean() + 5 * d(prior).log().mean())
    torch.testing.assert_close(L.generator_loss(rec, prior, 5.0), ref)
    wrong = torch.tensor([0.7, -2.0])  # D's logits for the real images given the wrong label
    ref = -(d(real).log().mean() + (1 - d(rec)).log().mean() + 5 * (1 - d(prior)).log().mean()
            + 0.5 * (1 - d(wrong)).log().mean())
    torch.testing.assert_close(L.discriminator_loss(real, rec, prior, 5.0, wrong, 0.5), ref)


def test_net_shapes():
    x = torch.rand(2, 3, 64, 64)
    mean, logvar = Encoder64(3, 6)(x)
    assert mean.shape == logvar.shape == (2, 6)
    assert Decoder64(3, 6)(mean).shape == (2, 3, 64, 64)
    logit, feat = Discriminator64(3)(x, torch.tensor([0, 1]))
    assert logit.shape == (2,) and feat.shape == (2, 64 * 8 * 8)


@pytest.fixture(scope="module")
def teacher():
    t = BetaVAE(latent_dim=5, steps=4, batch_size=8, seed=0)
    t.progress = False
    return t.fit()


@pytest.fixture(scope="module")
def added():
    f = added_factors()[::97]
    return ImageSet(images=ColouredDSprites().images_from_factors(f), labels=np.ones(len(f), dtype=np.int64))


def test_teacher_trains_deterministically_and_round_trips(teacher, tmp_path):
    x = DSprites().images(np.arange(0, 737_280, 91_000))
    again = BetaVAE(latent_dim=5, steps=4, batch_size=8, seed=0)
    again.progress = False
    torch.testing.assert_close(again.fit().encode(x), teacher.encode(x))
    assert len(teacher.history_) == 1 and np.isfinite(teacher.history_[0]["loss"])
    teacher.save(tmp_path / "t")
    torch.testing.assert_close(BetaVAE.load(tmp_path / "t").encode(x), teacher.encode(x))
    with pytest.raises(LoadError, match="not 'beta_vaegan'"):
        BetaVAEGAN.load(tmp_path / "t")


def test_student_starts_from_teacher_and_trains(teacher, added, tmp_path):
    s = BetaVAEGAN(gamma=1.0, steps=4, batch_size=8, seed=0)
    s.progress = False
    s.fit(teacher, added, steps=0)
    white = DSprites().images(np.arange(0, 737_280, 91_000))
    torch.testing.assert_close(s.encode(white)[:, :5], teacher.encode(white))  # gray -> RGB white input
    # the added dim starts unread and unwritten: z6 = 0 for every image, and the decoder ignores it
    assert s.encode(white)[:, 5].abs().max() == 0
    z = s.encode(white)
    torch.testing.assert_close(s.decode(z), s.decode(torch.cat([z[:, :5], torch.full_like(z[:, 5:], 3.0)], 1)))
    s.train_more(3)
    logs = s.history_[-1]
    assert {"feature", "pixel", "kl", "kd", "adv", "loss_d"} <= set(logs) and np.isfinite(logs["loss"])
    out = s.generate(white, 0.5)
    assert out.shape == (len(white), 3, 64, 64) and 0 <= out.min() and out.max() <= 1
    assert s.traverse(5, [-1.0, 0.0, 1.0]).shape == (3, 3, 64, 64)
    with pytest.raises(ValueError, match="dim"):
        s.traverse(6, [0.0])
    s.save(tmp_path / "s")
    torch.testing.assert_close(BetaVAEGAN.load(tmp_path / "s").generate(white, 0.5), out)


def test_discriminator_sees_real_images_with_the_wrong_label(teacher, added):
    """D's loss has the wrong-label term (real x with 1 - y as a negative); E_s/G's loss does not change."""
    s = BetaVAEGAN(gamma=1.0, steps=4, batch_size=8, seed=0)
    s.progress = False
    s.fit(teacher, added, steps=0)
    x, y = s._draw(np.random.default_rng(0))
    out = {}
    for w in (0.0, 2.0):
        s.w_mismatch = w
        torch.manual_seed(0)
        out[w] = s.losses(x, y, torch.Generator().manual_seed(0))
    with torch.no_grad():
        wrong = s.discriminator_(x, 1 - y)[0]
    term = 2.0 * torch.nn.functional.binary_cross_entropy_with_logits(wrong, torch.zeros_like(wrong))
    torch.testing.assert_close(out[2.0][1] - out[0.0][1], term.detach(), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out[2.0][0], out[0.0][0])


def test_student_rejects_mismatched_teacher(teacher, added):
    with pytest.raises(ValueError, match="latent_dim"):
        BetaVAEGAN(latent_dim=4).fit(teacher, added)


def test_generate_command_writes_pseudo_anomalies(teacher, added, tmp_path):
    from click.testing import CliRunner
    from PIL import Image

    from anomalab.cli import main

    s = BetaVAEGAN(gamma=1.0, steps=4, batch_size=8, seed=0)
    s.progress = False
    s.fit(teacher, added, steps=0)
    s.save(tmp_path / "run" / "model")
    (tmp_path / "in").mkdir()
    for i, img in enumerate(DSprites().images(np.array([0, 400_000]))):
        Image.fromarray((img[0].numpy() * 255).astype(np.uint8)).save(tmp_path / "in" / f"sprite{i}.png")
    result = CliRunner().invoke(main, ["generate", str(tmp_path / "run"), "--images", str(tmp_path / "in"),
                                       "--degree", "0.8", "--out", str(tmp_path / "out")])
    assert result.exit_code == 0, result.output
    # untrained added dim (zero init): every input and the whole trained range sit at 0, and the command says so
    assert "degree 0.8 = 0.00 on the added dim (degree 0 = 0.00" in result.output
    assert "mean 0.00, range 0.00 .. 0.00" in result.output
    assert json.loads((tmp_path / "out" / "generate.json").read_text())["range"] == [0.0, 0.0]
    written = sorted(p.name for p in (tmp_path / "out").iterdir())
    assert written == ["generate.json", "sprite0.png", "sprite1.png"]  # generate.json: how they were made
    assert Image.open(tmp_path / "out" / "sprite0.png").size == (64, 64)
    result = CliRunner().invoke(main, ["generate", str(tmp_path / "in"), "--images", str(tmp_path / "in"),
                                       "--out", str(tmp_path / "out2")])
    assert result.exit_code == 2 and "no saved beta_vaegan model" in result.output
    for bad in ("1.5", "-0.1", "nan"):  # outside the trained range, or not a number: one line, nothing written
        result = CliRunner().invoke(main, ["generate", str(tmp_path / "run"), "--images", str(tmp_path / "in"),
                                           "--degree", bad, "--out", str(tmp_path / "out3")])
        assert result.exit_code == 2 and "degree must be a number from 0" in result.output, result.output
        assert not (tmp_path / "out3").exists()
    s.degree_range_ = None  # as a model saved before the range was recorded
    s.save(tmp_path / "old" / "model")
    result = CliRunner().invoke(main, ["generate", str(tmp_path / "old"), "--images", str(tmp_path / "in"),
                                       "--out", str(tmp_path / "out4")])
    assert result.exit_code == 2 and "has no degree range" in result.output and not (tmp_path / "out4").exists()


def test_degree_maps_zero_to_the_normal_images_and_one_to_the_strongest_added_level(teacher, added, tmp_path):
    s = BetaVAEGAN(gamma=1.0, steps=4, batch_size=8, seed=0)
    s.progress = False
    s.fit(teacher, added, steps=0)
    s.train_more(2)  # the added dim (zero at the start) now reads something
    lo, hi = s.degree_range_
    assert lo != hi
    rng = np.random.default_rng([s.seed, 7])  # the draw calibrate_degree makes, recomputed here
    originals = s.original_.sample(512, rng)[0]
    pick = torch.from_numpy(rng.integers(0, len(s.added_), size=512))
    codes = s.encode(s.added_[pick].float() / 255)[:, s.added_dim]
    assert lo == pytest.approx(float(s.encode(originals)[:, s.added_dim].median()), abs=1e-6)
    q = 0.95 if float(codes.median()) >= lo else 0.05
    assert hi == pytest.approx(float(torch.quantile(codes, q)), abs=1e-6)
    assert s.degree_code(0) == pytest.approx(lo) and s.degree_code(1) == pytest.approx(hi)
    assert s.degree_code(0.25) == pytest.approx(lo + 0.25 * (hi - lo))
    white = DSprites().images(np.array([0, 300_000]))
    torch.testing.assert_close(s.generate_degree(white, 0.5), s.generate(white, lo + 0.5 * (hi - lo)))
    s.save(tmp_path / "s")
    assert BetaVAEGAN.load(tmp_path / "s").degree_range_ == (lo, hi)
    meta = json.loads((tmp_path / "s" / "model.json").read_text())
    meta["degree_range"] = [0.0, "x"]
    (tmp_path / "s" / "model.json").write_text(json.dumps(meta))
    with pytest.raises(LoadError, match="degree_range must be two finite numbers"):
        BetaVAEGAN.load(tmp_path / "s")


def test_teacher_kl_warmup_ramps_beta():
    t = BetaVAE(beta=4.0, kl_warmup_steps=10, batch_size=2).start()
    assert t.beta_now == 0.0
    t.progress = False
    t.train_more(5)
    assert t.steps_done_ == 5 and t.beta_now == pytest.approx(2.0)
    t.train_more(10)
    assert t.beta_now == 4.0 and BetaVAE(beta=4.0).beta_now == 4.0


def test_training_resumed_from_a_saved_folder_matches_an_uncut_run(teacher, added, tmp_path):
    """Adam's moments are saved with the weights: 2 steps + save + load + 2 steps == 4 steps."""
    def student():
        s = BetaVAEGAN(gamma=1.0, steps=4, batch_size=8, seed=0)
        s.progress = False
        return s.fit(teacher, added, steps=0)

    def resumed():  # load the cut run in "a new process" and train the last 2 steps
        s = BetaVAEGAN.load(tmp_path / "cut")
        s.set_training_data(teacher, added)
        s.progress = False
        s.train_more(2)
        return s

    uncut = student()
    uncut.train_more(2)
    uncut.train_more(2)
    cut = student()
    cut.train_more(2)
    cut.save(tmp_path / "cut")
    assert (tmp_path / "cut" / "optimizer.safetensors").is_file()
    white = DSprites().images(np.arange(0, 737_280, 91_000))
    torch.testing.assert_close(resumed().encode(white), uncut.encode(white), rtol=0, atol=0)
    # without the moments (a folder from before they were saved) the run differs: the test can fail
    (tmp_path / "cut" / "optimizer.safetensors").unlink()
    assert not torch.equal(resumed().encode(white), uncut.encode(white))
    # an untrained model saved over the folder leaves no stale moments behind
    cut.save(tmp_path / "cut")
    student().save(tmp_path / "cut")
    assert not (tmp_path / "cut" / "optimizer.safetensors").exists()


@pytest.mark.parametrize("objective", ["beta_vae", "factor_vae"])
def test_teacher_resumed_from_a_saved_folder_matches_an_uncut_run(tmp_path, objective):
    """The teacher trains in channels_last with fused Adam; 3 steps + save + load + 3 steps == 3 + 3 steps
    in one process, and the saved weights are in the default layout (FactorVAE: its discriminator and D's
    optimiser resume too)."""
    def teacher():
        t = BetaVAE(batch_size=8, seed=1, objective=objective, beta=35.0).start()
        t.progress = False
        return t

    uncut = teacher()  # the data stream is seeded by the steps done at each call: cut at the same step
    uncut.train_more(3)
    uncut.train_more(3)
    cut = teacher()
    cut.train_more(3)
    cut.save(tmp_path / "t")
    assert all(p.is_contiguous() for p in cut.encoder_.parameters())
    again = BetaVAE.load(tmp_path / "t")
    again.progress = False
    again.train_more(3)
    white = DSprites().images(np.arange(0, 737_280, 91_000))
    torch.testing.assert_close(again.encode(white), uncut.encode(white), rtol=0, atol=0)
    assert not torch.equal(cut.encode(white), uncut.encode(white))  # negative control: 3 steps are not 6


def test_tc_decomposition_matches_an_explicit_computation_and_sums_to_the_kl_estimate():
    from torch.distributions import Normal as N

    g = torch.Generator().manual_seed(0)
    mean, logvar = torch.randn(6, 3, generator=g), torch.randn(6, 3, generator=g) * 0.3
    z = mean + torch.randn(6, 3, generator=g) * (0.5 * logvar).exp()
    size = 1000
    parts = L.tc_decomposition(z, mean, logvar, size)
    std = (0.5 * logvar).exp()
    log_q = torch.empty(6)
    log_prod = torch.empty(6)
    for i in range(6):  # minibatch-weighted sampling, one query at a time
        dens = N(mean, std).log_prob(z[i])  # (M, K): log q(z_i,k | x_j)
        log_q[i] = torch.logsumexp(dens.sum(1), 0) - np.log(size * 6)
        log_prod[i] = (torch.logsumexp(dens, 0) - np.log(size * 6)).sum()
    log_qzx = N(mean, std).log_prob(z).sum(1)
    log_pz = N(0.0, 1.0).log_prob(z).sum(1)
    torch.testing.assert_close(parts["mi"], (log_qzx - log_q).mean())
    torch.testing.assert_close(parts["tc"], (log_q - log_prod).mean())
    torch.testing.assert_close(parts["dwkl"], (log_prod - log_pz).mean())
    torch.testing.assert_close(sum(parts.values()), (log_qzx - log_pz).mean())
    # negative control: independent dimensions of a batch drawn from the prior have a small TC,
    # a batch whose dimensions are copies of one another a large one
    zi = torch.randn(256, 3, generator=g)
    ind = L.tc_decomposition(zi, zi, torch.full_like(zi, -4.0), 256)["tc"]
    zc = zi[:, :1].repeat(1, 3)
    dep = L.tc_decomposition(zc, zc, torch.full_like(zc, -4.0), 256)["tc"]
    assert dep > ind + 1.0


def test_stratified_tc_estimator_matches_its_weights_and_is_unbiased_on_collapsed_posteriors():
    from torch.distributions import Normal as N

    w = L.stratified_log_weights(6, 1000).exp()
    torch.testing.assert_close(w.sum(1), torch.ones(6, dtype=w.dtype))  # each row a distribution over the batch
    assert torch.allclose(w.diagonal(), torch.full((6,), 1e-3))
    g = torch.Generator().manual_seed(1)
    mean, logvar = torch.randn(6, 3, generator=g), torch.randn(6, 3, generator=g) * 0.3
    z = mean + torch.randn(6, 3, generator=g) * (0.5 * logvar).exp()
    parts = L.tc_decomposition(z, mean, logvar, 1000, "mss")
    std, lw = (0.5 * logvar).exp(), w.log()
    log_q = torch.stack([torch.logsumexp(lw[i] + N(mean, std).log_prob(z[i]).sum(1), 0) for i in range(6)])
    log_prod = torch.stack([torch.logsumexp(lw[i][:, None] + N(mean, std).log_prob(z[i]), 0).sum() for i in range(6)])
    torch.testing.assert_close(parts["tc"], (log_q - log_prod).mean())
    torch.testing.assert_close(parts["mi"], (N(mean, std).log_prob(z).sum(1) - log_q).mean())
    # every posterior the prior (a collapsed encoder): MSS finds no MI and no TC, MWS offsets of log N
    zc = torch.randn(64, 5, generator=g)
    flat = torch.zeros_like(zc)
    mss = L.tc_decomposition(zc, flat, flat, 737_280, "mss")
    mws = L.tc_decomposition(zc, flat, flat, 737_280, "mws")
    assert abs(float(mss["mi"])) < 1e-4 and abs(float(mss["tc"])) < 1e-4
    assert float(mws["tc"]) == pytest.approx(4 * np.log(737_280), rel=1e-3)
    with pytest.raises(ValueError, match="estimator"):
        L.tc_decomposition(zc, flat, flat, 10, "exact")


def test_teacher_trains_with_the_tc_objective_and_refuses_an_unknown_one():
    t = BetaVAE(batch_size=8, objective="beta_tcvae", beta=6.0).start()
    t.progress = False
    t.train_more(2)
    assert {"mi", "tc", "dwkl", "rec"} <= set(t.history_[-1]) and np.isfinite(t.history_[-1]["loss"])
    with pytest.raises(Exception, match="objective must be"):
        BetaVAE(objective="factor").start()


def test_factor_vae_permutes_each_dimension_and_its_discriminator_learns_the_difference():
    from anomalab.generate.beta_vaegan.teacher import permute_dims, tc_discriminator

    g = torch.Generator().manual_seed(0)
    z = torch.randn(512, 1, generator=g).repeat(1, 3) + 0.05 * torch.randn(512, 3, generator=g)  # correlated dims
    perm = permute_dims(z, g)
    for j in range(3):  # every column keeps its values (the marginals), only their order changes
        torch.testing.assert_close(perm[:, j].sort().values, z[:, j].sort().values)
    assert torch.corrcoef(z.T)[0, 1] > 0.99 and abs(float(torch.corrcoef(perm.T)[0, 1])) < 0.2
    # D trained on joint vs permuted samples of correlated dims finds a large TC; on independent dims ~0
    def tc_estimate(sample):
        torch.manual_seed(0)
        d = tc_discriminator(3, width=64, layers=2)
        opt = torch.optim.Adam(d.parameters(), lr=1e-3)
        for _ in range(300):
            x = sample()
            joint, prod = d(x), d(permute_dims(x))
            zeros = torch.zeros(len(x), dtype=torch.long)
            loss = torch.nn.functional.cross_entropy(joint, zeros) + torch.nn.functional.cross_entropy(prod, zeros + 1)
            opt.zero_grad()
            loss.backward()
            opt.step()
        with torch.no_grad():
            logits = d(sample())
        return float((logits[:, 0] - logits[:, 1]).mean())

    correlated = tc_estimate(lambda: torch.randn(256, 1).repeat(1, 3) + 0.1 * torch.randn(256, 3))
    independent = tc_estimate(lambda: torch.randn(256, 3))
    assert correlated > 1.0 and abs(independent) < 0.3


def test_factor_vae_teacher_trains_both_networks():
    t = BetaVAE(batch_size=8, objective="factor_vae", beta=35.0).start()
    t.progress = False
    d_before = [p.clone() for p in t.tc_disc_.parameters()]
    t.train_more(2)
    assert {"tc", "d_loss", "rec", "kl"} <= set(t.history_[-1]) and np.isfinite(t.history_[-1]["loss"])
    assert any(not torch.equal(a, b) for a, b in zip(d_before, t.tc_disc_.parameters(), strict=True))
