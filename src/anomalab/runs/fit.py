"""`fit_run` and `continue_run`: what `anomalab fit` (and `demo`) run, as thin functions over RunWriter.

Both do the same five things, in one place (`_train_and_write`): check every option and the target
before any work; train; fit the thresholds on normal images the detector did not train on (held out, or
cross-fitted: `anomalab.thresholds`); evaluate on the test set if the data has one; write the run folder
(config, history, detector, calibration, evaluation, figures, report) atomically.
"""

from __future__ import annotations

import logging
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from anomalab import distributed
from anomalab.errors import NotSupportedError, ParameterError, StrategyError
from anomalab.report.figures import calibration_figures, evaluation_figures
from anomalab.runs.folder import CONFIG_FILE, RunWriter
from anomalab.types import Evaluation, ImageSet

log = logging.getLogger(__name__)


def check_fractions(max_fpr: float, calib_frac: float) -> None:
    """The threshold options, checked before anything is loaded or written."""
    if not (isinstance(max_fpr, (int, float)) and 0.0 <= max_fpr < 1.0):
        raise ParameterError(f"--max-fpr must be in [0, 1), got {max_fpr!r}")
    if not (isinstance(calib_frac, (int, float)) and 0.0 <= calib_frac < 1.0):
        raise ParameterError(f"--calib-frac must be in [0, 1), got {calib_frac!r}")


def calibration_split(train: ImageSet, calib_frac: float, seed: int) -> tuple[ImageSet, ImageSet | None]:
    """Hold out `calib_frac` of the normal training images to fit the threshold on (never the test set)."""
    if calib_frac <= 0:
        return train, None
    n_cal = max(1, int(round(calib_frac * len(train))))
    if n_cal >= len(train):
        raise ParameterError(f"--calib-frac {calib_frac} leaves no training images out of {len(train)}")
    order = np.random.default_rng(seed).permutation(len(train))
    return train.subset(order[n_cal:]), train.subset(order[:n_cal])


def _train_and_write(run: RunWriter, det, train_fn: Callable[[ImageSet], None], save_fn: Callable[[Path], None],
                     train: ImageSet, test: ImageSet | None, info: dict, config: dict, *, calib_frac: float,
                     max_fpr: float, figures: bool, title: str, calib_folds: int = 0,
                     make_fold: Callable[[], Any] | None = None) -> tuple[Evaluation | None, Path]:
    from anomalab.evaluation import evaluate
    from anomalab.report import plots
    from anomalab.report.html import write_report
    from anomalab.thresholds import CALIBRATION_FILE, calibrate

    # cross-fitting (calib_folds >= 2): the detector trains on every image, each scored out-of-fold for the threshold
    fit_set, calib = ((train, None) if calib_folds >= 2
                      else calibration_split(train, calib_frac, seed=config["calibration_seed"]))
    if run is None:  # a rank other than 0 under torchrun: its part of the training, nothing written
        with distributed.scope():
            train_fn(fit_set)
        return None, None
    config.update({"n_train": len(fit_set), "n_calibration": len(train) if calib_folds >= 2
                   else 0 if calib is None else len(calib)})
    with run:
        run.write_json(CONFIG_FILE, config)
        n_before = len(getattr(det, "history_", None) or [])
        t0 = time.perf_counter()
        with distributed.scope():  # over every rank under torchrun; what follows runs on rank 0 alone
            train_fn(fit_set)
        fit_s = time.perf_counter() - t0
        t0 = time.perf_counter()
        try:
            calibration = calibrate(det, fit_set, calib, max_fpr=max_fpr, folds=calib_folds, make=make_fold,
                                    seed=config["calibration_seed"],
                                    leave_one_out=bool(config.get("calib_folds_auto")))
        except ParameterError as e:
            if not config.get("calib_folds_auto"):
                raise
            # automatic cross-fitting never fails a fit the hold-out allows (e.g. knn's k above a fold's size)
            log.info("cross-fitting not possible (%s); holding out --calib-frac %s instead", e, calib_frac)
            calib_folds = 0
            fit_set, calib = calibration_split(train, calib_frac, seed=config["calibration_seed"])
            config.update({"calib_folds": 0, "calib_folds_auto": False, "calib_frac": calib_frac,
                           "n_train": len(fit_set), "n_calibration": 0 if calib is None else len(calib)})
            run.write_json(CONFIG_FILE, config)
            train_fn(fit_set)
            calibration = calibrate(det, fit_set, calib, max_fpr=max_fpr, seed=config["calibration_seed"])
            calibration["notes"] = [f"automatic cross-fitting was not possible ({e}); {calib_frac} of the "
                                    "training images were held out instead"]
        calibration_s = time.perf_counter() - t0
        run.write_json(CALIBRATION_FILE, calibration)
        for warning in calibration["warnings"]:
            log.info("calibration: %s", warning)
        save_fn(run.path)
        history = det.history_[n_before:]
        run.write_json("history.json", det.history_)
        if history and figures:
            plots.loss_curves(history, run.path / "loss_curves.png", title=f"{det.name}: training losses")
        ev = None
        if test is not None:
            ev = evaluate(det, test, dataset=info["name"])
            ev.timings.update({"fit_s": fit_s, "fit_images_per_s": len(fit_set) * max(1, len(history))
                               / max(fit_s, 1e-9), "calibration_s": calibration_s})
            ev.to_json(run.path / "evaluation.json")
            if figures:
                evaluation_figures(det, test, ev, run.path, reference=calib)
        elif figures:
            calibration_figures(det, calib if calib is not None or calib_folds < 2 else fit_set, run.path,
                                train=fit_set)
        write_report([run.path], run.path / "report.html", title=title)
    return ev, run.target


