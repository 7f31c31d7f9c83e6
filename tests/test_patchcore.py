"""PatchCore and PaDiM: the coreset is greedy k-centre, the nearest-neighbour search is exact, PatchCore finds
and localises planted defects, PaDiM's per-position Gaussians are the sample mean and covariance + eps I."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import anomalab as al
from anomalab.data.textures import texture_photo
from anomalab.data.transforms import prepare
from anomalab.detectors._features import (
    covering_radius,
    gaussian_blur,
    greedy_coreset,
    max_nearest_distance,
    nearest_neighbours,
)
from anomalab.detectors.padim import PaDiM, mahalanobis
from anomalab.detectors.patchcore import PatchCore
from anomalab.errors import ParameterError
from anomalab.generate.defects import blob, missing_patch
from anomalab.metrics import image_auroc


def brute_force_greedy(points: np.ndarray, n: int, start: int) -> list[int]:
    """The textbook greedy k-centre: add the point farthest from the chosen ones, one pass per choice."""
    chosen = [start]
    while len(chosen) < n:
        d = np.linalg.norm(points[:, None, :] - points[None, chosen, :], axis=-1).min(1)
        chosen.append(int(d.argmax()))
    return chosen


def radius(points: np.ndarray, idx) -> float:
    return float(np.linalg.norm(points[:, None, :] - points[None, list(idx), :], axis=-1).min(1).max())


@pytest.mark.parametrize("pool", [4, 64, 2048])
def test_coreset_is_the_greedy_k_centre(pool):
    """Same sequence as the brute-force greedy, whatever the candidate pool (4 forces many rounds)."""
    pts = np.random.default_rng(0).uniform(0, 1, (500, 2))
    sel = greedy_coreset(torch.from_numpy(pts).float(), 60, seed=3, pool=pool).tolist()
    assert len(set(sel)) == 60
    assert sel == brute_force_greedy(pts.astype(np.float32).astype(np.float64), 60, sel[0])


def test_coreset_radius_within_twice_the_optimum():
    rng = np.random.default_rng(1)
    for trial in range(5):
        pts = rng.normal(size=(14, 2)) * rng.uniform(0.5, 2.0, size=2)
        k = 3
        optimum = min(radius(pts, c) for c in itertools.combinations(range(len(pts)), k))
        sel = greedy_coreset(torch.from_numpy(pts).float(), k, seed=trial).tolist()
        assert radius(pts, sel) <= 2 * optimum + 1e-6


def test_coreset_covers_much_better_than_a_random_subset():
    rng = np.random.default_rng(2)
    centres = rng.uniform(-10, 10, (8, 2))
    pts = np.concatenate([c + rng.normal(scale=s, size=(250, 2)) for c, s in zip(centres, rng.uniform(0.2, 2, 8))])
    x = torch.from_numpy(pts).float()
    greedy = covering_radius(x, x[greedy_coreset(x, 40, seed=0)])
    random = np.median([covering_radius(x, x[torch.randperm(len(x), generator=torch.Generator().manual_seed(s))[:40]])
                        for s in range(20)])
    assert greedy < 0.5 * random


def test_coreset_on_a_random_projection_is_seeded():
    x = torch.randn(600, 300, generator=torch.Generator().manual_seed(0))
    a, b = greedy_coreset(x, 50, seed=1), greedy_coreset(x, 50, seed=1)
    assert torch.equal(a, b) and len(set(a.tolist())) == 50
    assert not torch.equal(a, greedy_coreset(x, 50, seed=2))
    assert len(greedy_coreset(x, 10_000)) == 600  # n is capped at the number of rows


def test_chunked_nearest_neighbours_equal_cdist():
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(700, 48, generator=g), torch.randn(2500, 48, generator=g) * 1.5
    ref = torch.cdist(a.double(), b.double())
    d, idx = nearest_neighbours(a, b)
    assert torch.allclose(d.double(), ref.min(1).values, rtol=1e-5, atol=1e-5)
    assert torch.equal(idx, ref.argmin(1))
    for q_chunk, b_chunk in ((7, 13), (300, 2500), (10**6, 10**6), (1, 64)):
        d2, idx2 = nearest_neighbours(a, b, query_chunk=q_chunk, bank_chunk=b_chunk)
        assert torch.equal(idx2, idx) and torch.allclose(d2, d, rtol=1e-6, atol=1e-6)
    d3, none = nearest_neighbours(a, b, bank_chunk=100, with_index=False)
    assert none is None and torch.allclose(d3, d, rtol=1e-6, atol=1e-6)


def test_pruned_image_maximum_equals_the_full_search():
    """The image score's pruned search gives the maximum of the full nearest-neighbour distances, and where."""
    g = torch.Generator().manual_seed(1)
    bank = torch.randn(3000, 16, generator=g)
    bank = bank[greedy_coreset(bank, 3000)]  # coreset order: spread-out rows first, as in a fitted bank
    queries = bank[torch.randint(3000, (5, 200), generator=g)] + 0.05 * torch.randn(5, 200, 16, generator=g)
    queries[1, 17] += 3.0  # one clear outlier patch
    full, _ = nearest_neighbours(queries.reshape(-1, 16), bank, with_index=False)
    expected, where = full.view(5, 200).max(1)
    for coarse in (64, 512, 5000):
        got, at = max_nearest_distance(queries, bank, coarse=coarse)
        assert torch.equal(at, where) and torch.allclose(got, expected, rtol=1e-6, atol=1e-6)
    assert int(where[1]) == 17


