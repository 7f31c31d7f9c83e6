"""The figures a fit writes into its run folder, for the report page.

With a test set (`evaluation_figures`):
    score_histogram.png   test scores of normal vs anomalous images (log axis when skewed), the threshold,
                          and the held-out normal scores from calibration.json when the run has it
    scores_by_type.png    the scores of each defect type (class) against the threshold
    roc.png               ROC curve with the operating point at the threshold
    most_anomalous.png    the highest-scored test images
    hardest_cases.png     missed anomalies (scored at or below the threshold) and false alarms (normal images
                          scored above it), each block saying so when it is empty
Without one (`calibration_figures`):
    calibration_scores.png    the held-out normal scores the threshold was fitted on, the threshold, and the
                              training images' scores for comparison
    calibration_examples.png  the highest-scored and typical held-out normal images with their maps (and a
                              few training images when only a few are held out)

Example images carry their file names and scores; anomaly maps share one threshold-anchored colour scale
(`map_scale`) with a colour bar; ground-truth masks are outlined on the input, map and overlay rows.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch

from anomalab.report.verdicts import select_examples
from anomalab.types import Evaluation, ImageSet

CALIBRATION_FILE = "calibration.json"
MAX_REFERENCE = 32
#: What the normal scores of a threshold are, by calibration.json's "basis".
BASIS_WORDS = {"holdout": "held-out normal images", "crossfit": "training images, each scored out-of-fold",
               "train": "training images (seen in training: optimistic)", "normal": "normal images given for it"}


def read_calibration(run: str | Path) -> dict | None:
    """The run's calibration record ({"scores": [...], ...}: the held-out normal scores the threshold was
    fitted on), or None when the run has none or it is unreadable."""
    f = Path(run) / CALIBRATION_FILE
    if not f.is_file():
        return None
    try:
        record = json.loads(f.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError):
        return None
    if not isinstance(record, dict) or not isinstance(record.get("scores"), list):
        return None
    return record


def _threshold(det):
    return getattr(det, "threshold_", None)


def _short(name: str, width: int = 28) -> str:
    return name if len(name) <= width else "…" + name[-(width - 1):]


def _maps(det, images: torch.Tensor) -> torch.Tensor | None:
    if not len(images):
        return None
    try:
        return det.score_map(images).detach().cpu().float()
    except NotImplementedError:
        return None


def _recons(det, images: torch.Tensor) -> torch.Tensor | None:
    if not len(images) or not hasattr(det, "reconstruct"):
        return None
    try:
        return det.reconstruct(images).detach().cpu().float()
    except NotImplementedError:
        return None


def map_scale(reference_maps: torch.Tensor | None, shown_maps: list[torch.Tensor], max_fpr: float = 0.01, *,
              anchor: float | None = None, vmin: float | None = None):
    """The one colour scale of a run's anomaly maps (`plots.MapScale`), or None without maps.

    anchor: given (the run's pixel threshold: a defect mask is map > anchor), else the (1 - max_fpr) quantile,
    over normal reference images, of each image's hottest pixel (the same rule); vmin: given (the median
    normal pixel recorded in calibration.json), else the median reference pixel; vmax: the hottest pixel
    shown, at least as far above the anchor as vmin is below it (normal maps stay in the cool half). Without
    either, the shown maps set the range (anchor at their midpoint)."""
    from anomalab.report.plots import MapScale

    shown = [m.reshape(-1) for m in shown_maps if m is not None and m.numel()]
    has_ref = reference_maps is not None and reference_maps.numel() > 0
    if not shown and not has_ref:
        return None
    pool = torch.cat(shown) if shown else reference_maps.reshape(-1)
    hi = float(pool.max())
    label = "pixel threshold"
    if anchor is None and has_ref:
        peaks = reference_maps.reshape(len(reference_maps), -1).double().max(dim=1).values.numpy()
        anchor, label = float(np.quantile(peaks, 1.0 - max_fpr, method="higher")), "normal max at threshold"
    if vmin is None and has_ref:
        vmin = float(reference_maps.double().median())
    if anchor is None or vmin is None or not vmin < anchor:
        lo = float(pool.min())
        return MapScale(vmin=lo, anchor=(lo + hi) / 2, vmax=hi, anchor_label="midpoint (no normal reference)")
    top = max(hi, vmin + 2 * (anchor - vmin))
    return MapScale(vmin=float(vmin), anchor=float(anchor), vmax=top, anchor_label=label)


def _scale(det, record: dict | None, reference: torch.Tensor | None, shown: list[torch.Tensor]):
    """The map scale of one run: the pixel threshold and normal level of the detector / calibration.json when
    they exist, else computed from the maps of `reference` normal images."""
    if not shown:
        return None
    fitted = _threshold(det)
    anchor = getattr(fitted, "pixel_value", None)
    record = record or {}
    if anchor is None:
        anchor = (record.get("pixel") or {}).get("value")
    level = (record.get("maps") or {}).get("level")
    ref = None
    if anchor is None or level is None:
        ref = _reference(det, reference) if reference is not None else None
    return map_scale(ref, shown, max_fpr=fitted.max_fpr if fitted is not None else 0.01, anchor=anchor, vmin=level)


def _reference(det, images: torch.Tensor) -> torch.Tensor | None:
    """Maps of at most MAX_REFERENCE normal images, evenly spread over the set."""
    if not len(images):
        return None
    pick = np.unique(np.linspace(0, len(images) - 1, min(MAX_REFERENCE, len(images))).round().astype(int))
    return _maps(det, images[pick])


def _section(det, data: ImageSet, idx: list[int], heading: str, titles: list[str], empty: str):
    from anomalab.report.plots import Section

    if not idx:
        return Section(heading, empty=empty)
    images = data.images[idx]
    masks = None
    if data.masks is not None and data.masks[idx].sum() > 0:
        masks = data.masks[idx]
    return Section(heading, images=images, col_titles=titles, maps=_maps(det, images),
                   recons=_recons(det, images), masks=masks, empty=empty)


def evaluation_figures(det, test: ImageSet, ev: Evaluation, run: Path, n: int = 6,
                       reference: ImageSet | None = None) -> list[Path]:
    """Write the test-set figures (module docstring) into `run`; returns their paths.

    The held-out normal scores and the map scale (pixel threshold, normal level) come from the run's
    calibration.json when it has one. reference: the held-out normal images the threshold was fitted on,
    the fallback without it: their scores are drawn in the histogram and their maps set the colour scale
    (default: the test set's normal images)."""
    from anomalab.report import plots

    run = Path(run)
    out = []
    fitted = _threshold(det)
    thr = fitted.value if fitted is not None and ev.normalize is None else None
    auroc = ev.metrics.get("image_auroc")
    title = f"{ev.detector} on {ev.dataset}" + (f": AUROC {auroc:.3f}" if auroc is not None else "")
    record = read_calibration(run)
    held_out, basis = None, "holdout"
    if ev.normalize is None:
        if record is not None and record["scores"]:
            held_out, basis = record["scores"], record.get("basis") or basis
        elif reference is not None and len(reference):
            held_out = det.score(reference.images).detach().cpu().double().numpy()
    out.append(plots.score_histogram(ev.scores, ev.labels, run / "score_histogram.png", title, threshold=thr,
                                     names=("normal (test)", "anomalous (test)"), reference=held_out,
                                     reference_name=f"{BASIS_WORDS.get(basis, basis)} (threshold fitted on these)"))
    if ev.classes is not None and len(np.unique(ev.classes)) > 1:
        class_names = ev.extra.get("class_names") or test.meta.get("class_names")
        out.append(plots.scores_by_class(ev.scores, ev.labels, ev.classes, run / "scores_by_type.png",
                                         class_names=class_names, threshold=thr,
                                         title="scores per type (blue normal, orange anomalous)"))
    if auroc is not None:
        out.append(plots.roc_plot([ev], run / "roc.png", title=f"ROC, {ev.dataset}", threshold=thr))

    picks = select_examples(ev.scores, ev.labels, thr, n=n)
    names = ev.names or test.names

    def titles(idx):
        return [f"{_short(names[i])}\n{'anomalous' if ev.labels[i] else 'normal'}, score {ev.scores[i]:.3g}"
                for i in idx]

    n_anom, n_norm = int(np.sum(ev.labels == 1)), int(np.sum(ev.labels == 0))
    if thr is None:
        order = np.argsort(ev.scores, kind="stable")
        low = [int(i) for i in order if ev.labels[i] == 1][:n]
        high = [int(i) for i in order[::-1] if ev.labels[i] == 0][:n]
        hard = [(low, "lowest-scored anomalies (no threshold: nothing was decided)", "no anomalous images"),
                (high, "highest-scored normal images (no threshold)", "no normal images")]
    else:
        n_missed = int(np.sum((ev.labels == 1) & (ev.scores <= thr)))
        n_fa = int(np.sum((ev.labels == 0) & (ev.scores > thr)))
        hard = [(picks["missed"], f"missed anomalies: {n_missed} of {n_anom} anomalous images scored at or below "
                 f"the threshold {thr:.4g}" + (f" (the {len(picks['missed'])} lowest shown)"
                                                if n_missed > len(picks["missed"]) else ""),
                 "none missed" if n_anom else "no anomalous images in the test set"),
                (picks["false_alarms"], f"false alarms: {n_fa} of {n_norm} normal images scored above the threshold"
                 + (f" (the {len(picks['false_alarms'])} highest shown)"
                    if n_fa > len(picks["false_alarms"]) else ""),
                 "no false alarms" if n_norm else "no normal images in the test set")]
    sections = {"most_anomalous": [_section(det, test, picks["most_anomalous"], "",
                                            titles(picks["most_anomalous"]), "no images")],
                "hardest_cases": [_section(det, test, idx, heading, titles(idx), empty)
                                  for idx, heading, empty in hard]}
    normals = reference.images if reference is not None else test.images[torch.as_tensor(ev.labels == 0)]
    shown = [sec.maps for secs in sections.values() for sec in secs if sec.maps is not None]
    scale = _scale(det, record, normals, shown)
    figure_titles = {"most_anomalous": "most anomalous test images",
                     "hardest_cases": "missed anomalies and false alarms at the threshold"}
    for name, secs in sections.items():
        out.append(plots.example_panel(secs, run / f"{name}.png", scale=scale, title=figure_titles[name]))
    return out


def _spread(k: int, n: int) -> list[int]:
    """At most `k` indices evenly spread over range(n)."""
    return [] if n == 0 or k <= 0 else np.unique(np.linspace(0, n - 1, min(k, n)).round().astype(int)).tolist()


def calibration_figures(det, calibration: ImageSet | None, run: Path, train: ImageSet | None = None,
                        n: int = 6, max_train: int = 200) -> list[Path]:
    """Figures of a run without a test set: what normal looks like to the detector.

    calibration_scores.png: the normal scores the threshold was fitted on (calibration.json's when the run
    has one: held-out or out-of-fold scores, else scored here) with the threshold, and the saved detector's
    scores of up to `max_train` training images as an outline (seen in training, so optimistic: a wide gap
    means the detector memorised its training images). calibration_examples.png: the highest-scored and
    typical calibration images with their maps (titled with the scores the threshold rests on), and a few
    training images when fewer than `n` calibration images exist.
    calibration: the images the threshold was fitted on (the training images when cross-fitting), or None
    when it was fitted on the training images themselves."""
    from anomalab.report import plots

    run = Path(run)
    fitted = _threshold(det)
    thr = fitted.value if fitted is not None else None
    held = calibration if calibration is not None else train
    record = read_calibration(run)
    basis = (record or {}).get("basis") or ("holdout" if calibration is not None else "train")
    what = BASIS_WORDS.get(basis, f"{basis} normal images")
    if held is not None and record is not None and sorted(record.get("names") or []) == sorted(held.names) \
            and len(record["scores"]) == len(held):
        by_name = dict(zip(record["names"], record["scores"]))
        own = np.array([by_name[name] for name in held.names], dtype=float)  # the scores the threshold rests on
    else:
        own = det.score(held.images).detach().cpu().double().numpy() if held is not None else np.zeros(0)
    scores = np.asarray(record["scores"], dtype=float) if record is not None and record["scores"] else own
    train_pick = _spread(max_train, len(train)) if train is not None and calibration is not None else []
    train_scores = det.score(train.images[train_pick]).detach().cpu().double().numpy() if train_pick else None
    out = [plots.score_histogram(scores, np.zeros(len(scores), dtype=int), run / "calibration_scores.png",
                                 title=f"{det.name}: scores of the {len(scores)} {what}", threshold=thr,
                                 names=(what, "anomalous"), reference=train_scores,
                                 reference_name="training images scored by the saved detector")]
    if held is None:
        return out

    def titles(data: ImageSet, values: np.ndarray, idx: list[int]) -> list[str]:
        return [f"{_short(data.names[i])}\nscore {values[i]:.3g}"
                + (", above threshold" if thr is not None and values[i] > thr else "") for i in idx]

    order = [int(i) for i in np.argsort(-own, kind="stable")]
    top = order[: max(1, n // 2)]
    rest = order[len(top):]
    typical = [rest[j] for j in _spread(n - len(top), len(rest))]
    sections = [_section(det, held, top, f"highest-scored {what}", titles(held, own, top), "no images")]
    if typical:
        sections.append(_section(det, held, typical, f"typical {what} (spread over the score range)",
                                 titles(held, own, typical), f"no further {what}"))
    if train_scores is not None and len(top) + len(typical) < n:
        k = n - len(top) - len(typical)
        local = [int(i) for i in np.argsort(-train_scores, kind="stable")]
        pick = [local[j] for j in _spread(k, len(local))]
        subset = train.subset([train_pick[j] for j in pick])
        sections.append(_section(det, subset, list(range(len(pick))), "training images (seen in training, "
                                 "scored by the saved detector)",
                                 titles(subset, train_scores[pick], list(range(len(pick)))), "no training images"))
    shown = [sec.maps for sec in sections if sec.maps is not None]
    scale = _scale(det, record, held.images, shown)
    title = f"what normal looks like to {det.name}"
    if basis in ("crossfit", "train"):
        title += ("\n(maps by the saved detector, which trained on these images: expect new normal images "
                  "to look hotter)")
    out.append(plots.example_panel(sections, run / "calibration_examples.png", scale=scale, title=title))
    return out
