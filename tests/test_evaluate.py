"""`anomalab.evaluate(..., normalize="minmax")`: the normalised scores themselves, not just the AUROC (which
no strictly increasing map can change), and what happens to the raw-score threshold under it."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import anomalab
from anomalab.evaluation import evaluate, minmax
from anomalab.types import ImageSet, Threshold


class MeanScore:
    """A stub detector: score = 7 * mean pixel + 3 (an affine map of a quantity the test computes itself),
    with a threshold fitted on raw scores; no maps."""

    name = "mean_score"

    def __init__(self, normal: torch.Tensor, max_fpr: float = 0.25):
        self.threshold_ = Threshold.fit(self.score(normal), max_fpr=max_fpr)

    def score(self, images: torch.Tensor) -> torch.Tensor:
        return 7.0 * images.flatten(1).double().mean(1) + 3.0

    def score_map(self, images):
        raise NotImplementedError("mean_score has no maps")

    def get_params(self):
        return {}


def _test_set(seed: int = 0) -> ImageSet:
    g = torch.Generator().manual_seed(seed)
    normal = torch.rand(12, 1, 6, 6, generator=g) * 0.5
    anomalous = torch.rand(8, 1, 6, 6, generator=g) * 0.5 + 0.04  # a little brighter: classes overlap
    return ImageSet(images=torch.cat([normal, anomalous]), labels=torch.tensor([0] * 12 + [1] * 8))


def test_minmax_scores_are_the_affine_map_to_0_1_of_the_raw_scores():
    test = _test_set()
    g = torch.Generator().manual_seed(1)
    det = MeanScore(torch.rand(40, 1, 6, 6, generator=g) * 0.5)
    raw, scaled = evaluate(det, test), evaluate(det, test, normalize="minmax")
    assert raw.normalize is None and scaled.normalize == "minmax"
    # the raw scores are the detector's own ...
    means = test.images.flatten(1).double().mean(1).numpy()
    np.testing.assert_allclose(raw.scores, 7 * means + 3, rtol=1e-12)
    # ... and the scaled ones (m - min m) / (max m - min m) of the pixel means: the detector's affine
    # 7 m + 3 cancels, so this is an independent recomputation, not the code's formula again
    expected = (means - means.min()) / (means.max() - means.min())
    np.testing.assert_allclose(scaled.scores, expected, rtol=1e-9, atol=1e-12)
    assert scaled.scores.min() == 0.0 and scaled.scores.max() == 1.0
    assert raw.scores.min() > 3.0  # negative control: the raw scores are not already in [0, 1]
    # an increasing affine map: slope > 0 and the same for every pair of images
    slope = np.diff(scaled.scores) / np.diff(raw.scores)
    np.testing.assert_allclose(slope, slope[0], rtol=1e-9)
    assert slope[0] > 0
    # ranking metrics are unchanged by it
    assert 0.5 < raw.metrics["image_auroc"] < 1.0  # a case where the order matters (overlapping classes)
    assert scaled.metrics["image_auroc"] == raw.metrics["image_auroc"]
    assert scaled.metrics["aupr"] == pytest.approx(raw.metrics["aupr"], abs=1e-12)


def test_the_raw_threshold_is_not_applied_to_minmax_scores():
    """The saved threshold lives on the raw score scale, so evaluate reports FPR/TPR at it for raw scores
    only; with minmax it reports neither them nor the threshold (applying the raw value to [0, 1] scores
    would call every image normal here)."""
    test = _test_set()
    g = torch.Generator().manual_seed(1)
    det = MeanScore(torch.rand(40, 1, 6, 6, generator=g) * 0.5)
    raw, scaled = evaluate(det, test), evaluate(det, test, normalize="minmax")
    value = det.threshold_.value
    assert value > 1.0  # the raw threshold would mean nothing on [0, 1] scores
    flagged = raw.scores > value  # computed here from the definition: strictly above the threshold
    normal = test.labels.numpy() == 0
    assert raw.metrics["fpr_at_threshold"] == pytest.approx(flagged[normal].mean())
    assert raw.metrics["tpr_at_threshold"] == pytest.approx(flagged[~normal].mean())
    assert 0 < raw.metrics["fpr_at_threshold"] < raw.metrics["tpr_at_threshold"]  # not a degenerate case
    assert raw.extra["threshold"] == det.threshold_.to_dict()
    assert "fpr_at_threshold" not in scaled.metrics and "tpr_at_threshold" not in scaled.metrics
    assert "threshold" not in scaled.extra
    assert not (scaled.scores > value).any()  # what a wrong application would have reported: no anomalies


def test_minmax_of_constant_scores_is_zero_and_bad_options_are_refused():
    np.testing.assert_array_equal(minmax(np.full(5, 2.5)), np.zeros(5))
    np.testing.assert_allclose(minmax(np.array([3.0, 1.0, 2.0])), [1.0, 0.0, 0.5])
    with pytest.raises(ValueError, match="minmax"):
        evaluate(MeanScore(torch.rand(4, 1, 2, 2)), _test_set(), normalize="zscore")


def test_minmax_on_a_real_detector_keeps_every_metric_and_the_maps(tiny_case, tmp_path):
    train, test = tiny_case
    det = anomalab.create("knn", k=3).fit(train)
    det.fit_threshold(train, max_fpr=0.1)
    raw, scaled = evaluate(det, test), evaluate(det, test, normalize="minmax")
    lo, hi = raw.scores.min(), raw.scores.max()
    np.testing.assert_allclose(scaled.scores, (raw.scores - lo) / (hi - lo), rtol=1e-9, atol=1e-12)
    assert scaled.scores.min() == 0.0 and scaled.scores.max() == 1.0
    for k in ("image_auroc", "aupr", "pixel_auroc", "aupro"):  # maps are never rescaled
        assert scaled.metrics[k] == pytest.approx(raw.metrics[k], abs=1e-12), k
    torch.testing.assert_close(scaled.maps, raw.maps)
    assert "fpr_at_threshold" in raw.metrics and "fpr_at_threshold" not in scaled.metrics
    back = type(scaled).from_json(scaled.to_json(tmp_path / "e.json"))
    assert back.normalize == "minmax"
    np.testing.assert_allclose(back.scores, scaled.scores)
