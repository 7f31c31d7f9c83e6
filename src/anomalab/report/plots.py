"""Figures as PNG files (matplotlib, Agg backend): histograms, ROC, image grids, loss curves."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402

from anomalab.metrics import roc_curve  # noqa: E402
from anomalab.types import Evaluation  # noqa: E402


def _save(fig, path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)
    return path


def score_histogram(scores, labels, path: str | Path, title: str = "", threshold: float | None = None,
                    names: tuple[str, str] = ("normal", "anomalous"), bins: int = 40) -> Path:
    """Overlaid histograms of scores of label 0 vs label 1 (density), with an optional threshold line."""
    scores, labels = np.asarray(scores, dtype=float), np.asarray(labels)
    fig, ax = plt.subplots(figsize=(6, 3.6))
    edges = np.histogram_bin_edges(scores, bins=bins)
    for value, name, colour in ((0, names[0], "tab:blue"), (1, names[1], "tab:orange")):
        part = scores[labels == value]
        if len(part):
            ax.hist(part, bins=edges, alpha=0.6, density=True, color=colour, label=f"{name} (n={len(part)})")
    if threshold is not None:
        ax.axvline(threshold, color="k", ls="--", lw=1, label="threshold")
    ax.set_xlabel("anomaly score (higher = more anomalous)")
    ax.set_ylabel("density")
    ax.set_title(title)
    ax.legend(frameon=False)
    return _save(fig, path)


def roc_plot(evaluations: Sequence[Evaluation], path: str | Path, title: str = "ROC") -> Path:
    fig, ax = plt.subplots(figsize=(4.2, 4))
    for ev in evaluations:
        fpr, tpr, _ = roc_curve(ev.labels, ev.scores)
        ax.plot(fpr, tpr, label=f"{ev.detector} (AUROC {ev.metrics.get('image_auroc', float('nan')):.3f})")
    ax.plot([0, 1], [0, 1], color="grey", lw=0.8, ls=":")
    ax.set_xlabel("false positive rate")
    ax.set_ylabel("true positive rate")
    ax.set_title(title)
    ax.legend(frameon=False, fontsize=8, loc="lower right")
    return _save(fig, path)


def _as_image(t: torch.Tensor) -> tuple[np.ndarray, str | None]:
    t = t.detach().cpu().float()
    if t.ndim == 3 and t.shape[0] == 3:
        return t.permute(1, 2, 0).clamp(0, 1).numpy(), None
    if t.ndim == 3:
        t = t[0]
    return t.numpy(), "gray"


def image_grid(rows: Sequence[tuple[str, torch.Tensor]], path: str | Path,
               col_titles: Sequence[str] | None = None, title: str = "", map_rows: Sequence[str] = ()) -> Path:
    """A grid: one row per (label, tensor (N,C,H,W) or maps (N,H,W)); rows named in `map_rows` are drawn
    with a heat colormap (scaled over the whole row so maps are comparable)."""
    n = max(len(t) for _, t in rows)
    fig, axes = plt.subplots(len(rows), n, figsize=(1.25 * n + 0.6, 1.3 * len(rows) + 0.3), squeeze=False)
    for r, (label, images) in enumerate(rows):
        vmax = float(images.max()) if label in map_rows and images.numel() else None
        for c in range(n):
            ax = axes[r, c]
            ax.set_xticks([])
            ax.set_yticks([])
            if c >= len(images):
                ax.axis("off")
                continue
            if label in map_rows:
                ax.imshow(images[c].detach().cpu().float().numpy(), cmap="inferno", vmin=0, vmax=vmax)
            else:
                img, cmap = _as_image(images[c])
                ax.imshow(img, cmap=cmap, vmin=0, vmax=1)
            if c == 0:
                ax.set_ylabel(label, fontsize=8)
            if r == 0 and col_titles is not None and c < len(col_titles):
                ax.set_title(col_titles[c], fontsize=7)
    if title:
        fig.suptitle(title, fontsize=10)
    return _save(fig, path)


def loss_curves(history: Sequence[dict[str, float]], path: str | Path,
                title: str = "training losses") -> Path:
    """One line per logged value over epochs (separate axes when scales differ wildly)."""
    keys = list(dict.fromkeys(k for h in history for k in h))
    fig, axes = plt.subplots(1, len(keys), figsize=(3.2 * len(keys), 2.8), squeeze=False)
    for ax, k in zip(axes[0], keys):
        ax.plot(range(1, len(history) + 1), [h.get(k, np.nan) for h in history], marker="o", ms=3)
        ax.set_title(k, fontsize=9)
        ax.set_xlabel("epoch")
    fig.suptitle(title, fontsize=10)
    return _save(fig, path)


def bar_chart(groups: Sequence[str], series: dict[str, Sequence[float]], path: str | Path,
              errors: dict[str, Sequence[float]] | None = None, ylabel: str = "image AUROC",
              title: str = "", references: dict[str, Sequence[float]] | None = None) -> Path:
    """Grouped bars: x = groups (e.g. anomaly digit), one bar per series (detector), optional error bars
    and reference markers (e.g. a paper's or another toolkit's numbers)."""
    x = np.arange(len(groups))
    width = 0.8 / max(len(series), 1)
    fig, ax = plt.subplots(figsize=(max(6, 0.6 * len(groups) * max(len(series), 1) * 0.5 + 3), 3.6))
    for i, (name, values) in enumerate(series.items()):
        err = None if errors is None else errors.get(name)
        ax.bar(x + (i - (len(series) - 1) / 2) * width, values, width, yerr=err, label=name, capsize=2)
    for name, values in (references or {}).items():
        ax.scatter(x, values, marker="_", s=300, color="k", zorder=3, label=name)
    ax.set_xticks(x, groups)
    ax.set_ylabel(ylabel)
    ax.set_ylim(0, 1.05)
    ax.axhline(0.5, color="grey", lw=0.6, ls=":")
    ax.set_title(title)
    ax.legend(frameon=False, fontsize=7, ncol=min(len(series) + len(references or {}), 4))
    return _save(fig, path)
