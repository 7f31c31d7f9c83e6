"""One contract every registered detector keeps (fit, score, map, save/load, seeds, errors)."""

from __future__ import annotations

import pytest
import torch

import anomalab as al
from anomalab.detector import LoadError, NotFittedError
from anomalab.metrics import image_auroc

# Tiny parameters so each detector fits the tiny case in seconds.
CONTRACT_PARAMS: dict[str, dict] = {
    "conv_ae": dict(latent_dim=16, epochs=30, batch_size=16, lr=1e-2),
    "vae": dict(latent_dim=16, epochs=30, batch_size=16, lr=1e-2),
    "knn": dict(k=3),
    "pca": dict(n_components=8),
    "anogan": dict(latent_dim=8, width=8, epochs=20, batch_size=4, lr=5e-3, n_steps=30, latent_lr=0.1),
    "egbad": dict(latent_dim=16, epochs=8, batch_size=8, lr=3e-3),  # 4 epochs separate only at some thread counts
    "ganomaly": dict(latent_dim=16, width=8, epochs=20, batch_size=8, lr=1e-3),
    "skip_ganomaly": dict(width=8, epochs=10, batch_size=8, lr=2e-3),
    "gaussian": dict(image_size=64),
    "metric": dict(image_size=32, embedding_dim=16, train_blocks=2, epochs=3, batch_size=16),
    "patchcore": dict(image_size=64),
    "padim": dict(image_size=64),
}
AUROC_FLOOR = 0.8  # the anomalies are a bright square plus noise: any working detector separates them


def test_every_detector_has_contract_params():
    assert sorted(CONTRACT_PARAMS) == sorted(al.list_detectors())


@pytest.fixture(scope="module", params=sorted(CONTRACT_PARAMS))
def fitted(request, tiny_case):
    name = request.param
    train, _ = tiny_case
    return name, al.create(name, **CONTRACT_PARAMS[name]).fit(train)


def test_scores_are_finite_and_separate_obvious_anomalies(fitted, tiny_case):
    name, det = fitted
    _, test = tiny_case
    scores = det.score(test.images)
    assert scores.shape == (len(test),)
    assert torch.isfinite(scores).all()
    assert image_auroc(test.labels.numpy(), scores.numpy()) >= AUROC_FLOOR, name


def test_score_map_shape_or_clear_refusal(fitted, tiny_case):
    name, det = fitted
    _, test = tiny_case
    try:
        maps = det.score_map(test.images[:3])
    except NotImplementedError as e:
        assert name in str(e)
        return
    assert maps.shape == (3, 28, 28)
    assert torch.isfinite(maps).all()


def test_save_load_gives_identical_scores(fitted, tiny_case, tmp_path):
    name, det = fitted
    _, test = tiny_case
    det.fit_threshold(tiny_case[0], max_fpr=0.05)
    det.save(tmp_path / name)
    again = al.load(tmp_path / name)
    assert type(again) is type(det)
    assert torch.equal(det.score(test.images), again.score(test.images))
    assert again.threshold_ == det.threshold_


def test_same_seed_same_scores(fitted, tiny_case):
    name, det = fitted
    train, test = tiny_case
    twin = al.create(name, **CONTRACT_PARAMS[name]).fit(train)
    assert torch.allclose(det.score(test.images), twin.score(test.images), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize(
    "bad, message",
    [
        (torch.rand(28, 28), "(N, C, H, W)"),
        (torch.full((2, 1, 28, 28), float("nan")), "NaN"),
        (torch.rand(2, 5, 28, 28), "channels"),
        (torch.rand(2, 1, 28, 28) * 3, "[0, 1]"),
    ],
)
def test_bad_input_gives_a_clear_error(fitted, bad, message):
    _, det = fitted
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)").replace("[", r"\[")):
        det.score(bad)


@pytest.mark.parametrize("name", sorted(CONTRACT_PARAMS))
def test_unfitted_detector_refuses_to_score(name):
    with pytest.raises(NotFittedError, match="not fitted"):
        al.create(name, **CONTRACT_PARAMS[name]).score(torch.rand(2, 1, 28, 28))


def test_load_refuses_incomplete_or_foreign_folders(fitted, tmp_path):
    name, det = fitted
    det.save(tmp_path / "d")
    (tmp_path / "d" / "weights.safetensors").unlink()
    with pytest.raises(LoadError, match="weights.safetensors is missing"):
        al.load(tmp_path / "d")
    det.save(tmp_path / "v")
    meta_path = tmp_path / "v" / "detector.json"
    meta_path.write_text(meta_path.read_text().replace(al.__version__, "9.9.0"))
    with pytest.raises(LoadError, match="9.9.0"):
        al.load(tmp_path / "v")


def _quick(name: str) -> dict:
    """The contract parameters with the fewest epochs that still run every code path."""
    params = dict(CONTRACT_PARAMS[name])
    if "epochs" in params:
        params["epochs"] = 1
    if "n_steps" in params:
        params["n_steps"] = 3
    return params


@pytest.mark.parametrize("name", sorted(CONTRACT_PARAMS))
@pytest.mark.parametrize("train_shape, test_shape", [((3, 32, 32), (3, 24, 40)), ((1, 24, 40), (3, 32, 32))])
def test_rgb_and_non_square_images(name, train_shape, test_shape, mnist):
    """Fit on RGB or non-square images, score others: finite scores, maps at each input's own resolution."""
    g = torch.Generator().manual_seed(0)
    digits = mnist.images[:24]

    def make(shape, n):
        c, h, w = shape
        x = torch.nn.functional.interpolate(digits[:n], size=(h, w), mode="bilinear", align_corners=False)
        tint = torch.rand(n, c, 1, 1, generator=g) * 0.5 + 0.5
        return (x.expand(-1, c, -1, -1) * tint).clamp(0, 1).contiguous()

    det = al.create(name, **_quick(name)).fit(make(train_shape, 24))
    test = make(test_shape, 4)
    scores = det.score(test)
    assert scores.shape == (4,) and torch.isfinite(scores).all()
    try:
        maps = det.score_map(test)
    except NotImplementedError:
        return
    assert maps.shape == (4, *test_shape[1:]) and torch.isfinite(maps).all()


@pytest.mark.parametrize("name", sorted(CONTRACT_PARAMS))
@pytest.mark.parametrize(
    "bad, message",
    [
        (torch.rand(4, 28, 28), "(N, C, H, W)"),
        (torch.full((4, 1, 28, 28), float("nan")), "NaN"),
        (torch.rand(4, 5, 28, 28), "channels"),
        (torch.rand(4, 1, 28, 28) * 3, "[0, 1]"),
        (torch.rand(0, 1, 28, 28), "no images"),
    ],
)
def test_bad_training_input_gives_a_clear_error(name, bad, message):
    from anomalab.errors import UserError

    det = al.create(name, **CONTRACT_PARAMS[name])
    with pytest.raises(UserError) as info:
        det.fit(bad)
    assert message in str(info.value) and f"{name}.fit" in str(info.value)
    assert not det.is_fitted


def test_refit_with_the_same_seed_is_identical(fitted, tiny_case):
    """Bit-identical scores after refitting with the same seed (a stricter twin of test_same_seed_same_scores)."""
    name, det = fitted
    train, test = tiny_case
    again = al.create(name, **CONTRACT_PARAMS[name]).fit(train)
    assert torch.equal(det.score(test.images), again.score(test.images)), name
