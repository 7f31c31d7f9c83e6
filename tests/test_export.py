"""ONNX export: onnxruntime gives the detector's own scores and maps, for every exportable registered detector.

Parity: max |ONNX - torch| <= RTOL x scale, scale = the largest |torch value| (scores, and maps separately),
on the tiny case's 24 test images, end to end (OnnxScorer's numpy preprocessing included). Where float32
rounding needs more, TOLERANCE says how much and why. Detectors that cannot be exported refuse in one
sentence."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from test_contract import CONTRACT_PARAMS

import anomalab
from anomalab.data.transforms import prepare, resize_maps
from anomalab.errors import NotSupportedError
from anomalab.export import OnnxScorer, export_onnx, meta_path, prepare_array, resize_map_array
from anomalab.registry import detector_class, list_detectors

pytest.importorskip("onnxruntime")  # the `onnx` extra; installed by `make test` (dev extra)

RTOL = 1e-5
# Where RTOL x scale is not the right bound, and why (`score_bound` applies these).
TOLERANCE: dict[str, str] = {
    "metric": "score = 1 - cosine similarity of unit vectors: the similarity is near 1 and rounds at float32 "
              "precision of 1 (about 6e-8 per operation), however small the distance left: RTOL x max(scale, 1)",
    "knn": "euclidean distances are sqrt(|a|^2 - 2 a.b + |b|^2) in torch and in the graph (one matrix product; "
           "the difference form would need an N x M x D array): the bracket rounds relative to the squared norms, "
           "not to d^2, so RTOL holds for it relative to max |x|^2, and the distance may move by "
           "sqrt(d1^2 + RTOL max|x|^2) - d1 (d1: distance to the nearest training image; at most sqrt(RTOL) max|x| "
           "for a training image itself). Cosine: as metric",
}
EXPORTABLE = [n for n in list_detectors() if detector_class(n).onnx_exportable]
REFUSED = [n for n in list_detectors() if not detector_class(n).onnx_exportable]
# variants that take other paths through a graph: (name, extra params)
VARIANTS = [("patchcore", {"reweight": True}), ("gaussian", {"patch_levels": None}),
            ("gaussian", {"image_score": "map_max"}), ("knn", {"metric": "cosine"})]


def max_diff(a, b) -> tuple[float, float]:
    """(max |a - b|, max |b|)."""
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    return float(np.abs(a - b).max()), float(np.abs(b).max())


def score_bound(det, images, expected) -> np.ndarray:
    """The largest |ONNX - torch| each image's score may show (TOLERANCE's rules, else RTOL x scale)."""
    scale = float(np.abs(np.asarray(expected, dtype=np.float64)).max())
    cosine = det.name == "metric" or (det.name == "knn" and det.metric == "cosine")
    if det.name == "knn" and not cosine:
        x = prepare(images, det.input_shape_).flatten(1).double()
        t = det.train_features_.double()
        d1 = torch.cdist(x, t).min(1).values
        norm2 = max(float((x * x).sum(1).max()), float((t * t).sum(1).max()))
        return (torch.sqrt(d1**2 + RTOL * norm2) - d1).numpy()
    return np.full(len(images), RTOL * (max(scale, 1.0) if cosine else scale))


def assert_parity(name: str, got, expected, bound, what: str) -> None:
    diff = np.abs(np.asarray(got, dtype=np.float64) - np.asarray(expected, dtype=np.float64))
    worst = int(np.unravel_index(np.argmax(diff - bound), diff.shape)[0]) if diff.ndim else 0
    assert np.all(diff <= bound), (f"{name} {what}: |onnx - torch| = {diff.flat[np.argmax(diff - bound)]:.3g} over "
                                   f"its bound (image {worst}, max |torch| {np.abs(expected).max():.3g})")


def check_parity(name, det, test, tmp_path) -> OnnxScorer:
    path = export_onnx(det, tmp_path / f"{name}.onnx")
    scorer = OnnxScorer(path)
    assert scorer.meta == json.loads(meta_path(path).read_text())
    scores, maps = scorer.run(test.images)
    assert scores.shape == (len(test),) and scores.dtype == np.float32
    expected_scores = det.score(test.images).numpy()
    assert_parity(name, scores, expected_scores, score_bound(det, test.images, expected_scores), "scores")
    try:
        expected = det.score_map(test.images).numpy()
    except NotImplementedError:
        expected = None
    if scorer.maps:
        assert scorer.meta["maps"] is True and maps.shape[1:] == tuple(scorer.meta["map_shape"])
        assert_parity(name, scorer.score_map(test.images), expected, RTOL * np.abs(expected).max(), "maps")
    else:
        assert maps is None and scorer.meta["maps"] is False and scorer.meta["maps_note"]
        with pytest.raises(NotSupportedError, match=name):
            scorer.score_map(test.images[:1])
    return scorer


@pytest.mark.parametrize("name", EXPORTABLE)
def test_onnx_matches_torch(name, tiny_case, tmp_path):
    train, test = tiny_case
    det = anomalab.create(name, **CONTRACT_PARAMS[name]).fit(train)
    check_parity(name, det, test, tmp_path)


@pytest.mark.parametrize("name, extra", VARIANTS, ids=[f"{n}-{next(iter(e))}" for n, e in VARIANTS])
def test_onnx_matches_torch_variants(name, extra, tiny_case, tmp_path):
    train, test = tiny_case
    det = anomalab.create(name, **{**CONTRACT_PARAMS[name], **extra}).fit(train)
    scorer = check_parity(name, det, test, tmp_path)
    if name == "gaussian" and "patch_levels" in extra:
        assert not scorer.maps and "patch_levels=None" in scorer.meta["maps_note"]


def test_metric_exports_scores_only(tiny_case, tmp_path):
    train, test = tiny_case
    det = anomalab.create("metric", **CONTRACT_PARAMS["metric"]).fit(train)
    scorer = OnnxScorer(export_onnx(det, tmp_path / "metric.onnx"))
    assert scorer.outputs == ["scores"] and scorer.meta["maps"] is False
    assert "Grad-CAM" in scorer.meta["maps_note"]


def test_knn_near_duplicates(tiny_case, tmp_path):
    """Training images scored by a knn fitted on them: the distance to themselves is the square root of the
    bracket's rounding residual (TOLERANCE["knn"]), far above RTOL x scale yet within the knn bound."""
    train, _ = tiny_case
    det = anomalab.create("knn", k=1).fit(train)
    scorer = OnnxScorer(export_onnx(det, tmp_path / "knn.onnx"))
    expected = det.score(train.images).numpy()
    got = scorer.score(train.images)
    bound = score_bound(det, train.images, expected)
    assert_parity("knn", got, expected, bound, "scores of training images")
    largest_norm = float(train.images.flatten(1).norm(dim=1).max())
    assert bound.max() <= np.sqrt(RTOL) * largest_norm * (1 + 1e-6)
    assert max_diff(got, expected)[0] > RTOL * np.abs(expected).max()  # why knn needs its own bound