def test_gaussian_blur_equals_scipy():
    from scipy.ndimage import gaussian_filter

    maps = torch.rand(3, 40, 57, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    for sigma, m in ((4.0, maps), (4.0, maps[:, :20, :20]), (1.5, maps)):  # 20 px < the 16 px radius x 2
        expected = np.stack([gaussian_filter(a, sigma, mode="reflect", truncate=4.0) for a in m.numpy()])
        assert np.allclose(gaussian_blur(m, sigma).numpy(), expected, atol=1e-12)
    assert torch.equal(gaussian_blur(maps, 0.0), maps)


# ---- planted defects on real texture crops -----------------------------------------------------------
def _brick_split(size: int = 96, n_train: int = 40, n_good: int = 10, n_bad: int = 10, seed: int = 0):
    """Crops of scikit-image's brick photo: training from the top rows, test from the rows below; half of the
    test crops get a stain or missing-material defect (masks returned)."""
    rng = np.random.default_rng(seed)
    photo = texture_photo("brick")

    def crops(lo, hi, n):
        ys, xs = rng.integers(lo, hi - size, n), rng.integers(0, photo.shape[1] - size, n)
        return [photo[y : y + size, x : x + size][None].copy() for y, x in zip(ys, xs)]

    train = torch.from_numpy(np.stack(crops(0, 320, n_train)))
    good = crops(320, 512, n_good)
    bad, masks = [], []
    for i, img in enumerate(crops(320, 512, n_bad)):
        out, mask = (blob(img, rng, radius=(40, 60), opacity=(0.8, 0.9)) if i % 2 else
                     missing_patch(img, rng, size=(60, 80)))
        bad.append(out)
        masks.append(mask)
    test = torch.from_numpy(np.stack(good + bad))
    labels = np.r_[np.zeros(n_good), np.ones(n_bad)]
    return train, test, labels, np.stack(masks)


@pytest.fixture(scope="module")
def brick():
    return _brick_split()


@pytest.fixture(scope="module")
def patchcore_brick(brick):
    train, *_ = brick
    return PatchCore(image_size=128).fit(train)


def test_patchcore_detects_and_localises_planted_defects(brick, patchcore_brick):
    _, test, labels, masks = brick
    scores = patchcore_brick.score(test)
    assert image_auroc(labels, scores.numpy()) >= 0.9
    maps = patchcore_brick.score_map(test[labels == 1])
    assert maps.shape == (len(masks), 96, 96)
    peak = maps.flatten(1).argmax(1).numpy()
    inside = masks.reshape(len(masks), -1)[np.arange(len(masks)), peak] > 0
    assert inside.mean() >= 0.7


def test_reweighted_score_is_eq_7(brick, patchcore_brick):
    _, test, _, _ = brick
    det = patchcore_brick
    plain = det.score(test[:6])
    det.reweight = True
    try:
        weighted = det.score(test[:6])
    finally:
        det.reweight = False
    b = det.reweight_neighbours
    x = prepare(test[:6], det.input_shape_)
    with torch.inference_mode():
        z, _ = det.embed_patches(x)
    bank = det.bank_.double()
    for i in range(6):
        d = torch.cdist(z[i].double(), bank)  # (patches, bank)
        nn_d, nn_i = d.min(1)
        k = int(nn_d.argmax())
        s_star, m_star = nn_d[k], bank[nn_i[k]]
        hood = torch.cdist(m_star[None], bank)[0].topk(b, largest=False).indices  # N_b(m*)
        dist = (z[i, k].double() - bank[hood]).norm(dim=1)
        expected = (1 - torch.exp(s_star) / torch.exp(dist).sum()) * s_star
        assert abs(float(plain[i]) - float(s_star)) < 1e-3 * float(s_star)
        assert abs(float(weighted[i]) - float(expected)) < 1e-3 * float(expected)
    assert (weighted <= plain).all() and (weighted >= (1 - 1 / b) * plain - 1e-4).all()


def test_streamed_fit_equals_fit_and_bank_size():
    x = torch.rand(10, 1, 40, 40, generator=torch.Generator().manual_seed(0))
    a = PatchCore(image_size=32, weights=None, coreset_ratio=0.25).fit(x)
    b = PatchCore(image_size=32, weights=None, coreset_ratio=0.25).fit_batches([x[:3], x[3:7], x[7:]])
    assert torch.equal(a.bank_, b.bank_)
    assert a.n_candidates_ == 10 * 4 * 4 and len(a.bank_) == 40 and a.bank_.shape[1] == 64
    assert PatchCore(image_size=32, weights=None, coreset_ratio=0.01).fit(x).bank_.shape[0] == 2


@pytest.mark.parametrize("params, message", [
    (dict(coreset_ratio=0.0), "coreset_ratio"),
    (dict(reweight_neighbours=1), "reweight_neighbours"),
    (dict(levels=(0, 4)), "levels"),
    (dict(patch_size=2), "patch_size"),
    (dict(backbone="resnet18"), "backbone"),
])
def test_bad_parameters_are_refused(params, message):
    with pytest.raises(ParameterError, match=message):
        PatchCore(image_size=32, weights=None, **params).fit(torch.rand(2, 1, 32, 32))


# ---- PaDiM ---------------------------------------------------------------------------------------------
def test_padim_gaussians_equal_numpy_mean_and_covariance():
    # 40 images: the sums are updated 32 at a time (padim.MOMENT_BATCH), then with the remaining 8
    x = torch.rand(40, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    det = PaDiM(image_size=32, weights=None, d_channels=12, eps=0.01).fit(x)
    with torch.inference_mode():
        z, grid = det.embed_patches(prepare(x, det.input_shape_))
    z = z.double().numpy()  # (N, P, d)
    assert grid == (8, 8) and z.shape == (40, 64, 12) and det.n_train_ == 40
    mean = z.mean(0)
    assert np.allclose(det.mean_.numpy(), mean, rtol=1e-5, atol=1e-6)
    precision = det.precision_.double().numpy()
    for p in range(z.shape[1]):
        cov = np.cov(z[:, p, :], rowvar=False) + 0.01 * np.eye(12)
        assert np.allclose(np.linalg.inv(precision[p]), cov, rtol=1e-4, atol=1e-6)
    # the map before upsampling is the per-position Mahalanobis distance
    f = torch.from_numpy(z[:2]).float()
    expected = np.sqrt(np.einsum("npi,pij,npj->np", z[:2] - mean, precision, z[:2] - mean))
    assert np.allclose(mahalanobis(f, det.mean_, det.precision_).numpy(), expected, rtol=1e-4)


def test_padim_channel_subset_is_seeded():
    x = torch.rand(4, 1, 32, 32, generator=torch.Generator().manual_seed(0))
    a = PaDiM(image_size=32, weights=None, d_channels=20, seed=0).fit(x)
    b = PaDiM(image_size=32, weights=None, d_channels=20, seed=0).fit(x)
    c = PaDiM(image_size=32, weights=None, d_channels=20, seed=1).fit(x)
    assert torch.equal(a.channels_, b.channels_) and not torch.equal(a.channels_, c.channels_)
    assert len(a.channels_) == 20 and a.channels_.max() < 24 + 40 + 80
    assert len(PaDiM(image_size=32, weights=None, d_channels=1000).fit(x).channels_) == 144


def test_padim_detects_and_localises_planted_defects(brick):
    train, test, labels, masks = brick
    det = PaDiM(image_size=128).fit(train)  # 40 images for 100-d Gaussians: eps I carries the covariance
    assert image_auroc(labels, det.score(test).numpy()) >= 0.8
    maps = det.score_map(test[labels == 1]).numpy()
    inside = (maps * masks).sum((1, 2)) / masks.sum((1, 2))
    outside = (maps * (1 - masks)).sum((1, 2)) / (1 - masks).sum((1, 2))
    assert (inside > 1.5 * outside).mean() >= 0.8


# ---- Lite1 / Lite2 backbones ---------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["effnet_lite1", "effnet_lite2"])
def test_lite1_and_lite2_load_their_packaged_weights(name):
    import skimage.data

    from anomalab.nets.effnet_lite0 import make_backbone, packaged_weights_path

    net = make_backbone(name)
    state = torch.load(packaged_weights_path(name), weights_only=True, map_location="cpu")
    assert list(state) == list(net.state_dict())
    img = torch.from_numpy(skimage.data.chelsea()).permute(2, 0, 1).float()[None] / 255
    x = F.interpolate(img, size=(128, 128), mode="bilinear", antialias=True, align_corners=False)
    with torch.inference_mode():
        probs = net(x).softmax(1)[0]
        feats = net.features(x, (4, 6))
    assert 281 <= int(probs.argmax()) <= 285 and probs[281:286].sum() > 0.8
    assert [feats[level].shape[1] for level in (4, 6)] == [net.level_channels[3], net.level_channels[5]]
    det = al.create("patchcore", backbone=name, weights=None, image_size=32).fit(torch.rand(3, 1, 32, 32))
    assert torch.isfinite(det.score(torch.rand(2, 1, 32, 32))).all()
