"""Run folders: what `anomalab fit/evaluate/demo` and experiments write.

    <run>/config.json      detector, params, data spec, seed, versions, command
    <run>/history.json     per-epoch training losses
    <run>/detector/        the saved detector (weights.safetensors + detector.json, with threshold)
    <run>/evaluation.json  scores, labels and metrics on the test set (if the data has one)
    <run>/*.png            figures; <run>/report.html the page built from all of the above
"""

from __future__ import annotations

import json
import logging
import platform
import shutil
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from anomalab import __version__
from anomalab.evaluate import evaluate
from anomalab.registry import create
from anomalab.report import plots
from anomalab.report.html import write_report
from anomalab.types import Evaluation, ImageSet

log = logging.getLogger(__name__)


class RunExistsError(FileExistsError):
    pass


def prepare_run_dir(path: str | Path, overwrite: bool = False) -> Path:
    """Create an empty run folder; refuse one that already holds a run unless `overwrite`."""
    path = Path(path)
    if path.exists() and any(path.iterdir()):
        if not overwrite:
            raise RunExistsError(f"{path} already holds files; choose another --out or pass --overwrite")
        shutil.rmtree(path)
    path.mkdir(parents=True, exist_ok=True)
    return path


def versions() -> dict[str, str]:
    return {"anomalab": __version__, "torch": torch.__version__, "numpy": np.__version__,
            "python": platform.python_version()}


def calibration_split(train: ImageSet, calib_frac: float, seed: int) -> tuple[ImageSet, ImageSet | None]:
    """Hold out `calib_frac` of the normal training images to fit the threshold on (never the test set)."""
    if calib_frac <= 0:
        return train, None
    n_cal = max(1, int(round(calib_frac * len(train))))
    if n_cal >= len(train):
        raise ValueError(f"calib_frac={calib_frac} leaves no training images out of {len(train)}")
    order = np.random.default_rng(seed).permutation(len(train))
    return train.subset(order[n_cal:]), train.subset(order[:n_cal])


def evaluation_figures(det, test: ImageSet, ev: Evaluation, run: Path, n: int = 8) -> list[Path]:
    """Score histogram, ROC and grids (input / reconstruction / map) of the most anomalous test images
    and of the hardest cases (lowest-scored anomalies, highest-scored normals)."""
    out = []
    fitted = getattr(det, "threshold_", None)
    thr = fitted.value if fitted is not None and ev.normalize is None else None
    auroc = ev.metrics.get("image_auroc")
    title = f"{ev.detector} on {ev.dataset}" + (f": AUROC {auroc:.3f}" if auroc is not None else "")
    out.append(plots.score_histogram(ev.scores, ev.labels, run / "score_histogram.png", title, threshold=thr))
    if auroc is not None:
        out.append(plots.roc_plot([ev], run / "roc.png", title=f"ROC, {ev.dataset}"))
    order = np.argsort(-ev.scores)
    anomalies = [i for i in order[::-1] if ev.labels[i] == 1][: n // 2]
    normals = [i for i in order if ev.labels[i] == 0][: n - len(anomalies)]
    for name, idx in (("most_anomalous", list(order[:n])), ("hardest_cases", anomalies + normals)):
        if not idx:
            continue
        images = test.images[idx]
        rows = [("input", images)]
        if hasattr(det, "reconstruct"):
            try:
                rows.append(("reconstruction", det.reconstruct(images)))
            except NotImplementedError:
                pass
        try:
            rows.append(("anomaly map", det.score_map(images)))
        except NotImplementedError:
            pass
        titles = [f"{'anom' if ev.labels[i] else 'norm'} {ev.scores[i]:.3g}" for i in idx]
        caption = {"most_anomalous": "highest scores",
                   "hardest_cases": "missed anomalies and false alarms"}[name]
        out.append(plots.image_grid(rows, run / f"{name}.png", col_titles=titles, title=caption,
                                    map_rows=("anomaly map",)))
    return out


def fit_run(detector: str, params: dict[str, Any], data_spec: str, out: str | Path, *, max_fpr: float = 0.01,
            calib_frac: float = 0.1, overwrite: bool = False, command: str | None = None,
            figures: bool = True) -> tuple[Any, Evaluation | None, Path]:
    """Fit `detector` on the spec's normal images, fit its threshold on held-out normals, evaluate on the
    spec's test set (if any), and write the run folder with figures and report.html."""
    from anomalab.data.specs import load_spec

    det = create(detector, **params)  # fail on bad params before touching the folder
    train, test, info = load_spec(data_spec)
    run = prepare_run_dir(out, overwrite)
    fit_set, calib = calibration_split(train, calib_frac, seed=int(params.get("seed", 0)))
    config = {"detector": detector, "params": det.get_params(), "data": data_spec, "data_name": info["name"],
              "n_train": len(fit_set), "n_calibration": 0 if calib is None else len(calib),
              "max_fpr": max_fpr, "versions": versions(), "command": command or " ".join(sys.argv)}
    (run / "config.json").write_text(json.dumps(config, indent=1, default=str))
    t0 = time.perf_counter()
    det.fit(fit_set)
    fit_s = time.perf_counter() - t0
    det.fit_threshold(calib if calib is not None else fit_set, max_fpr=max_fpr)
    det.save(run / "detector")
    (run / "history.json").write_text(json.dumps(det.history_, indent=1))
    if det.history_ and figures:
        plots.loss_curves(det.history_, run / "loss_curves.png", title=f"{detector}: training losses")
    ev = None
    if test is not None:
        ev = evaluate(det, test, dataset=info["name"])
        ev.timings.update({"fit_s": fit_s, "fit_images_per_s": len(fit_set) * max(1, len(det.history_))
                           / max(fit_s, 1e-9)})
        ev.to_json(run / "evaluation.json")
        if figures:
            evaluation_figures(det, test, ev, run)
    write_report([run], run / "report.html", title=f"{detector} on {info['name']}")
    return det, ev, run
