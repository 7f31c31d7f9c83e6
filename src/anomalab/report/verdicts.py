"""What the threshold decides, counted: caught / missed / false alarms / passed, per defect type too, and
which images to show an inspector. numpy only (no plotting), so `evaluate` can record the same numbers.

A score strictly above the threshold is called anomalous (as `Threshold.predict`):

    caught        anomalous image, score > threshold   (true positive)
    missed        anomalous image, score <= threshold  (false negative)
    false_alarms  normal image,    score > threshold   (false positive)
    passed        normal image,    score <= threshold  (true negative)
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

from anomalab.metrics import image_auroc


def _arrays(scores, labels) -> tuple[np.ndarray, np.ndarray]:
    s = np.asarray(scores, dtype=np.float64).reshape(-1)
    y = np.asarray(labels).reshape(-1).astype(np.int64)
    if s.shape != y.shape:
        raise ValueError(f"scores and labels differ in length: {s.shape[0]} vs {y.shape[0]}")
    return s, y


def threshold_counts(scores, labels, threshold: float) -> dict[str, int]:
    """{"caught", "missed", "false_alarms", "passed"} at `threshold` (see the module docstring)."""
    s, y = _arrays(scores, labels)
    flagged = s > threshold
    return {"caught": int(np.sum(flagged & (y == 1))), "missed": int(np.sum(~flagged & (y == 1))),
            "false_alarms": int(np.sum(flagged & (y == 0))), "passed": int(np.sum(~flagged & (y == 0)))}


def confusion_matrix(counts: dict[str, int]) -> list[list[int]]:
    """[[passed, false_alarms], [missed, caught]]: rows = true label (normal, anomalous), columns =
    verdict (normal, anomalous), the layout of sklearn.metrics.confusion_matrix."""
    return [[counts["passed"], counts["false_alarms"]], [counts["missed"], counts["caught"]]]


def per_class(scores, labels, classes, class_names: Sequence[str] | None = None,
              threshold: float | None = None) -> list[dict]:
    """One record per class id present (defect type, MNIST digit, ...), in id order:

    name, label (0 normal / 1 anomalous: the class's images all share one label, else "mixed"), n;
    for anomalous classes: auroc (that class's images vs every normal image, None without normals), and,
    with a threshold, caught, missed and recall; for normal classes, with a threshold, false_alarms and
    false_alarm_rate."""
    s, y = _arrays(scores, labels)
    c = np.asarray(classes).reshape(-1).astype(np.int64)
    if c.shape != s.shape:
        raise ValueError(f"classes and scores differ in length: {c.shape[0]} vs {s.shape[0]}")
    normal = y == 0
    rows = []
    for cid in np.unique(c):
        member = c == cid
        name = class_names[cid] if class_names is not None and 0 <= cid < len(class_names) else str(cid)
        kinds = set(y[member].tolist())
        row: dict = {"name": str(name), "id": int(cid), "n": int(member.sum()),
                     "label": kinds.pop() if len(kinds) == 1 else "mixed"}
        anomalous = member & (y == 1)
        if anomalous.any():
            both = anomalous | normal
            row["auroc"] = image_auroc(y[both], s[both]) if normal.any() else None
            if threshold is not None:
                caught = int(np.sum(s[anomalous] > threshold))
                row.update(caught=caught, missed=int(anomalous.sum()) - caught,
                           recall=caught / int(anomalous.sum()))
        own_normal = member & normal
        if own_normal.any() and threshold is not None:
            fa = int(np.sum(s[own_normal] > threshold))
            row.update(false_alarms=fa, false_alarm_rate=fa / int(own_normal.sum()))
        rows.append(row)
    return rows


def select_examples(scores, labels, threshold: float | None, n: int = 6) -> dict[str, list[int]]:
    """Indices of the images to show, at most `n` per group:

    most_anomalous: the highest scores, any label.
    missed:         anomalous images scored at or below the threshold, lowest score first (the worst misses).
    false_alarms:   normal images scored above the threshold, highest score first.
    Without a threshold, missed and false_alarms are empty (nothing was decided)."""
    s, y = _arrays(scores, labels)
    order = np.argsort(-s, kind="stable")
    out = {"most_anomalous": [int(i) for i in order[:n]], "missed": [], "false_alarms": []}
    if threshold is not None:
        out["missed"] = [int(i) for i in order[::-1] if y[i] == 1 and s[i] <= threshold][:n]
        out["false_alarms"] = [int(i) for i in order if y[i] == 0 and s[i] > threshold][:n]
    return out


def is_skewed(scores, ratio: float = 10.0, skewness: float = 2.0) -> bool:
    """True when scores are better drawn on a log axis: all positive and either the largest is more than
    `ratio` times the median (a long right tail squeezes the bulk into one bin) or the sample skewness
    exceeds `skewness` (an exponential distribution has 2). Non-positive scores never are (no log axis)."""
    s = np.asarray(scores, dtype=np.float64).reshape(-1)
    s = s[np.isfinite(s)]
    if s.size < 3 or s.min() <= 0:
        return False
    if s.max() > ratio * np.median(s):
        return True
    sd = s.std()
    return bool(sd > 0 and np.mean(((s - s.mean()) / sd) ** 3) > skewness)


def expected_false_alarm_rate(n_normal: int, max_fpr: float) -> float:
    """The chance that a new normal image scores above a threshold fitted as `Threshold.fit` does (the
    (1 - max_fpr) quantile, method "higher", of `n_normal` exchangeable normal scores): (n - j) / (n + 1)
    for the threshold at 0-based order statistic j = ceil((n - 1)(1 - max_fpr)). It is about max_fpr for large
    n, and 1 / (n + 1) (the threshold is the largest score) while n < 1 / max_fpr."""
    j = math.ceil(round((n_normal - 1) * (1.0 - max_fpr), 12))
    return (n_normal - j) / (n_normal + 1)


def binomial_tail(k: int, n: int, p: float) -> float:
    """P(X >= k) for X ~ Binomial(n, p): how surprising k false alarms among n normal images are."""
    if k <= 0:
        return 1.0
    if p <= 0:
        return 0.0
    if p >= 1:
        return 1.0
    logs = [math.lgamma(n + 1) - math.lgamma(i + 1) - math.lgamma(n - i + 1) + i * math.log(p)
            + (n - i) * math.log1p(-p) for i in range(k, n + 1)]
    top = max(logs)
    return float(min(1.0, math.exp(top) * sum(math.exp(v - top) for v in logs)))