@pytest.mark.parametrize("name", REFUSED)
def test_detectors_without_a_fixed_graph_refuse(name, tmp_path):
    det = anomalab.create(name, **CONTRACT_PARAMS[name])
    with pytest.raises(NotSupportedError, match=f"^{name} cannot be exported to ONNX") as info:
        export_onnx(det, tmp_path / "m.onnx")  # refused before fitting matters: no fit can make it exportable
    assert "\n" not in str(info.value)
    if name == "anogan":
        assert "optimisation" in str(info.value)
    assert not (tmp_path / "m.onnx").exists() and not meta_path(tmp_path / "m.onnx").exists()


def test_knn_on_an_embedding_refuses(tmp_path):
    knn = anomalab.create("knn", k=2)
    knn.embedder = str(tmp_path / "embedder")  # refused from the params alone, before any fitting
    with pytest.raises(NotSupportedError, match="knn on an embedding cannot be exported"):
        export_onnx(knn, tmp_path / "m.onnx")


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


def test_any_batch_size_and_the_model_record(tiny_case, tmp_path):
    train, test = tiny_case
    det = anomalab.create("pca", n_components=4).fit(train)
    det.fit_threshold(train, max_fpr=0.05)
    scorer = OnnxScorer(export_onnx(det, tmp_path / "m.onnx"))
    for n in (1, 5, 24):
        assert scorer.score(test.images[:n]).shape == (n,)
    assert scorer.score(test.images[:7], batch_size=3).shape == (7,)
    assert scorer.threshold == pytest.approx(det.threshold_.value)
    meta = scorer.meta
    assert meta["name"] == "pca" and meta["input_shape"] == [1, 28, 28] and meta["outputs"] == ["scores", "maps"]
    assert meta["anomalab_version"] == anomalab.__version__ and "resize" in meta["preprocessing"]


