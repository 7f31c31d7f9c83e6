import numpy as np
import pytest
import torch
from sklearn.covariance import LedoitWolf

from anomalab.detectors.gaussian import Gaussian, _Moments, ledoit_wolf_from_moments
from anomalab.metrics import image_auroc


def test_streamed_ledoit_wolf_matches_scikit_learn():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(3, 50, 6)) @ rng.normal(size=(6, 6)) + rng.normal(size=6) * 3  # 3 positions
    m = _Moments()
    for chunk in np.array_split(x.transpose(1, 0, 2), 4):  # (N, P, d) in 4 batches
        m.update(torch.from_numpy(chunk))
    cov = ledoit_wolf_from_moments(m.n, m.s1, m.s2, m.sa, m.sa2, m.sax)
    for p in range(3):
        expected = LedoitWolf().fit(x[p]).covariance_
        assert np.allclose(cov[p].numpy(), expected, rtol=1e-8, atol=1e-10)


@pytest.fixture(scope="module")
def fitted(tiny_case):
    train, _ = tiny_case
    return Gaussian(image_size=64).fit(train)


def test_levels_sum_and_single_levels(fitted, tiny_case):
    _, test = tiny_case
    per_level = fitted.level_scores(test.images)
    assert per_level.shape == (len(test), 9) and torch.isfinite(per_level).all()
    assert torch.allclose(fitted.score(test.images), per_level.sum(1), rtol=1e-5)
    two = Gaussian(image_size=64, levels=(7, 9))
    two.__dict__.update({k: v for k, v in fitted.__dict__.items() if k.endswith("_")})
    assert torch.allclose(two.score(test.images), per_level[:, [6, 8]].sum(1), rtol=1e-5)
    assert image_auroc(test.labels.numpy(), per_level[:, 6].numpy()) > 0.8


def test_normal_distance_matches_its_formula(fitted, tiny_case):
    train, _ = tiny_case
    x = torch.nn.functional.interpolate(train.images[:4], size=(64, 64), mode="bilinear")
    with torch.inference_mode():
        f = fitted.backbone_.features(x.expand(-1, 3, -1, -1))[3].mean((2, 3)).double()
        mu, prec = fitted.level_mean_[3], fitted.level_precision_[3]
        expected = torch.sqrt(((f - mu) @ prec * (f - mu)).sum(1))
        got = fitted._level_distances(x.expand(-1, 3, -1, -1))[:, 2]
    assert torch.allclose(got, expected, rtol=1e-6)


def test_patch_map_localises_a_local_defect(fitted, tiny_case):
    _, test = tiny_case
    normal = test.images[test.labels == 0][:8]
    bad, masks = normal.clone(), torch.zeros(8, 28, 28)
    for i in range(8):  # a bright 8x8 square, alternating between the left and the right edge
        c = 1 if i % 2 else 19
        bad[i, :, 10:18, c : c + 8] = 1.0
        masks[i, 10:18, c : c + 8] = 1.0
    maps = fitted.score_map(bad)
    assert maps.shape == (8, 28, 28)
    inside = (maps * masks).sum((1, 2)) / masks.sum((1, 2))
    outside = (maps * (1 - masks)).sum((1, 2)) / (1 - masks).sum((1, 2))
    assert (inside > outside).float().mean() >= 0.75


def test_streamed_fit_equals_in_memory_fit(fitted, tiny_case):
    train, test = tiny_case
    streamed = Gaussian(image_size=64).fit_batches(train.images[i : i + 10] for i in range(0, 48, 10))
    assert torch.allclose(streamed.score(test.images), fitted.score(test.images), rtol=1e-4)


def test_without_patch_levels_there_is_no_map(tiny_case):
    train, test = tiny_case
    det = Gaussian(image_size=32, patch_levels=None, levels=(2,)).fit(train.subset(range(8)))
    with pytest.raises(NotImplementedError, match="gaussian"):
        det.score_map(test.images[:2])
    with pytest.raises(ValueError, match="levels"):
        Gaussian(levels=(0, 3)).fit(train)


def test_map_max_image_score_is_the_largest_patch_distance():
    """image_score="map_max": each image's score is the maximum of its patch-map distances, recomputed
    here from the fitted patch Gaussians; the paper's default (sum over levels) is another score."""
    import torch

    from anomalab.errors import ParameterError
    from anomalab.registry import create

    g = torch.Generator().manual_seed(0)
    train, test = torch.rand(12, 3, 64, 64, generator=g), torch.rand(3, 3, 64, 64, generator=g)
    det = create("gaussian", image_size=64, image_score="map_max")
    det.progress = False
    det.fit(train)
    from anomalab.data.transforms import prepare

    with torch.no_grad():
        feats = det._features(prepare(test, det.input_shape_))
        f = det._patch_features(feats).double()  # (N, P, d)
    diff = f - det.patch_mean_.double()
    d = torch.einsum("npi,pij,npj->np", diff, det.patch_precision_.double(), diff).clamp_min(0).sqrt()
    torch.testing.assert_close(det.score(test).double(), d.amax(1), rtol=1e-4, atol=1e-5)
    paper = create("gaussian", image_size=64)
    paper.progress = False
    paper.fit(train)
    assert not torch.allclose(paper.score(test).double(), det.score(test).double(), rtol=1e-2)
    with pytest.raises(ParameterError, match="image_score must be"):
        create("gaussian", image_score="max").fit(train)
    with pytest.raises(ParameterError, match="needs the patch map"):
        create("gaussian", image_score="map_max", patch_levels=None).fit(train)


def test_a_wider_backbone_fits_scores_and_reloads(tmp_path):
    """EfficientNet-Lite2's levels are wider than Lite0's: the per-level Gaussians take its widths."""
    import anomalab

    g = torch.Generator().manual_seed(0)
    train, test = torch.rand(6, 3, 64, 64, generator=g), torch.rand(2, 3, 64, 64, generator=g)
    det = anomalab.create("gaussian", image_size=64, backbone="effnet_lite2")
    det.progress = False
    det.fit(train)
    widths = det.backbone_.level_channels
    assert widths != (32, 16, 24, 40, 80, 112, 192, 320, 1280)  # not Lite0's
    assert [len(det.level_mean_[level]) for level in sorted(det.level_mean_)] == list(widths)
    det.save(tmp_path / "g")
    again = anomalab.load(tmp_path / "g")
    assert torch.equal(again.score(test), det.score(test))
