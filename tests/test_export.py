"""ONNX export: onnxruntime gives the detector's own scores and maps."""

import numpy as np
import pytest

import anomalab
from anomalab.export import OnnxScorer, export_onnx

pytest.importorskip("onnxruntime")  # the `onnx` extra; installed by `make test` (dev extra)


@pytest.mark.parametrize("name, params", [("vae", dict(latent_dim=4, epochs=1, batch_size=16)),
                                          ("conv_ae", dict(latent_dim=4, epochs=1, batch_size=16)),
                                          ("pca", dict(n_components=4)), ("knn", dict(k=2))])
def test_onnx_scores_match_torch(name, params, tiny_case, tmp_path):
    train, test = tiny_case
    det = anomalab.create(name, **params).fit(train)
    path = export_onnx(det, tmp_path / "model.onnx")
    scorer = OnnxScorer(path)
    scores, maps = scorer.run(test.images)
    np.testing.assert_allclose(scores, det.score(test.images).numpy(), rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(maps, det.score_map(test.images).numpy(), rtol=1e-4, atol=1e-5)
    assert len(scorer.score(test.images[:5])) == 5


def test_export_refuses_unfitted_and_unsupported(tmp_path):
    with pytest.raises(anomalab.detector.NotFittedError):
        export_onnx(anomalab.create("pca"), tmp_path / "m.onnx")

    class NoOnnx(anomalab.detector.BaseDetector):
        name = "no_onnx"

    det = NoOnnx()
    det.input_shape_ = (1, 8, 8)
    with pytest.raises(NotImplementedError, match="no_onnx"):
        export_onnx(det, tmp_path / "m.onnx")
    assert not (tmp_path / "m.onnx").exists()
