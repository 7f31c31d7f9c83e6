"""Image-level metrics (scikit-learn underneath, imported on first use), anomalous class positive."""

from __future__ import annotations

import numpy as np


def _skm():
    from sklearn import metrics

    return metrics


def _check(labels, scores) -> tuple[np.ndarray, np.ndarray]:
    y = np.asarray(labels).reshape(-1).astype(np.int64)
    s = np.asarray(scores, dtype=np.float64).reshape(-1)
    if y.shape != s.shape:
        raise ValueError(f"labels and scores differ in length: {y.shape[0]} vs {s.shape[0]}")
    if not np.all(np.isfinite(s)):
        raise ValueError("scores contain NaN or infinite values")
    if set(np.unique(y).tolist()) != {0, 1}:
        raise ValueError("need both normal (0) and anomalous (1) labels to compute the metric")
    return y, s


def image_auroc(labels, scores) -> float:
    """Area under the ROC curve of image scores; 0.5 = chance, 1 = every anomaly above every normal."""
    y, s = _check(labels, scores)
    return float(_skm().roc_auc_score(y, s))


def aupr(labels, scores) -> float:
    """Area under the precision-recall curve with the anomalous class positive (average precision,
    the step-wise sum sum_n (R_n - R_{n-1}) P_n, which does not interpolate optimistically)."""
    y, s = _check(labels, scores)
    return float(_skm().average_precision_score(y, s))


def roc_curve(labels, scores) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(fpr, tpr, thresholds), for plots."""
    y, s = _check(labels, scores)
    return _skm().roc_curve(y, s)