@pytest.mark.parametrize("src, shape", [((2, 1, 28, 28), (3, 64, 64)), ((2, 3, 40, 24), (1, 32, 32)),
                                        ((2, 3, 17, 50), (3, 32, 32)), ((1, 1, 28, 28), (1, 28, 28))])
def test_numpy_preprocessing_is_prepare(src, shape):
    """OnnxScorer converts images as `prepare` does (channels, bilinear resize with antialiasing when
    shrinking, clipping), and maps as `resize_maps` does, to float32 rounding."""
    x = torch.rand(*src, generator=torch.Generator().manual_seed(0))
    np.testing.assert_allclose(prepare_array(x, shape), prepare(x, shape).numpy(), rtol=0, atol=2e-6)
    maps = torch.rand(3, 7, 9, generator=torch.Generator().manual_seed(1)) * 50
    np.testing.assert_allclose(resize_map_array(maps.numpy(), (28, 30)), resize_maps(maps, (28, 30)).numpy(),
                               rtol=1e-6, atol=1e-5)


def test_onnx_scorer_checks_images_like_score(tiny_case, tmp_path):
    train, _ = tiny_case
    scorer = OnnxScorer(export_onnx(anomalab.create("pca", n_components=4).fit(train), tmp_path / "m.onnx"))
    for bad, message in [(np.zeros((28, 28)), "(N, C, H, W)"), (np.full((1, 1, 28, 28), np.nan), "NaN"),
                         (np.zeros((1, 5, 28, 28)), "channels"), (np.full((1, 1, 28, 28), 3.0), "[0, 1]")]:
        with pytest.raises(ValueError) as info:
            scorer.score(bad)
        assert message in str(info.value)
    with pytest.raises(TypeError):
        scorer.score([[0.5]])


def test_onnx_scorer_runs_without_torch(tiny_case, tmp_path):
    """Where the model only runs: numpy and onnxruntime, no torch (here: torch made unimportable)."""
    import subprocess
    import sys

    train, test = tiny_case
    det = anomalab.create("knn", k=2).fit(train)
    path = export_onnx(det, tmp_path / "m.onnx")
    np.save(tmp_path / "x.npy", test.images[:4].numpy())
    script = tmp_path / "run.py"
    script.write_text("import sys\nsys.modules['torch'] = None  # any import of torch fails\n"
                      "import numpy as np\nfrom anomalab.export import OnnxScorer\n"
                      "scores = OnnxScorer(sys.argv[1]).score(np.load(sys.argv[2]))\n"
                      "print(' '.join(repr(float(v)) for v in scores))\n")
    out = subprocess.run([sys.executable, str(script), str(path), str(tmp_path / "x.npy")], capture_output=True,
                         text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    got = np.array([float(v) for v in out.stdout.split()])
    np.testing.assert_array_equal(got, OnnxScorer(path).score(test.images[:4]))
