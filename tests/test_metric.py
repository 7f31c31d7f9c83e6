import numpy as np
import pytest
import torch
import torch.nn.functional as F

from anomalab.detectors.metric import HEADS, Metric, center_loss, make_head, make_twins
from anomalab.types import ImageSet

TINY = dict(image_size=32, embedding_dim=16, train_blocks=1, epochs=2, batch_size=16, lr=1e-3)


def test_center_loss_matches_its_formula():
    g = torch.Generator().manual_seed(0)
    x, centers = torch.randn(5, 3, generator=g), torch.randn(2, 3, generator=g)
    y = torch.tensor([0, 1, 1, 0, 1])
    by_hand = sum(0.5 * sum((x[i, j] - centers[y[i], j]) ** 2 for j in range(3)) for i in range(5)) / 5
    assert center_loss(x, y, centers).item() == pytest.approx(float(by_hand), rel=1e-6)
    head = make_head("center", 2, 3)
    head.centers.data = centers
    ce = F.cross_entropy(head.fc(x), y)
    assert head(x, y).item() == pytest.approx(ce.item() + center_loss(x, y, centers).item() / 8, rel=1e-6)


def test_margin_units_follow_the_reference_settings():
    arc, cos, sphere = make_head("arcface", 2, 4), make_head("cosface", 2, 4), make_head("sphereface", 2, 4)
    assert arc.loss.margin == pytest.approx(0.5)  # 0.5 rad, given to the library in degrees
    assert cos.loss.margin == pytest.approx(0.4) and sphere.loss.margin == 4
    assert make_head("l2_softmax", 2, 4).alpha == 16.0
    with pytest.raises(ValueError, match="unknown head"):
        make_head("triplet", 2, 4)


def test_arcface_head_matches_an_independent_recomputation():
    g = torch.Generator().manual_seed(1)
    head = make_head("arcface", 3, 4)
    x, y = torch.randn(6, 4, generator=g), torch.tensor([0, 1, 2, 0, 1, 2])
    cosine = F.normalize(x, dim=1) @ F.normalize(head.loss.W, dim=0)
    theta = torch.acos(cosine.clamp(-1, 1))
    target = F.one_hot(y, 3).bool()
    logits = 64.0 * torch.where(target, torch.cos(theta + 0.5), cosine)  # s (cos(theta_y + m)), cos theta_j
    assert head(x, y).item() == pytest.approx(F.cross_entropy(logits, y).item(), rel=1e-4)


def test_l2_softmax_rescales_features_to_alpha():
    head = make_head("l2_softmax", 2, 3)
    x = torch.tensor([[3.0, 4.0, 0.0]])
    expected = head.fc(torch.tensor([[16 * 0.6, 16 * 0.8, 0.0]]))
    assert torch.allclose(head.logits(x), expected)


def test_twins_get_a_fresh_defect_each():
    imgs = torch.full((4, 1, 32, 32), 0.5)
    a = make_twins(imgs, np.random.default_rng(0))
    b = make_twins(imgs, np.random.default_rng(0))
    assert torch.equal(a, b) and not torch.equal(a[0], a[1])
    assert ((a - imgs).abs().flatten(1).amax(1) > 0).all()
    assert (imgs == 0.5).all()


@pytest.fixture(scope="module")
def tiny(tiny_case):
    train, test = tiny_case
    return train.subset(range(24)), test


@pytest.fixture(scope="module")
def fitted(tiny):
    return Metric(head="cosface", **TINY).fit(tiny[0])


def test_score_is_min_cosine_distance_to_training_images(fitted, tiny):
    train, test = tiny
    scores = fitted.score(test.images)
    e_test, e_train = fitted.embed(test.images), fitted.embed(train.images)
    expected = torch.tensor([min(1 - float(a @ b) for b in e_train) for a in e_test])
    assert torch.allclose(scores, expected, atol=1e-5)
    assert torch.equal(fitted.nearest(train.images[:5]), torch.arange(5))
    assert len(fitted.history_) == 2 and {"loss", "accuracy"} <= set(fitted.history_[0])


def test_gradcam_map(fitted, tiny):
    _, test = tiny
    maps = fitted.score_map(test.images[:3])
    assert maps.shape == (3, 28, 28) and torch.isfinite(maps).all() and (maps >= 0).all()
    assert maps.flatten(1).amax(1).gt(0).any()


@pytest.mark.parametrize("head", HEADS)
def test_every_head_trains_one_step(head, tiny):
    train, _ = tiny
    det = Metric(head=head, **{**TINY, "epochs": 1, "batch_size": 48}).fit(train)
    assert np.isfinite(det.history_[0]["loss"])


def test_modes_need_the_right_labels(tiny):
    train, test = tiny
    with pytest.raises(ValueError, match="multiclass"):
        Metric(mode="multiclass", **TINY).fit(train)
    with pytest.raises(ValueError, match="binary"):
        Metric(mode="binary", **TINY).fit(train)
    with pytest.raises(ValueError, match="unknown mode"):
        Metric(mode="triplet", **TINY).fit(train)
    both = ImageSet.concat([train.subset(range(8)), test.subset([12, 13])])
    both.labels = torch.tensor([0] * 8 + [1] * 2)
    binary = Metric(mode="binary", **{**TINY, "epochs": 1}).fit(both)
    assert len(binary.train_embeddings_) == 8  # only the good images are the reference
    multi = ImageSet(images=both.images, classes=torch.tensor([3] * 5 + [7] * 5))
    assert Metric(mode="multiclass", **{**TINY, "epochs": 1}).fit(multi).num_classes_ == 2
    tuned = Metric(mode="tuned_twin", tuned_defects=("blob",), **{**TINY, "epochs": 1}).fit(train)
    assert torch.isfinite(tuned.score(test.images)).all()
    with pytest.raises(ValueError, match="tuned_defects"):
        Metric(mode="tuned_twin", tuned_defects=("crack",), **TINY).fit(train)