def fit_run(detector: str, params: dict[str, Any], data_spec: str, out: str | Path, *, max_fpr: float = 0.01,
            calib_frac: float = 0.1, calib_folds: int | None = None, overwrite: bool = False,
            command: str | None = None, figures: bool = True, tile: int | None = None,
            overlap: int = 0) -> tuple[Any, Evaluation | None, Path]:
    """Fit `detector` on the spec's normal images, fit its thresholds on normal images it did not train on,
    evaluate on the spec's test set (if any), and write the run folder `out` (atomically; see runs.folder),
    with the normal scores the thresholds rest on in calibration.json (`anomalab.thresholds`).

    calib_folds: None = automatic (cross-fitting for the detectors cheap to fit, on fewer than 200 training
    images), 0 = hold out `calib_frac` of the training images, k >= 2 = k-fold cross-fitting (every training
    image scored by a detector fitted without it; the saved detector is fitted on all of them). config.json
    records the folds and, as calib_frac, the share left out of the saved detector's training (0 when
    cross-fitting).

    tile, overlap: fit and score on overlapping tile x tile tiles of the full-resolution images instead of
    the whole images (`anomalab.tiling`): the detector is a TiledDetector, config.json records the tiling and
    the saved detector keeps it (detector/tiling.json), so thresholds, evaluation, score and predict all
    follow it. None: whole images, as without tiling."""
    from anomalab.data.specs import check_spec, inputs_of, load_spec
    from anomalab.registry import create
    from anomalab.thresholds import check_folds, choose_folds

    group = distributed.group()  # under torchrun: every rank trains, rank 0 alone writes (anomalab.distributed)

    def make(**kwargs):
        det = create(detector, **kwargs)
        if tile is None:
            return det
        from anomalab.tiling import TiledDetector

        return TiledDetector(det, tile, overlap)

    def checked():
        if tile is None and overlap:
            raise ParameterError("--overlap needs --tile (the tile size in pixels)")
        det = make(**params)  # bad names / types / values fail here, before anything is read or written
        check_fractions(max_fpr, calib_frac)
        check_folds(calib_folds)
        check_spec(data_spec)
        if group is not None:
            distributed.check_supported(det)
            det.progress = group.rank == 0
        return det

    det = distributed.agree(checked)
    run = distributed.agree(lambda: RunWriter(out, overwrite=overwrite, inputs=inputs_of(data_spec))
                            if distributed.rank() == 0 else None)
    try:
        train, test, info = distributed.agree(lambda: load_spec(data_spec))
        if tile is not None and min(train.shape[1:]) < tile:
            from anomalab.errors import DataError

            raise DataError(f"--tile {tile} is larger than the {train.shape[1]}x{train.shape[2]} (H x W) training "
                            f"images of {data_spec}: use --tile {min(train.shape[1:])} or less (images are never "
                            "padded or upscaled)")
        folds = choose_folds(detector, len(train), calib_folds)
    except BaseException:
        if run is not None:
            run.close()
        raise
    config = {"detector": detector, "params": det.get_params(), "data": data_spec, "data_name": info["name"],
              "calib_frac": 0.0 if folds >= 2 else calib_frac, "calib_folds": folds,
              "calib_folds_auto": calib_folds is None and folds >= 2,
              "calibration_seed": int(getattr(det, "seed", 0) or 0),
              "max_fpr": max_fpr, "command": command or " ".join(sys.argv)}
    if tile is not None:
        config.update({"tile": tile, "overlap": overlap})
    ev, path = _train_and_write(run, det, det.fit, lambda p: det.save(p / "detector"), train, test, info,
                                config, calib_frac=calib_frac, max_fpr=max_fpr, figures=figures,
                                title=f"{detector} on {info['name']}"
                                + ("" if tile is None else f" (tiles {tile}, overlap {overlap})"),
                                calib_folds=folds, make_fold=lambda: make(**det.get_params()))
    return det, ev, path


