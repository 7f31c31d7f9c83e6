import numpy as np
import pytest
import torch

from anomalab.types import Evaluation, ImageSet, Threshold


def test_imageset_validates_shapes():
    with pytest.raises(ValueError, match=r"\(N, C, H, W\)"):
        ImageSet(images=torch.rand(4, 28, 28))
    with pytest.raises(ValueError, match="labels has 3 entries for 4 images"):
        ImageSet(images=torch.rand(4, 1, 8, 8), labels=[0, 1, 0])
    with pytest.raises(ValueError, match="masks"):
        ImageSet(images=torch.rand(4, 1, 8, 8), masks=torch.zeros(4, 7, 8))


def test_subset_and_concat_keep_everything_aligned():
    s = ImageSet(images=torch.arange(4.0).view(4, 1, 1, 1) / 4, labels=[0, 1, 0, 1], classes=[5, 6, 7, 8],
                 names=["a", "b", "c", "d"])
    sub = s.subset(torch.tensor([False, True, False, True]))
    assert sub.names == ["b", "d"] and sub.labels.tolist() == [1, 1] and sub.classes.tolist() == [6, 8]
    both = ImageSet.concat([sub, s.subset([0])])
    assert both.names == ["b", "d", "a"] and both.images.flatten().tolist() == [0.25, 0.75, 0.0]


def test_threshold_fitted_on_normal_scores_gives_the_asked_fpr():
    normal = np.arange(1000, dtype=float)
    thr = Threshold.fit(normal, max_fpr=0.01)
    assert (thr.predict(normal)).mean() == pytest.approx(0.01, abs=0.002)
    assert thr.predict([2000.0]).tolist() == [True]
    assert Threshold.from_dict(thr.to_dict()) == thr
    with pytest.raises(ValueError, match="max_fpr"):
        Threshold.fit(normal, max_fpr=1.5)


def test_evaluation_json_round_trip(tmp_path):
    ev = Evaluation(detector="vae", dataset="d", scores=np.array([0.1, 0.9]), labels=np.array([0, 1]),
                    metrics={"image_auroc": 1.0, "pixel_auroc": float("nan")}, params={"k": 5})
    back = Evaluation.from_json(ev.to_json(tmp_path / "e.json"))
    np.testing.assert_array_equal(back.scores, ev.scores)
    assert back.metrics["image_auroc"] == 1.0 and np.isnan(back.metrics["pixel_auroc"])
    assert back.params == {"k": 5}


def test_validation_errors_are_user_errors():
    from anomalab.errors import DataError, ParameterError

    with pytest.raises(DataError, match=r"\(N, C, H, W\)"):
        ImageSet(images=torch.rand(4, 28, 28))
    with pytest.raises(DataError, match="names has 1 entries"):
        ImageSet(images=torch.rand(2, 1, 4, 4), names=["a"])
    with pytest.raises(DataError, match="different shapes"):
        ImageSet.concat([ImageSet(images=torch.rand(1, 1, 4, 4)), ImageSet(images=torch.rand(1, 1, 5, 5))])
    with pytest.raises(DataError, match="non-finite"):
        Threshold.fit([1.0, float("nan")])
    with pytest.raises(ParameterError, match="max_fpr"):
        Threshold.fit([1.0, 2.0], max_fpr=-0.1)


@pytest.mark.parametrize("record, message", [
    ({"value": float("nan"), "max_fpr": 0.01, "n_normal": 5}, "value must be a finite number"),
    ({"value": "1.0", "max_fpr": 0.01, "n_normal": 5}, "value must be a finite number"),
    ({"value": 1.0, "max_fpr": 1.0, "n_normal": 5}, "max_fpr"),
    ({"value": 1.0, "max_fpr": 0.01, "n_normal": 0}, "n_normal"),
    ({"value": 1.0, "max_fpr": 0.01}, "exactly the keys"),
    ([1.0, 0.01, 5], "JSON object"),
])
def test_threshold_from_dict_refuses_bad_records(record, message):
    from anomalab.errors import ParameterError

    with pytest.raises(ParameterError, match=message):
        Threshold.from_dict(record)
