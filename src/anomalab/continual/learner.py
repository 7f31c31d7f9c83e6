"""ContinualLearner: a trainable detector updated task by task with a strategy.

The first task is the detector's ordinary `fit`. Each later task continues training the same networks
through the detector's `train_more` (the shared `run_epochs` loop), on the data the strategy chooses
(joint), with a step built from the strategy. A detector trained by one loss and one optimiser
(`SingleLoss`) gets a step composed here: extend the batch (replay), add a penalty to the loss (EWC),
one optimiser step. Any other (the GANs' adversarial steps) keeps its own step, fed the strategy's
batches (replay). Every task trains for the detector's `epochs` with fresh optimisers
(`reset_optimizers`), so a run saved after task i and continued later trains exactly like the same
sequence run in memory.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from safetensors.torch import load_file, save_file
from torch import Tensor

from anomalab.continual.strategies import Strategy, StrategyError, make_strategy
from anomalab.data.transforms import check_images, prepare
from anomalab.train.epochs import SingleLoss, Step
from anomalab.types import ImageSet

STATE_FILE = "continual.safetensors"
META_FILE = "continual.json"


class ContinualLearner:
    """learner = ContinualLearner(create("vae"), "replay"); learner.learn(task1).learn(task2)...

    detector: an unfitted or fitted trainable detector (a fitted one counts as having seen one task;
    strategies that need the earlier tasks' data, ewc and joint, then need `start_from(earlier)`).
    """

    def __init__(self, detector, strategy: Strategy | str = "replay", **strategy_params: Any):
        self.detector = detector
        self.strategy = make_strategy(strategy, **strategy_params) if isinstance(strategy, str) else strategy
        self.strategy.check(detector)
        self.task_names: list[str] = ["(initial fit)"] if detector.is_fitted else []
        self.memory_bytes: list[int] = []

    @property
    def tasks_seen(self) -> int:
        return len(self.task_names)

    def _prepare(self, task: ImageSet | Tensor) -> Tensor:
        images = task.images if isinstance(task, ImageSet) else task
        check_images(images, what=f"{self.strategy.name}: task images")
        return prepare(images, self.detector.input_shape_)

    def start_from(self, earlier: ImageSet | Tensor) -> ContinualLearner:
        """For a detector fitted outside this learner: give the strategy the data of the task(s) it was
        fitted on (ewc computes its Fisher there, joint keeps the images)."""
        self.detector._check_fitted()
        self.strategy.end_task(self.detector, self._prepare(earlier))
        return self

    def learn(self, task: ImageSet | Tensor, name: str | None = None) -> ContinualLearner:
        """Train on one more task of normal images (N, C, H, W) in [0, 1]; returns self."""
        det = self.detector
        name = name or f"task{self.tasks_seen + 1}"
        if not det.is_fitted:
            det.fit(task)
            x = self._prepare(task)
        else:
            x = self._prepare(task)
            self.strategy.begin_task(det, self.tasks_seen)
            det.reset_optimizers()  # fresh optimisers per task: a saved detector carries no optimiser state
            data = self.strategy.training_data(x)
            det.train_more(data, epochs=self.strategy.task_epochs(det.epochs, len(x), len(data)),
                           step=self._task_step(),
                           desc=f"{det.name} {self.strategy.name} task {self.tasks_seen + 1}")
            det.threshold_ = None  # fitted on the previous model's scores: no longer valid
        self.memory_bytes.append(self.strategy.memory_bytes())
        self.strategy.end_task(det, x)
        self.task_names.append(str(name))
        return self

    def _task_step(self) -> Step:
        """The training step of a later task: `_step` for a single-loss detector; for any other, the
        detector's own step on the strategy's batches (its check admits only data-changing strategies)."""
        det, strategy = self.detector, self.strategy
        if isinstance(det, SingleLoss):
            return self._step
        return lambda batch: det._train_step(strategy.extend_batch(batch))

    def _step(self, batch: Tensor) -> dict[str, float]:
        """extend_batch, then the detector's loss + the strategy's penalty, then its one optimiser's step."""
        det, strategy = self.detector, self.strategy
        (opt,) = det.optimizers_.values()
        batch = strategy.extend_batch(batch.to(det.device_, non_blocking=True))
        opt.zero_grad(set_to_none=True)
        loss, logs = det.loss(batch)
        penalty = strategy.penalty(det)
        if penalty is not None:
            loss = loss + penalty
            logs = {**logs, "penalty": penalty.item()}
        loss.backward()
        opt.step()
        return logs

    # ---- save / load ------------------------------------------------------------------------------
    def save(self, path: str | Path) -> None:
        """Write path/detector/ (the detector), path/continual.json and path/continual.safetensors."""
        path = Path(path)
        self.detector.save(path / "detector")
        save_file(self.strategy.state_tensors(), str(path / STATE_FILE))
        meta = {"strategy": self.strategy.name, "strategy_params": self.strategy.get_params(),
                "tasks": self.task_names}
        (path / META_FILE).write_text(json.dumps(meta, indent=1))

    @classmethod
    def load(cls, path: str | Path, strategy: str | None = None, **strategy_params: Any) -> ContinualLearner:
        """Load a saved learner (or a plain saved detector/run). `strategy` may differ from the saved
        one; its saved state is then ignored, and ewc/joint need `start_from(earlier data)`."""
        from anomalab.registry import load as load_detector

        path = Path(path)
        detector = load_detector(path)
        meta = json.loads((path / META_FILE).read_text()) if (path / META_FILE).is_file() else None
        saved_strategy = meta["strategy"] if meta else None
        name = strategy or saved_strategy
        if name is None:
            raise StrategyError(f"{path} holds no continual-learning state: name a strategy")
        params = dict(meta["strategy_params"]) if meta and name == saved_strategy else {}
        params.update(strategy_params)
        learner = cls(detector, name, **params)
        if meta:
            learner.task_names = list(meta["tasks"])
            if name == saved_strategy and (path / STATE_FILE).is_file():
                learner.strategy.load_state(load_file(str(path / STATE_FILE)), detector)
        return learner