def _earlier_training_images(old_config: dict[str, Any], calib_frac: float) -> ImageSet:
    """The training images of every earlier task, as each of those runs saw them (same calibration share
    and seed, read from the runs' config; the current `calib_frac` only for runs that did not record it)."""
    from anomalab.data.specs import load_spec

    tasks = old_config.get("continual", {}).get("tasks")
    if not tasks:
        seed = old_config.get("calibration_seed", old_config.get("params", {}).get("seed", 0))
        tasks = [{"data": old_config["data"], "calib_frac": old_config.get("calib_frac", calib_frac),
                  "calibration_seed": seed}]
    sets = []
    for task in tasks:
        train, _, _ = load_spec(task["data"])
        sets.append(calibration_split(train, task["calib_frac"], seed=task["calibration_seed"])[0])
    return ImageSet.concat(sets)


def continue_run(detector: str, params: dict[str, Any], data_spec: str, out: str | Path,
                 continue_from: str | Path, strategy: str | None = None, *, max_fpr: float = 0.01,
                 calib_frac: float = 0.1, overwrite: bool = False, command: str | None = None,
                 figures: bool = True) -> tuple[Any, Evaluation | None, Path]:
    """Continual learning: load the detector saved in `continue_from` (only read, never changed), learn
    `data_spec`'s normal images as a new task with `strategy` (default: the old run's, else replay),
    refit the threshold on held-out new normals, evaluate, and write the new run folder `out`.

    What each strategy needs from the old run: finetune and replay the saved detector only; ewc the Fisher
    saved by an earlier ewc update (continual.safetensors), else it is computed once from the old run's
    data; joint the earlier tasks' images, reloaded from the data specs the runs' config.json record."""
    import inspect

    from anomalab.continual.learner import ContinualLearner
    from anomalab.continual.strategies import STRATEGIES
    from anomalab.data.specs import check_spec, inputs_of, load_spec
    from anomalab.params import choose, validate
    from anomalab.runs.folder import RunFolder

    if distributed.group() is not None:
        distributed.raise_everywhere(NotSupportedError("--continue-from (continual learning) cannot run under "
                                                       "torchrun: run it in one process"))
    check_fractions(max_fpr, calib_frac)
    old = RunFolder(continue_from)
    old_config = old.config
    if old_config.get("tile") is not None:
        raise NotSupportedError(f"{old.path} is a tiled run (--tile {old_config['tile']}): continual learning "
                                "does not support tiled runs; fit a new tiled run instead")
    prior = old_config.get("continual", {})
    strategy = choose(strategy or prior.get("strategy") or "replay", STRATEGIES, "strategy")
    training = {k: params.pop(k) for k in ("epochs", "lr", "batch_size") if k in params}
    allowed = [p for p in inspect.signature(STRATEGIES[strategy]).parameters if p != "memory"]
    unknown = sorted(set(params) - set(allowed))
    if unknown:
        raise ParameterError(f"with --continue-from, parameters {unknown} cannot change; allowed: epochs, lr, "
                             f"batch_size{''.join(', ' + p for p in allowed)}")
    strategy_params = validate(STRATEGIES[strategy], params, owner=f"strategy {strategy}")
    check_spec(data_spec)
    run = RunWriter(out, overwrite=overwrite, inputs=[old.path, *inputs_of(data_spec)], kind="continual")
    try:
        learner = ContinualLearner.load(old.path, strategy, **strategy_params)
        det = learner.detector
        if det.name != detector:
            raise ParameterError(f"{old.path} holds a '{det.name}' detector, not '{detector}'")
        training = validate(type(det), training, owner=det.name)
        for k, v in training.items():
            setattr(det, k, v)
        train, test, info = load_spec(data_spec)
        tasks = list(prior.get("tasks") or [])
        if not tasks and "data" in old_config:
            tasks = [{"data": old_config["data"], "calib_frac": old_config.get("calib_frac", calib_frac),
                      "calibration_seed": old_config.get("calibration_seed", det.seed)}]
        if learner.strategy.needs_earlier_data():
            if not tasks:
                raise StrategyError(f"--strategy {strategy} needs the earlier tasks' data, but "
                                    f"{old.path}/config.json records no data spec")
            log.info("%s: reloading earlier data %s", strategy, [t["data"] for t in tasks])
            learner.start_from(_earlier_training_images(old_config, calib_frac))
    except BaseException:
        run.close()
        raise
    task = {"data": data_spec, "calib_frac": calib_frac, "calibration_seed": det.seed}
    config = {"detector": det.name, "params": det.get_params(), "data": data_spec, "data_name": info["name"],
              "calib_frac": calib_frac, "calibration_seed": det.seed, "max_fpr": max_fpr,
              "command": command or " ".join(sys.argv),
              "continual": {"strategy": strategy, "strategy_params": learner.strategy.get_params(),
                            "continued_from": str(old.path), "data_history": [t["data"] for t in tasks] + [data_spec],
                            "tasks": [*tasks, task]}}
    ev, path = _train_and_write(run, det, lambda s: learner.learn(s, name=data_spec), learner.save, train, test,
                                info, config, calib_frac=calib_frac, max_fpr=max_fpr, figures=figures,
                                title=f"{det.name} on {info['name']} ({strategy} update)")
    return det, ev, path
