"""Figures as PNG files (matplotlib, Agg backend): histograms, ROC, per-type scores, image grids, example
panels with colour bars and ground-truth outlines, loss curves, bar charts.

Every figure uses constrained layout, so a figure title (suptitle) never overlaps the titles of its axes."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402

from anomalab.metrics import roc_curve  # noqa: E402
from anomalab.report.verdicts import is_skewed  # noqa: E402
from anomalab.types import Evaluation  # noqa: E402


def _log_axis(axis, lo: float, hi: float) -> None:
    """A log score axis labelled with plain numbers (1, 2, 5 per decade over short ranges), no crowded
    minor labels."""
    from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter

    decades = np.log10(hi / lo) if hi > lo > 0 else 0.0
    axis.set_major_locator(LogLocator(base=10, subs=(1.0, 2.0, 5.0) if decades <= 2 else (1.0,)))
    axis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:.3g}"))
    axis.set_minor_formatter(NullFormatter())


def _save(fig, path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)
    return path


RUG_MAX = 50  # groups this small also get one tick per image under the histogram


def score_histogram(scores, labels, path: str | Path, title: str = "", threshold: float | None = None,
                    names: tuple[str, str] = ("normal", "anomalous"), bins: int = 40, log: bool | None = None,
                    reference=None, reference_name: str = "held-out normals") -> Path:
    """Histograms of the scores of label 0 vs label 1, each as a fraction of its own images, with an optional
    threshold line and an optional `reference` set of scores drawn as an outline (e.g. the held-out normal
    images the threshold was fitted on).

    log: a log score axis with log-spaced bins; None = when the scores are skewed (`verdicts.is_skewed`:
    positive, with a long right tail), so the bulk of the normal scores is not squeezed into one bin."""
    scores, labels = np.asarray(scores, dtype=float).reshape(-1), np.asarray(labels).reshape(-1)
    ref = None if reference is None else np.asarray(reference, dtype=float).reshape(-1)
    pooled = scores if ref is None or not len(ref) else np.concatenate([scores, ref])
    if log is None:
        log = is_skewed(pooled)
    log = bool(log) and pooled.size > 0 and pooled.min() > 0 and (threshold is None or threshold > 0)
    span = pooled if threshold is None else np.append(pooled, threshold)
    fig, ax = plt.subplots(figsize=(6.4, 3.6), layout="constrained")
    if span.size == 0:
        edges = np.linspace(0, 1, bins + 1)
    elif log:
        lo, hi = float(span.min()), float(span.max())
        edges = np.geomspace(lo, hi if hi > lo else lo * 1.01, bins + 1)
        ax.set_xscale("log")
        _log_axis(ax.xaxis, lo, hi)
    else:
        edges = np.histogram_bin_edges(span, bins=bins)
    groups = [(scores[labels == 0], names[0], "tab:blue", "bar"), (scores[labels == 1], names[1], "tab:orange", "bar")]
    if ref is not None and len(ref):
        groups.append((ref, reference_name, "tab:green", "step"))
    for part, name, colour, kind in groups:
        if len(part):
            ax.hist(part, bins=edges, alpha=0.6 if kind == "bar" else 1.0, color=colour, histtype=kind,
                    lw=1.4, weights=np.full(len(part), 1 / len(part)), label=f"{name} (n={len(part)})")
            if len(part) <= RUG_MAX:
                ax.plot(part, np.zeros(len(part)), "|", color=colour, ms=10, mew=1.2, clip_on=False)
    if threshold is not None:
        ax.axvline(threshold, color="k", ls="--", lw=1, label=f"threshold {threshold:.4g}")
    ax.set_xlabel("anomaly score (higher = more anomalous)" + (", log scale" if log else ""))
    ax.set_ylabel("fraction of each group")
    if title:
        ax.set_title(title, fontsize=10)
    fig.legend(*ax.get_legend_handles_labels(), loc="outside lower center", ncols=2, frameon=False, fontsize=8)
    return _save(fig, path)


def scores_by_class(scores, labels, classes, path: str | Path, class_names: Sequence[str] | None = None,
                    threshold: float | None = None, title: str = "", log: bool | None = None) -> Path:
    """One row of points per class (defect type, digit), normal classes blue and anomalous orange, with the
    threshold line: which types are caught, which slip under it. Log axis as in `score_histogram`."""
    scores = np.asarray(scores, dtype=float).reshape(-1)
    labels, classes = np.asarray(labels).reshape(-1), np.asarray(classes).reshape(-1)
    ids = list(np.unique(classes))
    if log is None:
        log = is_skewed(scores)
    log = bool(log) and scores.min() > 0 and (threshold is None or threshold > 0)
    fig, ax = plt.subplots(figsize=(6.4, 0.9 + 0.42 * len(ids)), layout="constrained")
    jitter = np.random.default_rng(0).uniform(-0.18, 0.18, len(scores))
    for row, cid in enumerate(ids):
        for value, colour in ((0, "tab:blue"), (1, "tab:orange")):
            member = (classes == cid) & (labels == value)
            if member.any():
                ax.scatter(scores[member], row + jitter[member], s=14, alpha=0.75, color=colour, lw=0)
    names = [class_names[c] if class_names is not None and 0 <= c < len(class_names) else str(c) for c in ids]
    counts = [int(np.sum(classes == c)) for c in ids]
    ax.set_yticks(range(len(ids)), [f"{nm} ({k})" for nm, k in zip(names, counts)], fontsize=8)
    ax.set_ylim(len(ids) - 0.5, -0.5)
    if log:
        ax.set_xscale("log")
        span = scores if threshold is None else np.append(scores, threshold)
        _log_axis(ax.xaxis, float(span.min()), float(span.max()))
    if threshold is not None:
        ax.axvline(threshold, color="k", ls="--", lw=1)
        title = f"{title}{'; ' if title else ''}dashed line: threshold {threshold:.4g}"
    ax.set_xlabel("anomaly score" + (", log scale" if log else ""))
    if title:
        ax.set_title(title, fontsize=9)
    return _save(fig, path)


def roc_plot(evaluations: Sequence[Evaluation], path: str | Path, title: str = "ROC",
             threshold: float | None = None) -> Path:
    """ROC curves of one or more evaluations; with `threshold`, the operating point of the first is marked."""
    fig, ax = plt.subplots(figsize=(4.2, 4), layout="constrained")
    for ev in evaluations:
        fpr, tpr, _ = roc_curve(ev.labels, ev.scores)
        ax.plot(fpr, tpr, label=f"{ev.detector} (AUROC {ev.metrics.get('image_auroc', float('nan')):.3f})")
    if threshold is not None and evaluations:
        ev = evaluations[0]
        flagged = np.asarray(ev.scores) > threshold
        normal = np.asarray(ev.labels) == 0
        if normal.any() and (~normal).any():
            ax.plot(flagged[normal].mean(), flagged[~normal].mean(), "ko", ms=5, label="at the threshold")
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
    fig, axes = plt.subplots(len(rows), n, figsize=(1.25 * n + 0.6, 1.3 * len(rows) + 0.3), squeeze=False,
                             layout="constrained")
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


@dataclass
class Section:
    """One block of an example panel: a heading, and per example (column) an input image (C, H, W), optional
    reconstruction (C, H, W), anomaly map (H, W) and ground-truth mask (H, W), and a column title. With no
    examples, `empty` is written in the block instead (e.g. "none missed")."""

    heading: str
    images: torch.Tensor | None = None
    col_titles: Sequence[str] = ()
    maps: torch.Tensor | None = None
    recons: torch.Tensor | None = None
    masks: torch.Tensor | None = None
    empty: str = "none"

    def __len__(self) -> int:
        return 0 if self.images is None else len(self.images)


@dataclass
class MapScale:
    """One colour scale for every anomaly map of a report: `vmin` (typical normal pixel) to `vmax`, with the
    midpoint of the colour map at `anchor` (the level that normal images' hottest pixels stay under at the
    threshold's false-alarm rate), so colours mean the same in every example."""

    vmin: float
    anchor: float
    vmax: float
    anchor_label: str = "normal max at threshold"

    def norm(self):
        from matplotlib.colors import Normalize, TwoSlopeNorm

        if self.vmin < self.anchor < self.vmax:
            return TwoSlopeNorm(vmin=self.vmin, vcenter=self.anchor, vmax=self.vmax)
        return Normalize(vmin=self.vmin, vmax=max(self.vmax, self.vmin + 1e-12))


OUTLINE = "#00e5ff"


def _outline(ax, mask) -> None:
    if mask is None:
        return
    m = mask.detach().cpu().float().numpy() if isinstance(mask, torch.Tensor) else np.asarray(mask, dtype=float)
    if m.max() > 0.5 and m.min() < 0.5:
        ax.contour(m, levels=[0.5], colors=OUTLINE, linewidths=0.9)


MIN_COLUMNS = 4


def example_panel(sections: Sequence[Section], path: str | Path, scale: MapScale | None = None,
                  title: str = "", cmap: str = "inferno") -> Path:
    """Blocks of examples, one per `Section`, each with the rows input / reconstruction / anomaly map /
    overlay (those it has). Maps use the one `scale` (threshold-anchored, shared across blocks and figures:
    never per-image min-max), with a colour bar per block; the overlay colours only pixels above the anchor.
    Ground-truth masks are outlined on the input, map and overlay rows."""
    n = max([len(sec) for sec in sections] + [MIN_COLUMNS])  # at least MIN_COLUMNS: same cell size, room for text
    kinds = [[k for k, t in (("input", sec.images), ("reconstruction", sec.recons), ("anomaly map", sec.maps),
                             ("overlay", sec.maps)) if t is not None] if len(sec) else [] for sec in sections]
    heights = [1.55 * len(k) + 0.55 if k else 0.55 for k in kinds]
    has_maps = scale is not None and any(sec.maps is not None and len(sec) for sec in sections)
    fig = plt.figure(figsize=(1.45 * n + (1.1 if has_maps else 0.3), sum(heights) + (0.35 if title else 0)),
                     layout="constrained")
    subfigs = fig.subfigures(len(sections), 1, height_ratios=heights, squeeze=False)[:, 0]
    norm = scale.norm() if scale is not None else None
    for sub, sec, rows in zip(subfigs, sections, kinds):
        if sec.heading:
            sub.suptitle(sec.heading, fontsize=9, x=0.02, ha="left", fontweight="bold")
        if not rows:  # an empty axes holds the text, so constrained layout places it under the heading
            ax = sub.subplots()
            ax.axis("off")
            ax.text(0.02, 0.5, sec.empty, fontsize=9, ha="left", va="center", color="#333", transform=ax.transAxes)
            continue
        axes = sub.subplots(len(rows), n, squeeze=False)
        mappable = None
        for c in range(n):
            for r, kind in enumerate(rows):
                ax = axes[r, c]
                ax.set_xticks([])
                ax.set_yticks([])
                if c >= len(sec):
                    ax.axis("off")
                    continue
                mask = None if sec.masks is None else sec.masks[c]
                if kind in ("input", "reconstruction"):
                    img, gray = _as_image((sec.images if kind == "input" else sec.recons)[c])
                    ax.imshow(img, cmap=gray, vmin=0, vmax=1)
                    if kind == "input":
                        _outline(ax, mask)
                elif kind == "anomaly map":
                    m = sec.maps[c].detach().cpu().float().numpy()
                    mappable = ax.imshow(m, cmap=cmap, norm=norm)
                    _outline(ax, mask)
                else:
                    img, gray = _as_image(sec.images[c])
                    ax.imshow(img, cmap=gray, vmin=0, vmax=1)
                    m = sec.maps[c].detach().cpu().float().numpy()
                    if norm is not None:
                        level = (np.asarray(norm(m)) - 0.5) * 2
                        alpha = np.where(level > 0, 0.4 + 0.5 * np.clip(level, 0, 1), 0.0)
                        ax.imshow(m, cmap=cmap, norm=norm, alpha=alpha)
                    _outline(ax, mask)
                if c == 0:
                    ax.set_ylabel(kind, fontsize=8)
                if r == 0 and c < len(sec.col_titles):
                    ax.set_title(sec.col_titles[c], fontsize=6.5)
        if mappable is not None and scale is not None:
            map_axes = [axes[r, c] for r, k in enumerate(rows) if k in ("anomaly map", "overlay")
                        for c in range(len(sec))]
            bar = sub.colorbar(mappable, ax=map_axes, shrink=0.9, aspect=12, pad=0.02, extend="both")
            ticks = sorted({scale.vmin, scale.anchor, scale.vmax}) if scale.vmin < scale.anchor < scale.vmax \
                else [scale.vmin, scale.vmax]
            bar.set_ticks(ticks, labels=[f"{t:.3g}" for t in ticks], fontsize=6.5)
            if scale.vmin < scale.anchor < scale.vmax:
                bar.ax.axhline(scale.anchor, color="w", lw=1.2)
                bar.set_label(f"map value (mid: {scale.anchor_label})", fontsize=6.5)
            else:
                bar.set_label("map value", fontsize=6.5)
    if title:
        fig.suptitle(title, fontsize=11)
    return _save(fig, path)


def loss_curves(history: Sequence[dict[str, float]], path: str | Path,
                title: str = "training losses") -> Path:
    """One line per logged value over epochs (separate axes when scales differ wildly)."""
    from matplotlib.ticker import MaxNLocator

    keys = list(dict.fromkeys(k for h in history for k in h))
    fig, axes = plt.subplots(1, len(keys), figsize=(3.2 * len(keys), 2.8), squeeze=False, layout="constrained")
    for ax, k in zip(axes[0], keys):
        ax.plot(range(1, len(history) + 1), [h.get(k, np.nan) for h in history], marker="o", ms=3)
        ax.set_title(k, fontsize=9)
        ax.set_xlabel("epoch")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    fig.suptitle(title, fontsize=10)
    return _save(fig, path)


def bar_chart(groups: Sequence[str], series: dict[str, Sequence[float]], path: str | Path,
              errors: dict[str, Sequence[float]] | None = None, ylabel: str = "image AUROC",
              title: str = "", references: dict[str, Sequence[float]] | None = None) -> Path:
    """Grouped bars: x = groups (e.g. anomaly digit), one bar per series (detector), optional error bars
    and reference markers (e.g. a paper's or another toolkit's numbers)."""
    x = np.arange(len(groups))
    width = 0.8 / max(len(series), 1)
    fig, ax = plt.subplots(figsize=(max(6, 0.6 * len(groups) * max(len(series), 1) * 0.5 + 3), 3.6),
                           layout="constrained")
    for i, (name, values) in enumerate(series.items()):
        err = None if errors is None else errors.get(name)
        ax.bar(x + (i - (len(series) - 1) / 2) * width, values, width, yerr=err, label=name, capsize=2)
    styles = [("_", "k"), ("x", "k"), ("_", "tab:grey"), ("x", "tab:grey")]  # one marker per reference
    for j, (name, values) in enumerate((references or {}).items()):
        marker, colour = styles[j % len(styles)]
        ax.scatter(x, values, marker=marker, s=300 if marker == "_" else 60, color=colour, zorder=3, label=name)
    ax.set_xticks(x, groups)
    ax.set_ylabel(ylabel)
    ax.set_ylim(0, 1.05)
    ax.axhline(0.5, color="grey", lw=0.6, ls=":")
    ax.set_title(title)
    ax.legend(frameon=False, fontsize=7, ncol=min(len(series) + len(references or {}), 4))
    return _save(fig, path)
