"""`anomalab fit DETECTOR --data SPEC --continue-from OLD_RUN --strategy S --out NEW_RUN`: update a saved
detector with new normal data as one more task and write a NEW run folder (the old one is only read).

What each strategy needs from the old run:
- finetune, replay: the saved detector only (replay copies its decoder before training);
- ewc: the accumulated Fisher saved by an earlier `--strategy ewc` update (continual.safetensors);
  continuing a plain `anomalab fit` run, the Fisher is computed once from the old run's data;
- joint: the earlier tasks' images, reloaded from the data specs recorded in the old run's config.json
  (`data` and `continual.data_history`), so those specs must still be readable.
The new run's config.json records `continual`: strategy, the old run, and every task's data spec.
"""

from __future__ import annotations

import inspect
import json
import logging
import sys
import time
from pathlib import Path
from typing import Any

from anomalab.continual.learner import ContinualLearner
from anomalab.continual.strategies import STRATEGIES, StrategyError
from anomalab.types import ImageSet

log = logging.getLogger(__name__)


def _earlier_training_images(old_config: dict[str, Any], seed: int, calib_frac: float) -> ImageSet:
    """The training images of every earlier task, as each run saw them (same calibration hold-out)."""
    from anomalab.data.specs import load_spec
    from anomalab.run import calibration_split

    specs = old_config.get("continual", {}).get("data_history") or [old_config["data"]]
    sets = []
    for spec in specs:
        train, _, _ = load_spec(spec)
        sets.append(calibration_split(train, old_config.get("calib_frac", calib_frac), seed=seed)[0])
    return ImageSet.concat(sets)


def continue_run(detector: str, params: dict[str, Any], data_spec: str, out: str | Path,
                 continue_from: str | Path, strategy: str | None = None, *, max_fpr: float = 0.01,
                 calib_frac: float = 0.1, overwrite: bool = False, command: str | None = None,
                 figures: bool = True) -> tuple[Any, Any, Path]:
    """Load the detector saved in `continue_from`, learn `data_spec`'s normal images as a new task with
    `strategy` (default: the old run's, else replay), refit the threshold on held-out new normals,
    evaluate on the spec's test set if any, and write the new run folder `out`."""
    from anomalab.data.specs import load_spec
    from anomalab.evaluate import evaluate
    from anomalab.report import plots
    from anomalab.report.html import write_report
    from anomalab.run import calibration_split, evaluation_figures, prepare_run_dir, versions

    old = Path(continue_from)
    out = Path(out)
    if out.resolve() == old.resolve():
        raise ValueError("--out must be a new run folder: the run given to --continue-from is never changed")
    old_config = json.loads((old / "config.json").read_text()) if (old / "config.json").is_file() else {}
    prior = old_config.get("continual", {})
    strategy = strategy or prior.get("strategy") or "replay"
    if strategy not in STRATEGIES:
        raise StrategyError(f"unknown strategy '{strategy}'; known: {', '.join(STRATEGIES)}")
    training = {k: params.pop(k) for k in ("epochs", "lr", "batch_size") if k in params}
    allowed = [p for p in inspect.signature(STRATEGIES[strategy]).parameters if p != "memory"]
    unknown = sorted(set(params) - set(allowed))
    if unknown:
        raise ValueError(f"with --continue-from, parameters {unknown} cannot change; allowed: epochs, lr, "
                         f"batch_size{''.join(', ' + p for p in allowed)}")
    learner = ContinualLearner.load(old, strategy, **params)
    det = learner.detector
    if det.name != detector:
        raise ValueError(f"{old} holds a '{det.name}' detector, not '{detector}'")
    for k, v in training.items():
        setattr(det, k, v)
    train, test, info = load_spec(data_spec)
    history = list(prior.get("data_history") or ([old_config["data"]] if "data" in old_config else []))
    if learner.strategy.needs_earlier_data():
        if not history:
            raise StrategyError(f"--strategy {strategy} needs the earlier tasks' data, but {old}/config.json "
                                "records no data spec")
        log.info("%s: reloading earlier data %s", strategy, history)
        learner.start_from(_earlier_training_images(old_config, det.seed, calib_frac))
    run = prepare_run_dir(out, overwrite)
    fit_set, calib = calibration_split(train, calib_frac, seed=det.seed)
    config = {"detector": det.name, "params": det.get_params(), "data": data_spec, "data_name": info["name"],
              "n_train": len(fit_set), "n_calibration": 0 if calib is None else len(calib),
              "max_fpr": max_fpr, "calib_frac": calib_frac, "versions": versions(),
              "command": command or " ".join(sys.argv),
              "continual": {"strategy": strategy, "strategy_params": learner.strategy.get_params(),
                            "continued_from": str(old), "data_history": [*history, data_spec]}}
    (run / "config.json").write_text(json.dumps(config, indent=1, default=str))
    n_before = len(det.history_)
    t0 = time.perf_counter()
    learner.learn(fit_set, name=data_spec)
    fit_s = time.perf_counter() - t0
    det.fit_threshold(calib if calib is not None else fit_set, max_fpr=max_fpr)
    learner.save(run)
    (run / "history.json").write_text(json.dumps(det.history_, indent=1))
    if figures and len(det.history_) > n_before:
        plots.loss_curves(det.history_[n_before:], run / "loss_curves.png",
                          title=f"{det.name}: training losses of the new task ({strategy})")
    ev = None
    if test is not None:
        ev = evaluate(det, test, dataset=info["name"])
        ev.timings.update({"fit_s": fit_s})
        ev.to_json(run / "evaluation.json")
        if figures:
            evaluation_figures(det, test, ev, run)
    write_report([run], run / "report.html", title=f"{det.name} on {info['name']} ({strategy} update)")
    return det, ev, run
