"""evaluate(detector, test) -> Evaluation: scores, metrics and timings of a fitted detector (`anomalab.evaluate`;
the module is `evaluation` so that the name `anomalab.evaluate` stays the function)."""

from __future__ import annotations

import time

import numpy as np

from anomalab.errors import ParameterError
from anomalab.metrics import aupr, aupro, image_auroc, pixel_auroc
from anomalab.report.verdicts import confusion_matrix, per_class, threshold_counts
from anomalab.types import Evaluation, ImageSet


def minmax(scores: np.ndarray) -> np.ndarray:
    """Scale scores to [0, 1] over the given set. This is the papers' test-set scaling: it uses the
    test set's own extremes, so it is only an explicit option, and it leaves AUROC/AUPR unchanged
    (a strictly increasing map keeps the order of scores)."""
    lo, hi = float(np.min(scores)), float(np.max(scores))
    return (scores - lo) / (hi - lo) if hi > lo else np.zeros_like(scores)


def evaluate(detector, test: ImageSet, normalize: str | None = None, maps: bool | None = None,
             dataset: str | None = None) -> Evaluation:
    """Score `test` with a fitted detector and compute every metric its labels and masks allow.

    normalize: None (raw scores) or "minmax" (papers' test-set min-max scaling: AUROC/AUPR and pixel
        metrics unchanged; FPR/TPR at the threshold are left out, the threshold being on the raw scale).
    maps: compute anomaly maps (default: when the test set has masks and the detector has maps).
    extra: the threshold, and at it the counts (caught / missed / false_alarms / passed) and the confusion
        matrix [[passed, false_alarms], [missed, caught]]; with class ids (defect types, digits): class_names
        and per_class (per type: n, AUROC vs the normal images, recall or false-alarm rate at the threshold).
    """
    if normalize not in (None, "minmax"):
        raise ParameterError(f"normalize must be None or 'minmax', got {normalize!r}")
    if test.labels is None:
        raise ValueError("evaluate needs a test set with labels (0 normal / 1 anomalous)")
    t0 = time.perf_counter()
    scores = detector.score(test.images).numpy().astype(np.float64)
    t_score = time.perf_counter() - t0
    if normalize == "minmax":
        scores = minmax(scores)
    labels = test.labels.numpy()
    metrics: dict[str, float] = {}
    if len(np.unique(labels)) == 2:
        metrics["image_auroc"] = image_auroc(labels, scores)
        metrics["aupr"] = aupr(labels, scores)
    timings = {"score_s": t_score, "score_images_per_s": len(test) / max(t_score, 1e-9)}
    anomaly_maps = None
    want_maps = maps if maps is not None else test.masks is not None
    if want_maps:
        try:
            t0 = time.perf_counter()
            anomaly_maps = detector.score_map(test.images)
            timings["map_s"] = time.perf_counter() - t0
        except NotImplementedError:
            if maps:
                raise
        if anomaly_maps is not None and test.masks is not None and test.masks.sum() > 0:
            metrics["pixel_auroc"] = pixel_auroc(test.masks.numpy(), anomaly_maps.numpy())
            metrics["aupro"] = aupro(test.masks.numpy(), anomaly_maps.numpy())
    threshold = getattr(detector, "threshold_", None)
    extra = {}
    if threshold is not None and normalize is None:
        pred = threshold.predict(scores)
        extra["threshold"] = threshold.to_dict()
        normal = labels == 0
        if normal.any():
            metrics["fpr_at_threshold"] = float(pred[normal].mean())
        if (~normal).any():
            metrics["tpr_at_threshold"] = float(pred[~normal].mean())
        extra["counts"] = threshold_counts(scores, labels, threshold.value)
        extra["confusion_matrix"] = confusion_matrix(extra["counts"])
    class_names = test.meta.get("class_names")
    if test.classes is not None:
        if class_names is not None:
            extra["class_names"] = [str(c) for c in class_names]
        extra["per_class"] = per_class(scores, labels, test.classes.numpy(), class_names,
                                       threshold.value if threshold is not None and normalize is None else None)
    return Evaluation(
        detector=getattr(detector, "name", type(detector).__name__),
        dataset=dataset or str(test.meta.get("name", "test")),
        scores=scores,
        labels=labels,
        metrics=metrics,
        params=detector.get_params() if hasattr(detector, "get_params") else {},
        timings=timings,
        names=list(test.names),
        classes=None if test.classes is None else test.classes.numpy(),
        normalize=normalize,
        extra=extra,
        maps=anomaly_maps,
    )
