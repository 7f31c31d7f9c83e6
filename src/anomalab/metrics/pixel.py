"""Pixel-level metrics: pixel AUROC and the per-region overlap (PRO) curve of MVTec AD (Bergmann 2020).

PRO is written here because scikit-learn has no region-wise metric: it weights every connected defect
region equally, so a large defect cannot hide many missed small ones. SciPy and scikit-learn are imported
on first use.
"""

from __future__ import annotations

import numpy as np


def _maps_masks(masks, maps) -> tuple[np.ndarray, np.ndarray]:
    m = np.asarray(masks) > 0.5
    a = np.asarray(maps, dtype=np.float64)
    if m.shape != a.shape:
        raise ValueError(f"masks and maps differ in shape: {m.shape} vs {a.shape}")
    if m.ndim == 2:
        m, a = m[None], a[None]
    if not np.all(np.isfinite(a)):
        raise ValueError("anomaly maps contain NaN or infinite values")
    return m, a


def pixel_auroc(masks, maps) -> float:
    """ROC AUC over all pixels of all images: masks (N, H, W) in {0, 1}, maps (N, H, W) scores."""
    m, a = _maps_masks(masks, maps)
    if m.all() or not m.any():
        raise ValueError("pixel AUROC needs both defective and defect-free pixels")
    from sklearn import metrics as skm

    return float(skm.roc_auc_score(m.reshape(-1), a.reshape(-1)))


def pro_curve(masks, maps) -> tuple[np.ndarray, np.ndarray]:
    """(fpr, pro) at every distinct threshold, from the highest score down.

    fpr: share of defect-free pixels (of all images) above the threshold;
    pro: mean over connected defect regions (8-connected) of the share of the region above it.
    """
    from scipy import ndimage

    m, a = _maps_masks(masks, maps)
    regions = np.zeros(m.shape, dtype=np.int64)
    n_regions = 0
    for i in range(len(m)):
        lab, n = ndimage.label(m[i], structure=np.ones((3, 3), dtype=int))
        regions[i] = np.where(lab > 0, lab + n_regions, 0)
        n_regions += n
    n_ok = int((~m).sum())
    if n_regions == 0 or n_ok == 0:
        raise ValueError("PRO needs at least one defect region and some defect-free pixels")
    region_size = np.bincount(regions.reshape(-1), minlength=n_regions + 1).astype(np.float64)
    flat_scores = a.reshape(-1)
    flat_regions = regions.reshape(-1)
    order = np.argsort(-flat_scores, kind="stable")
    s = flat_scores[order]
    r = flat_regions[order]
    fpr_step = (r == 0) / n_ok
    pro_step = np.where(r > 0, 1.0 / (n_regions * region_size[r]), 0.0)
    fpr = np.cumsum(fpr_step)
    pro = np.cumsum(pro_step)
    # Evaluate only where the threshold changes: the last pixel of each run of equal scores.
    last = np.r_[s[1:] != s[:-1], True]
    fpr = np.r_[0.0, fpr[last]]
    pro = np.r_[0.0, pro[last]]
    return np.clip(fpr, 0, 1), np.clip(pro, 0, 1)


def aupro(masks, maps, max_fpr: float = 0.3) -> float:
    """Area under the PRO curve for FPR in [0, max_fpr], divided by max_fpr (1 = perfect)."""
    if not 0 < max_fpr <= 1:
        raise ValueError(f"max_fpr must be in (0, 1], got {max_fpr}")
    fpr, pro = pro_curve(masks, maps)
    # Close the curve at max_fpr by linear interpolation between the two surrounding thresholds.
    keep = fpr <= max_fpr
    x, y = fpr[keep], pro[keep]
    if x[-1] < max_fpr:
        j = int(np.searchsorted(fpr, max_fpr))
        if j < len(fpr):
            y_end = np.interp(max_fpr, fpr[j - 1 : j + 1], pro[j - 1 : j + 1])
        else:
            y_end = y[-1]
        x, y = np.r_[x, max_fpr], np.r_[y, y_end]
    return float(np.trapezoid(y, x) / max_fpr)
