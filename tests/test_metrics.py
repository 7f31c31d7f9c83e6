import numpy as np
import pytest
from sklearn.metrics import average_precision_score, roc_auc_score

from anomalab.metrics import aupr, aupro, image_auroc, pixel_auroc, pro_curve


def test_image_auroc_hand_fixture_and_sklearn():
    labels = [0, 0, 1, 1]
    assert image_auroc(labels, [0.1, 0.4, 0.35, 0.8]) == pytest.approx(0.75)  # 3 of 4 pairs ordered
    assert image_auroc(labels, [0, 0, 1, 1]) == 1.0
    assert image_auroc(labels, [1, 1, 0, 0]) == 0.0
    rng = np.random.default_rng(0)
    y, s = rng.integers(0, 2, 200), rng.normal(size=200)
    assert image_auroc(y, s) == pytest.approx(roc_auc_score(y, s))


def test_aupr_is_average_precision_with_anomalies_positive():
    # ranking: 1 (pos), 0, 1 (pos): precision at recalls 0.5, 1.0 = 1, 2/3 -> AP = 0.5*1 + 0.5*2/3
    assert aupr([1, 0, 1], [0.9, 0.5, 0.1]) == pytest.approx(0.5 + 1 / 3)
    rng = np.random.default_rng(1)
    y, s = rng.integers(0, 2, 100), rng.normal(size=100)
    assert aupr(y, s) == pytest.approx(average_precision_score(y, s))


def test_metrics_refuse_one_class_and_nan():
    with pytest.raises(ValueError, match="both normal"):
        image_auroc([0, 0], [0.1, 0.2])
    with pytest.raises(ValueError, match="NaN"):
        image_auroc([0, 1], [0.1, float("nan")])


def test_pixel_auroc_matches_sklearn_on_flattened_pixels():
    rng = np.random.default_rng(2)
    masks = (rng.random((3, 8, 8)) > 0.8).astype(float)
    maps = rng.random((3, 8, 8)) + masks
    assert pixel_auroc(masks, maps) == pytest.approx(roc_auc_score(masks.ravel(), maps.ravel()))


def test_pro_single_region_hand_fixture():
    masks = np.array([[[1, 1, 0, 0]]])
    maps = np.array([[[0.9, 0.4, 0.5, 0.1]]])
    fpr, pro = pro_curve(masks, maps)
    np.testing.assert_allclose(fpr, [0, 0, 0.5, 0.5, 1])
    np.testing.assert_allclose(pro, [0, 0.5, 0.5, 1, 1])
    assert aupro(masks, maps, max_fpr=0.3) == pytest.approx(0.5)
    assert aupro(masks, maps, max_fpr=1.0) == pytest.approx(0.75)


def test_pro_weights_regions_equally():
    # regions {0} (1 px) and {2, 3} (2 px); normal pixels 1, 4, 5
    masks = np.array([[[1, 0, 1, 1, 0, 0]]])
    maps = np.array([[[0.8, 0.1, 0.6, 0.2, 0.3, 0.05]]])
    assert aupro(masks, maps, max_fpr=0.3) == pytest.approx(0.75)
    assert aupro(masks, maps, max_fpr=1.0) == pytest.approx(0.75 / 3 + 2 / 3)


def test_pro_perfect_and_useless_bracket():
    rng = np.random.default_rng(3)
    masks = np.zeros((4, 16, 16))
    masks[:, 4:8, 4:8] = 1
    assert aupro(masks, masks + 0.01 * rng.random(masks.shape)) == pytest.approx(1.0)
    useless = aupro(masks, rng.random(masks.shape))
    assert useless < 0.3  # random maps: PRO ~ FPR, so the normalised area up to 0.3 is ~0.15
